"""diffusers' DiTTransformer2DModel as a ditq family: a tiny random model built from a
config (no download), against diffusers' own forward; every method through the adapter;
saved and loaded back exactly; model and pipeline directories; a hub id offline."""

import json

import pytest
import torch
from torch import nn

import ditq
from ditq.calib.dataset import build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings, generate
from ditq.errors import DitqError
from ditq.methods import METHODS
from ditq.models.adapter import AdaLNFold, ValueRowsFold, adapter_for
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.folding import smooth_layers
from ditq.pipeline.steps import quantized_layers, wrap_layers

diffusers = pytest.importorskip("diffusers")
from ditq.models.diffusers_dit import DiffusersDiT  # noqa: E402

SETTINGS = {
    "ptq4dit": {"recon_iters": 3, "recon_batch_size": 4, "recon_chunks": 2},
    "ditas": {"lowrank_rank": 4},
    "single-step": {"w_group_size": 16},
}


def tiny_transformer(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()


def inputs():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    return x, torch.tensor([5, 500, 900]), torch.tensor([1, 2, 10])  # 10: the null class


@pytest.fixture(scope="module")
def calib():
    settings = SamplingSettings(sampler="ddim", steps=5, cfg_scale=1.5, seed=11)
    model = DiffusersDiT(tiny_transformer())
    return build_calibration_set(model, 4, settings, steps="all", progress=False)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


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
    names = {module: name for name, module in model.named_modules()}
    called = []
    hooks = [
        m.register_forward_pre_hook(lambda module, _: called.append(names[module]))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    x, t, y = inputs()
    with torch.no_grad():
        reference = model(x, t, y)
    for hook in hooks:
        hook.remove()
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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DitqError, match="neither a diffusers DiT directory nor a hub id"):
        ditq.load_model("nobody/no-such-dit")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DitqError, match="neither one written by ditq quantize nor a diffusers"):
        ditq.load_model(tmp_path / "plain")


def test_a_quantized_transformer_goes_back_into_a_dit_pipeline(calib, tmp_path):
    """``model.transformer`` keeps diffusers' forward: DiTPipeline samples with it."""
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline's null class is 1000
    ).eval()
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
