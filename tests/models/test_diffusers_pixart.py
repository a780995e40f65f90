"""diffusers' PixArtTransformer2DModel as a ditq family: a tiny random model built from a
config with a random prompt table (the text encoder stays outside), against diffusers'
own forward; every method through the adapter; saved and loaded back exactly."""

import json
import sys

import diffusers_cases
import numpy as np
import pytest
import torch
from diffusers_cases import SETTINGS, linears_in_call_order, relative_error

import ditq
from ditq.calib.dataset import build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings, generate
from ditq.errors import DitqError
from ditq.methods import METHODS
from ditq.models.adapter import ValueRowsFold, adapter_for
from ditq.pipeline.config import LayerSelection

from conftest import check_block_inputs_match_capture, run_unpacked

diffusers = pytest.importorskip("diffusers")
from ditq.models.diffusers_pixart import DiffusersPixArt  # noqa: E402


def parts(seed: int = 0):
    """A tiny transformer and the table of 3 prompts + the empty one (6 text tokens of 24
    channels, padding masked)."""
    torch.manual_seed(seed)
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=24,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()
    generator = torch.Generator().manual_seed(5)
    embeds = torch.randn(4, 6, 24, generator=generator)
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    mask[3, 1:] = 0  # the empty prompt: one token
    return transformer, embeds, mask


def inputs():
    return diffusers_cases.inputs([0, 2, 3])  # 3: the empty prompt


@pytest.fixture(scope="module")
def calib():
    settings = SamplingSettings(sampler="ddim", steps=4, cfg_scale=1.5, seed=11)
    return build_calibration_set(
        DiffusersPixArt(*parts()), 3, settings, steps="all", progress=False
    )


def test_the_wrapper_conditions_on_the_prompt_table_as_diffusers_does():
    transformer, embeds, mask = parts()
    x, t, y = inputs()
    with torch.no_grad():
        reference = transformer(
            x,
            encoder_hidden_states=embeds[y],
            timestep=t,
            encoder_attention_mask=mask[y],
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        model = DiffusersPixArt(transformer, embeds, mask)
        assert relative_error(model(x, t, y), reference) < 1e-6
    assert model.num_classes == 3 and model.config.num_classes == 3
    with pytest.raises(DitqError, match="prompt embeddings must be"):
        model.set_prompts(embeds, mask[:, :3])


def test_adapter_lists_every_linear_in_forward_order_and_folds_v_rows():
    model = DiffusersPixArt(*parts())
    adapter = adapter_for(model)
    called, _ = linears_in_call_order(model, *inputs())
    assert called == [name for name, _ in adapter.quantizable_layers()]
    block = "transformer.transformer_blocks.0"
    assert adapter.input_fold(f"{block}.attn2.to_out.0") == ValueRowsFold(
        f"{block}.attn2.to_v", fused=False
    )
    assert adapter.input_fold(f"{block}.attn1.to_q") is None  # adaLN-single: online
    assert list(adapter.attention_modules()) == [
        f"transformer.transformer_blocks.{i}.attn{j}" for i in range(2) for j in (1, 2)
    ]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_quantizes_saves_and_loads_back(name, calib, tmp_path):
    method = METHODS[name]
    x, t, y = inputs()
    with torch.no_grad():
        reference = DiffusersPixArt(*parts())(x, t, y)
    exact = method.config_class(wbits=16, abits=16, attn_bits=16, **SETTINGS.get(name, {}))
    model = ditq.quantize(DiffusersPixArt(*parts()), exact, calib, progress=False)
    with torch.no_grad():
        assert relative_error(model(x, t, y), reference) < 1e-5
    errors = {}
    for wbits in (4, 8):
        config = method.config_class(wbits=wbits, abits=8, **SETTINGS.get(name, {}))
        model = ditq.quantize(DiffusersPixArt(*parts()), config, calib, progress=False)
        with torch.no_grad():
            out = model(x, t, y)
        errors[wbits] = relative_error(out, reference)
    assert 0 < errors[8] < 0.05 and errors[8] < errors[4] / 2  # output SQNR: W8A8 >> W4A8
    ditq.save(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "ditq.json").read_text())["family"] == "diffusers-pixart"
    loaded = ditq.load_model(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), out, rtol=0, atol=0)
    images, labels = generate(
        loaded, 2, SamplingSettings(sampler="ddim", steps=2), classes=[1], progress=False
    )
    assert images.shape == (2, 8, 8, 4) and labels.tolist() == [1, 1]


def test_chained_blocks_get_the_inputs_a_capture_would(calib, monkeypatch):
    """The sequential driver's block chain on PixArt: the caption and timestep keyword
    inputs carried from block to block equal a capture (the caption projection and adaLN
    linears quantized, so the FP and quantized keyword inputs differ)."""
    model = DiffusersPixArt(*parts())
    config = METHODS["rtn"].config_class(
        wbits=4, abits=8, layers=LayerSelection(embedders=True, adaln=True)
    )
    run_unpacked(METHODS["rtn"], model, config, calib)
    check_block_inputs_match_capture(model, DiffusersPixArt(*parts()), calib, monkeypatch)


def tiny_pipeline(root):
    """A PixArt-α pipeline directory: tiny transformer, T5 encoder, word-level tokenizer
    and VAE, all random, built from configs."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["a", "red", "fox", "in", "snow", "the", "moon", "over", "sea"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "tokenizer")
    torch.manual_seed(1)
    config = transformers.T5Config(
        vocab_size=len(vocab), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    transformers.T5EncoderModel(config).eval().save_pretrained(root / "text_encoder")
    parts()[0].save_pretrained(root / "transformer")
    diffusers.AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8
    ).save_pretrained(root / "vae")
    (root / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    return root


def test_without_the_extras_the_error_names_them(monkeypatch, tmp_path):
    tiny_pipeline(tmp_path / "pipe")
    with pytest.raises(DitqError, match="without its text encoder: pass the pipeline"):
        ditq.load_model(tmp_path / "pipe" / "transformer")
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(DitqError, match=r"pip install 'ditq\[diffusers\]'"):
        ditq.load_model(tmp_path / "pipe")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(DitqError, match=r"pip install 'ditq\[diffusers\]'"):
        ditq.load_model(tmp_path / "pipe")


def test_a_pipeline_directory_quantizes_with_prompts_and_samples_new_ones(tmp_path, monkeypatch):
    from ditq.cli import main

    transformers = pytest.importorskip("transformers")
    pipeline = tiny_pipeline(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a red fox in snow\n\nthe moon over the sea\n")
    monkeypatch.chdir(tmp_path)
    quantize = ["quantize", "--model", "pipe", "--method", "rtn", "--calib-prompts", "prompts.txt"]
    quantize += ["--calib-samples", "2", "--calib-sampler", "ddim", "--calib-num-steps", "3"]
    quantize += ["--calib-steps", "all"]
    assert main([*quantize, "--quiet", "--out", "q"]) == 0
    architecture = json.loads((tmp_path / "q" / "ditq.json").read_text())["architecture"]
    assert architecture["prompt_texts"] == ["a red fox in snow", "the moon over the sea"]
    model = ditq.load_model(tmp_path / "q")
    # the table holds what the pipeline's own encoder gives for the prompts, then ""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(pipeline / "tokenizer"))
    encoder = transformers.T5EncoderModel.from_pretrained(str(pipeline / "text_encoder"))
    tokens = tokenizer(
        ["the moon over the sea", ""], padding="max_length", max_length=120, return_tensors="pt"
    )
    with torch.no_grad():
        expected = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    torch.testing.assert_close(model.prompt_embeds[1:], expected)
    assert model.prompt_mask[2].sum() == 1  # the empty prompt: its end token
    sample = ["sample", "--model", "q", "--prompt", "a fox", "--prompt", "snow", "--sampler"]
    sample += ["ddim", "--steps", "2", "--num-samples", "2", "--quiet", "--out", "s.npz"]
    assert main(sample) == 0
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (2, 8, 8, 3)  # decoded by the pipeline's VAE
    assert main(["quantize", "--model", "pipe", "--method", "rtn", "--calib-prompts", "none.txt",
                 "--out", "r"]) == 2  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_a_quantized_transformer_goes_back_into_a_pixart_pipeline(tmp_path):
    transformers = pytest.importorskip("transformers")
    pipeline = tiny_pipeline(tmp_path / "pipe")
    model = ditq.load_model(pipeline, prompts=["a red fox in snow"])
    settings = SamplingSettings(sampler="ddim", steps=3, cfg_scale=1.5)
    calib = build_calibration_set(model, 2, settings, steps="all", progress=False)
    ditq.quantize(model, METHODS["rtn"].config_class(wbits=8, abits=8), calib, progress=False)
    ditq.save(model, tmp_path / "q")
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(pipeline / "tokenizer")),
        text_encoder=transformers.T5EncoderModel.from_pretrained(str(pipeline / "text_encoder")),
        vae=diffusers.AutoencoderKL.from_pretrained(str(pipeline / "vae")),
        transformer=ditq.load_model(tmp_path / "q").transformer,
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )
    images = pipe(
        "a red fox in snow",
        num_inference_steps=2,
        output_type="np",
        use_resolution_binning=False,
        clean_caption=False,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()
