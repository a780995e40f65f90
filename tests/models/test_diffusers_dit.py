"""diffusers' DiTTransformer2DModel as a ditq family: a tiny random model built from a
config (no download), against diffusers' own forward; every method through the adapter;
saved and loaded back exactly; model and pipeline directories; a hub id offline."""

import json

import diffusers_cases
import numpy as np
import pytest
import torch
from diffusers_cases import SETTINGS, linears_in_call_order, relative_error
from torch import nn

import ditq
from ditq.calib.dataset import build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings, generate, load_scheduler
from ditq.errors import DitqError
from ditq.methods import METHODS
from ditq.models.adapter import AdaLNFold, ValueRowsFold, adapter_for
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.folding import smooth_layers
from ditq.pipeline.steps import quantized_layers, wrap_layers

diffusers = pytest.importorskip("diffusers")
from ditq.models.diffusers_dit import DiffusersDiT  # noqa: E402


def tiny_transformer(seed: int = 0, num_classes: int = 10):
    """A tiny DiT; with 1000 classes its null class is the one DiTPipeline uses."""
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    ).eval()


def inputs():
    return diffusers_cases.inputs([1, 2, 10])  # 10: the null class


@pytest.fixture(scope="module")
def calib():
    settings = SamplingSettings(sampler="ddim", steps=5, cfg_scale=1.5, seed=11)
    model = DiffusersDiT(tiny_transformer())
    return build_calibration_set(model, 4, settings, steps="all", progress=False)


def test_the_wrapper_computes_what_diffusers_computes():
    transformer = tiny_transformer()
    x, t, y = inputs()
    with torch.no_grad():
        reference = transformer(x, timestep=t, class_labels=y).sample
        model = DiffusersDiT(transformer)  # patch conv -> linear, hook-point attention
        assert relative_error(model(x, t, y), reference) < 1e-6
        assert relative_error(model.transformer(x, t, y).sample, reference) < 1e-6
    assert model.config.num_classes == 10 and model.config.learn_sigma
    assert isinstance(model.transformer.pos_embed.proj.linear, nn.Linear)


def test_adapter_lists_every_linear_in_forward_order_and_folds_exactly():
    model = DiffusersDiT(tiny_transformer())
    adapter = adapter_for(model)
    x, t, y = inputs()
    called, reference = linears_in_call_order(model, x, t, y)
    listed = [name for name, _ in adapter.quantizable_layers()]
    # the forward calls block 0's timestep embedder again for the output modulation
    assert list(dict.fromkeys(called)) == listed
    block = "transformer.transformer_blocks.1"
    assert adapter.block_layers(1)["qkv"] == tuple(f"{block}.attn1.to_{p}" for p in "qkv")
    assert adapter.input_fold(f"{block}.attn1.to_k") == AdaLNFold(f"{block}.norm1.linear", 0, 1)
    assert adapter.input_fold(f"{block}.attn1.to_out.0") == ValueRowsFold(
        f"{block}.attn1.to_v", fused=False
    )
    with torch.no_grad():
        wrap_layers(model, QuantConfig(wbits=16, abits=16))
        generator = torch.Generator().manual_seed(1)
        for group in adapter.role_groups(("proj", "qkv", "fc1", "fc2")):
            width = model.get_submodule(group[0]).in_features
            smooth_layers(model, group, torch.exp(torch.randn(width, generator=generator)))
        assert relative_error(model(x, t, y), reference) < 1e-5


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_quantizes_saves_and_loads_back(name, calib, tmp_path):
    method = METHODS[name]
    x, t, y = inputs()
    with torch.no_grad():
        reference = DiffusersDiT(tiny_transformer())(x, t, y)
    exact = method.config_class(wbits=16, abits=16, attn_bits=16, **SETTINGS.get(name, {}))
    model = ditq.quantize(DiffusersDiT(tiny_transformer()), exact, calib, progress=False)
    with torch.no_grad():
        assert relative_error(model(x, t, y), reference) < 1e-5  # folds are exact
    config = method.config_class(wbits=8, abits=8, **SETTINGS.get(name, {}))
    model = ditq.quantize(DiffusersDiT(tiny_transformer()), config, calib, progress=False)
    assert quantized_layers(model)
    with torch.no_grad():
        out = model(x, t, y)
        assert 0 < relative_error(out, reference) < 0.05
    ditq.save(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "ditq.json").read_text())
    assert manifest["family"] == "diffusers-dit"
    loaded = ditq.load_model(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), out, rtol=0, atol=0)
    assert isinstance(loaded.transformer, diffusers.DiTTransformer2DModel)


def test_ditas_fold_proj_needs_a_fused_qkv(calib):
    config = METHODS["ditas"].config_class(fold_proj=True, lowrank_rank=4)
    with pytest.raises(DitqError, match="separate q, k and v projections"):
        ditq.quantize(DiffusersDiT(tiny_transformer()), config, calib, progress=False)


def test_model_and_pipeline_directories_load_and_sample(tmp_path):
    transformer = tiny_transformer()
    transformer.save_pretrained(tmp_path / "model")
    transformer.save_pretrained(tmp_path / "pipeline" / "transformer")
    (tmp_path / "pipeline" / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    x, t, y = inputs()
    with torch.no_grad():
        reference = transformer(x, timestep=t, class_labels=y).sample
        for path in (tmp_path / "model", tmp_path / "pipeline"):
            model = ditq.load_model(path)
            assert relative_error(model(x, t, y), reference) < 1e-6
    images, labels = generate(
        model, 2, SamplingSettings(sampler="ddim", steps=2), classes=[3], progress=False
    )
    assert images.shape == (2, 8, 8, 4) and labels.tolist() == [3, 3]


def test_an_unreachable_hub_id_is_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import: the constant too, or the
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # hub is retried
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DitqError, match="neither a diffusers DiT directory nor a hub id"):
        ditq.load_model("nobody/no-such-dit")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DitqError, match="neither one written by ditq quantize nor a diffusers"):
        ditq.load_model(tmp_path / "plain")


def test_a_quantized_transformer_goes_back_into_a_dit_pipeline(calib, tmp_path):
    """``model.transformer`` keeps diffusers' forward: DiTPipeline samples with it."""
    transformer = tiny_transformer(num_classes=1000)  # DiTPipeline's null class is 1000
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8
    ).eval()
    scheduler = diffusers.DDIMScheduler()
    config = METHODS["rtn"].config_class(wbits=8, abits=8)
    model = ditq.quantize(DiffusersDiT(transformer), config, calib, progress=False)
    ditq.save(model, tmp_path / "q")
    quantized = ditq.load_model(tmp_path / "q").transformer
    pipe = diffusers.DiTPipeline(transformer=quantized, vae=vae, scheduler=scheduler)
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        class_labels=[1, 2], num_inference_steps=2, generator=generator, output_type="np"
    ).images
    assert images.shape == (2, 8, 8, 3) and bool(torch.isfinite(torch.as_tensor(images)).all())


def official_to_diffusers(official) -> "diffusers.DiTTransformer2DModel":
    """The official DiT's weights in diffusers' layout, with the mapping of diffusers'
    ``scripts/convert_dit_to_diffusers.py``: qkv split into to_q/to_k/to_v, proj → to_out.0,
    fc1/fc2 → ff.net.0.proj/ff.net.2, adaLN_modulation.1 → norm1.linear, the shared
    embedders copied into every block, final_layer → proj_out_1/2."""
    c = official.config
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=official.out_channels,
        num_layers=c.depth,
        sample_size=c.input_size,
        patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes,
    ).eval()
    src = official.state_dict()  # the official layout (the patch weight as a 4-D conv)
    dst = {
        "pos_embed.proj.weight": src["x_embedder.proj.weight"],
        "pos_embed.proj.bias": src["x_embedder.proj.bias"],
        "proj_out_1.weight": src["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": src["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": src["final_layer.linear.weight"],
        "proj_out_2.bias": src["final_layer.linear.bias"],
    }
    for i in range(c.depth):
        block, new = f"blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = src[f"{block}attn.qkv.{kind}"].chunk(3)
            embedder = f"{new}norm1.emb.timestep_embedder"
            dst.update({
                f"{embedder}.linear_1.{kind}": src[f"t_embedder.mlp.0.{kind}"],
                f"{embedder}.linear_2.{kind}": src[f"t_embedder.mlp.2.{kind}"],
                f"{new}norm1.linear.{kind}": src[f"{block}adaLN_modulation.1.{kind}"],
                f"{new}attn1.to_q.{kind}": q,
                f"{new}attn1.to_k.{kind}": k,
                f"{new}attn1.to_v.{kind}": v,
                f"{new}attn1.to_out.0.{kind}": src[f"{block}attn.proj.{kind}"],
                f"{new}ff.net.0.proj.{kind}": src[f"{block}mlp.fc1.{kind}"],
                f"{new}ff.net.2.{kind}": src[f"{block}mlp.fc2.{kind}"],
            })  # fmt: skip
        dst[f"{new}norm1.emb.class_embedder.embedding_table.weight"] = src[
            "y_embedder.embedding_table.weight"
        ]
    transformer.load_state_dict(dst, strict=True)
    return transformer


def with_official_embeddings(transformer, official):
    """Account for the two places where diffusers' DiT differs from the official one:
    its sinusoidal timestep frequencies (``downscale_freq_shift=1``: ``/(half - 1)``
    against the official ``/half``) and its float32 position table (the official one is
    computed in float64)."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    transformer.pos_embed.pos_embed.copy_(official.pos_embed.detach())
    return transformer


def test_the_official_layout_converted_to_diffusers_computes_the_same_function():
    from conftest import tiny_dit

    official = tiny_dit(in_channels=4, learn_sigma=True, num_classes=10)
    converted = official_to_diffusers(official)
    x, t, y = inputs()
    x = x[:, :4]
    with torch.no_grad():
        # block by block, given the same conditioning vector
        c = official.t_embedder(t) + official.y_embedder(y)
        h = official.x_embedder(x) + official.pos_embed
        for ours, theirs in zip(official.blocks, converted.transformer_blocks, strict=True):
            theirs.norm1.emb.forward = lambda *args, **kwargs: c
            assert relative_error(theirs(h, timestep=t, class_labels=y), ours(h, c)) < 1e-6
            h = ours(h, c)
            del theirs.norm1.emb.forward
        # end to end: the documented differences are real, and the only ones
        as_converted = converted(x, timestep=t, class_labels=y).sample
        assert relative_error(as_converted, official(x, t, y)) > 1e-3
        aligned = DiffusersDiT(with_official_embeddings(converted, official))
        assert relative_error(aligned(x, t, y), official(x, t, y)) < 1e-5


@pytest.mark.parametrize("name", ["rtn", "smoothquant", "single-step", "ptq4dit"])
def test_each_method_quantizes_both_layouts_to_the_same_function(name):
    from conftest import tiny_dit

    official = tiny_dit(in_channels=4, learn_sigma=True, num_classes=10)
    settings = SamplingSettings(sampler="ddim", steps=4, cfg_scale=1.5, seed=11)
    calib = build_calibration_set(official, 3, settings, steps="all", progress=False)
    converted = DiffusersDiT(with_official_embeddings(official_to_diffusers(official), official))
    options = {"recon_iters": 0} if name == "ptq4dit" else SETTINGS.get(name, {})
    config = METHODS[name].config_class(wbits=4, abits=8, **options)
    x, t, y = inputs()
    x = x[:, :4]
    with torch.no_grad():
        reference = official(x, t, y)
        ditq.quantize(official, config, calib, progress=False)
        ditq.quantize(converted, config, calib, progress=False)
        ours, theirs = official(x, t, y), converted(x, t, y)
    error = relative_error(ours, reference)  # what quantization costs
    assert error > 1e-3
    assert relative_error(theirs, ours) < error / 20, (relative_error(theirs, ours), error)


def test_sampling_with_a_diffusers_scheduler_is_what_dit_pipeline_computes(tmp_path):
    """``generate(..., scheduler=...)`` / ``ditq sample --scheduler``: DiTPipeline's loop
    (guidance on all four channels, learned σ dropped) from the same initial latents."""
    transformer = tiny_transformer(num_classes=1000)  # DiTPipeline's null class is 1000
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8
    ).eval()
    scheduler = diffusers.DDIMScheduler()
    scheduler.save_pretrained(tmp_path / "pipe" / "scheduler")
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    expected = pipe(
        class_labels=[1, 2],
        guidance_scale=4.0,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = SamplingSettings(steps=3, cfg_scale=4.0)
    images, labels = generate(
        DiffusersDiT(transformer),
        2,
        settings,
        scheduler=load_scheduler(tmp_path / "pipe"),
        classes=[1, 2],
        init_noise=latents.numpy(),
        vae=vae,
        progress=False,
    )
    assert labels.tolist() == [1, 2]
    assert np.abs(images.astype(float) - expected * 255).max() <= 1.0  # uint8 rounding
    with pytest.raises(DitqError, match="no scheduler_config.json"):
        load_scheduler(tmp_path)
    from ditq.cli import main

    transformer.save_pretrained(tmp_path / "pipe" / "transformer")
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    pipe_dir = str(tmp_path / "pipe")
    command = ["sample", "--model", pipe_dir, "--scheduler", pipe_dir, "--vae", f"{pipe_dir}/vae"]
    command += ["--steps", "3", "--num-samples", "2", "--classes", "1,2", "--quiet"]
    assert main([*command, "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as samples:
        assert samples["arr_0"].shape == (2, 8, 8, 3)
