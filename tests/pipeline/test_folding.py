"""Folded smoothing leaves the floating-point model unchanged (METHODS.md: the folded FP
model must equal the original to float rounding)."""

import pytest
import torch

from ditq.errors import DitqError
from ditq.models.adapter import adapter_for
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.folding import smooth_layers
from ditq.pipeline.steps import wrap_layers

from conftest import tiny_dit


def _inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 5, (n,), generator=g)  # includes the null class 4
    return x, t, y


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_smoothing_every_layer_of_every_block_is_exact_in_fp32():
    model = tiny_dit(depth=3)
    x, t, y = _inputs()
    with torch.no_grad():
        reference = model(x, t, y)
        wrap_layers(model, QuantConfig(wbits=16, abits=16))
        g = torch.Generator().manual_seed(1)
        for group in adapter_for(model).role_groups(("qkv", "proj", "fc1", "fc2")):
            width = model.get_submodule(group[0]).in_features
            s = torch.exp(torch.randn(width, generator=g))  # factors between ~0.05 and ~20
            smooth_layers(model, group, s)
        out = model(x, t, y)
    assert _relative_error(out, reference) < 1e-5


def test_proj_smoothing_moves_attention_output_channels_into_v_rows():
    model = tiny_dit()
    block = model.blocks[0]
    v_rows_before = block.attn.qkv.weight[64:].clone()
    s = torch.full((32,), 2.0)
    smooth_layers(model, ["blocks.0.attn.proj"], s)
    torch.testing.assert_close(block.attn.qkv.weight[64:], v_rows_before / 2)


def test_layers_without_a_producer_need_a_quantized_layer_and_unknown_layers_fail():
    model = tiny_dit()
    with pytest.raises(DitqError, match="needs a QuantLinear"):
        smooth_layers(model, ["blocks.0.mlp.fc2"], torch.ones(128))
    with pytest.raises(DitqError, match="needs a QuantLinear"):
        smooth_layers(model, ["blocks.0.adaLN_modulation.1"], torch.ones(32))
    with pytest.raises(DitqError, match="do not read one input"):
        smooth_layers(model, ["blocks.0.attn.qkv", "blocks.0.mlp.fc1"], torch.ones(32))
    with pytest.raises(DitqError, match="no layer named"):
        smooth_layers(model, ["blocks.0.attn.nothing"], torch.ones(32))


def test_smoothing_makes_activation_and_weight_maxima_equal_for_alpha_half():
    from ditq.calib.stats import weight_salience
    from ditq.quant.smoothing import smoothing_factor

    act = torch.tensor([100.0, 1.0, 4.0])
    weight = torch.tensor([[0.01, 1.0, 1.0], [0.04, -2.0, 0.25]])
    s = smoothing_factor(act, weight_salience(weight), alpha=0.5)
    # geometric mean sqrt(s(X_j) s(W_j)) for both after X / s and W s
    expected = torch.sqrt(act * weight.abs().amax(0))
    torch.testing.assert_close(act / s, expected)
    torch.testing.assert_close((weight * s).abs().amax(0), expected)
