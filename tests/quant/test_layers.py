import numpy as np
import pytest
import torch
from torch import nn

from ditq.quant import PerChannel, PerGroup, PerTensor, QuantSpec
from ditq.quant.layers import QuantLinear

FLOAT = QuantSpec(bits=16)


def _linear(seed=0, cin=16, cout=8):
    torch.manual_seed(seed)
    return nn.Linear(cin, cout)


def _reference_per_channel_asym(w, bits):
    """Asymmetric per-row min/max quantization written out in float64 numpy."""
    w = w.astype(np.float64)
    out = np.empty_like(w)
    for i, row in enumerate(w):
        lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
        delta = (hi - lo) / (2**bits - 1)
        zero = np.round(-lo / delta)
        q = np.clip(np.round(row / delta) + zero, 0, 2**bits - 1)
        out[i] = (q - zero) * delta
    return out


def test_float_specs_reproduce_the_linear():
    linear = _linear()
    layer = QuantLinear.from_linear(linear, FLOAT, FLOAT)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), linear(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_fake_quant_matches_float64_reference_and_packing_keeps_outputs(bits):
    linear = _linear()
    layer = QuantLinear.from_linear(linear, QuantSpec(bits=bits, granularity=PerChannel()), FLOAT)
    layer.calibrate_weight()
    reference = _reference_per_channel_asym(linear.weight.detach().numpy(), bits)
    np.testing.assert_allclose(layer.quantized_weight().detach().numpy(), reference, atol=1e-6)
    x = torch.randn(4, 16)
    before = layer(x)
    layer.pack()
    assert layer.packed and layer.weight is None
    assert layer.weight_codes.dtype == torch.uint8
    assert layer.weight_codes.shape == ((8, 8) if bits == 4 else (8, 16))  # 4-bit: two per byte
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)


def test_online_input_scale_and_lowrank_branch():
    linear = _linear()
    layer = QuantLinear.from_linear(linear, FLOAT, FLOAT)
    s = torch.rand(16) + 0.5
    up, down = torch.randn(8, 2), torch.randn(2, 16)
    layer.input_scale = s
    layer.set_lowrank(up, down)
    x = torch.randn(6, 16)
    expected = (x / s) @ linear.weight.T + linear.bias + (x / s) @ down.T @ up.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert "low-rank r=2" in repr(layer)


def test_lowrank_factors_are_stored_contiguous():
    """SVD factors arrive as transposed views; stored as such, the branch's matmuls differ
    in the last bit from the contiguous factors a loaded checkpoint holds."""
    layer = QuantLinear.from_linear(_linear(), FLOAT, FLOAT)
    up, down = torch.randn(2, 8).T, torch.randn(16, 2).T
    layer.set_lowrank(up, down)
    assert layer.lowrank_up.is_contiguous() and layer.lowrank_down.is_contiguous()
    assert torch.equal(layer.lowrank_up, up) and torch.equal(layer.lowrank_down, down)


def test_static_activation_quantizer_quantizes_the_input():
    linear = _linear()
    layer = QuantLinear.from_linear(linear, FLOAT, QuantSpec(bits=4, granularity=PerTensor()))
    layer.act_quantizer.set_range(-1.0, 1.0)
    x = torch.linspace(-1, 1, 16).repeat(2, 1)
    delta = 2 / 15
    zero = round(1 / delta)
    xq = (torch.clamp(torch.round(x / delta) + zero, 0, 15) - zero) * delta
    torch.testing.assert_close(layer(x), linear(xq), rtol=1e-5, atol=1e-6)


def test_group_size_must_divide_inputs():
    from ditq.errors import DitqError

    with pytest.raises(DitqError, match="does not divide"):
        QuantLinear.from_linear(_linear(), QuantSpec(bits=4, granularity=PerGroup(5)), FLOAT)


def test_a_compiled_packed_layer_keeps_no_graph_output_on_the_module():
    """A cache written inside a compiled forward holds the graph's output buffer: with CUDA
    graphs the next replay overwrites it and the recompiled graph that reads it fails (a
    DiTAS W4A4 model sampled with ``--compile`` on an H100). Compiled, the packed layer
    dequantizes in the graph, stores nothing and compiles once."""
    from torch._dynamo.testing import CompileCounter

    layer = QuantLinear.from_linear(_linear(), QuantSpec(bits=4, granularity=PerChannel()), FLOAT)
    layer.calibrate_weight()
    layer.pack()
    x = torch.randn(4, 16)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter)
    first, second = compiled(x), compiled(x)
    assert layer._dequantized is None
    assert counter.frame_count == 1
    eager = layer(x)  # eager calls fill the cache
    assert layer._dequantized is not None
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(second, eager, rtol=0, atol=0)
