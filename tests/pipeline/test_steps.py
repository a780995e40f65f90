import pytest
import torch

from ditq.calib.dataset import build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings
from ditq.errors import DitqError
from ditq.methods import METHODS, RTNConfig
from ditq.pipeline.config import LayerOverride, LayerSelection, QuantConfig
from ditq.pipeline.steps import (
    activation_quantizers,
    calibrate_activations,
    pack_model,
    quantized_layers,
    wrap_layers,
)
from ditq.quant import Quantizer
from ditq.quant.layers import QuantLinear

from conftest import run_unpacked, tiny_dit


@pytest.fixture(scope="module")
def calib():
    model = tiny_dit()
    settings = SamplingSettings(sampler="ddim", steps=5, cfg_scale=1.5, seed=3)
    return build_calibration_set(model, 3, settings, steps="all", progress=False)


def _inputs():
    torch.manual_seed(5)
    return torch.randn(4, 3, 8, 8), torch.tensor([999, 600, 200, 0]), torch.tensor([0, 1, 2, 4])


def test_default_selection_is_the_four_linears_of_every_block():
    model = tiny_dit()
    wrap_layers(model, QuantConfig())
    assert sorted(quantized_layers(model)) == sorted(
        f"blocks.{i}.{layer}"
        for i in range(2)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert isinstance(model.blocks[0].adaLN_modulation[1], torch.nn.Linear)


def test_optional_layers_overrides_and_attention_quantizers():
    model = tiny_dit()
    config = QuantConfig(
        layers=LayerSelection(blocks=True, adaln=True, final_layer=True),
        overrides={"blocks.0.*": LayerOverride(keep=True), "*.fc2": LayerOverride(wbits=4)},
        attn_bits=8,
    )
    wrap_layers(model, config)
    names = set(quantized_layers(model))
    assert "blocks.1.adaLN_modulation.1" in names and "final_layer.linear" in names
    assert not any(n.startswith("blocks.0.") for n in names)
    assert model.get_submodule("blocks.1.mlp.fc2").weight_quantizer.spec.bits == 4
    assert (
        isinstance(model.blocks[1].attn.q_act, Quantizer) and model.blocks[1].attn.explicit_matmuls
    )
    assert "blocks.1.attn.attn_act" in activation_quantizers(model)


def test_w16a16_is_the_float_model(calib):
    model, reference = tiny_dit(), tiny_dit()
    run_unpacked(METHODS["rtn"], model, RTNConfig(wbits=16, abits=16), calib)
    x, t, y = _inputs()
    torch.testing.assert_close(model(x, t, y), reference(x, t, y))


def test_static_ranges_are_the_min_max_of_the_calibration_inputs(calib):
    model = tiny_dit()
    seen = {}

    def remember(module, args):
        x = args[0].detach()
        lo, hi = seen.get(module, (x.min(), x.max()))
        seen[module] = (torch.minimum(lo, x.min()), torch.maximum(hi, x.max()))

    handles = [tiny.register_forward_pre_hook(remember) for tiny in [model.blocks[1].mlp.fc2]]
    with torch.no_grad():
        for x, t, y in calib.batches(64):
            model(x, t, y)
    for h in handles:
        h.remove()
    lo, hi = next(iter(seen.values()))
    wrap_layers(model, QuantConfig(wbits=16, abits=8))
    ranges = calibrate_activations(model, calib, progress=False)
    assert ranges["blocks.1.mlp.fc2.act_quantizer"]["min"] == pytest.approx(float(lo), rel=1e-6)
    assert ranges["blocks.1.mlp.fc2.act_quantizer"]["max"] == pytest.approx(float(hi), rel=1e-6)
    quantizer = model.blocks[1].mlp.fc2.act_quantizer
    expected_scale = (max(float(hi), 0) - min(float(lo), 0)) / 255
    assert float(quantizer.scale) == pytest.approx(expected_scale, rel=1e-6)


def test_w8a8_stays_close_and_packing_changes_nothing(calib):
    model, reference = tiny_dit(), tiny_dit()
    run_unpacked(METHODS["rtn"], model, RTNConfig(wbits=8, abits=8, attn_bits=8), calib)
    x, t, y = _inputs()
    with torch.no_grad():
        out, ref = model(x, t, y), reference(x, t, y)
        error = ((out - ref).norm() / ref.norm()).item()
        assert 0 < error < 0.05
        pack_model(model)
        assert all(layer.packed for layer in quantized_layers(model).values())
        torch.testing.assert_close(model(x, t, y), out, rtol=1e-5, atol=1e-5)


def test_static_activations_without_calibration_data_fail():
    with pytest.raises(DitqError, match="pass a calibration set"):
        run_unpacked(METHODS["rtn"], tiny_dit(), RTNConfig(), None)
    model = tiny_dit()
    run_unpacked(METHODS["rtn"], model, RTNConfig(a_dynamic=True, a_granularity="token"), None)
    assert all(isinstance(m, QuantLinear) for m in quantized_layers(model).values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(wbits=1), "bits"),
        (dict(w_granularity="row"), "weight granularity 'row'"),
        (dict(a_granularity="token"), "--a-dynamic"),
        (dict(w_fmt="fp8_e4m3", wbits=4), "fp8"),
    ],
)
def test_unsupported_combinations_fail_early(kwargs, message):
    with pytest.raises(DitqError, match=message):
        QuantConfig(**kwargs)


def test_group_size_that_does_not_divide_names_the_layer():
    with pytest.raises(DitqError, match="blocks.0.attn.qkv"):
        wrap_layers(tiny_dit(), QuantConfig(wbits=4, w_granularity="group", w_group_size=24))
