"""AdaRound: initialisation, soft and hard weights, regularizer, installation on QuantLinear."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import DitqError
from ditq.quant import (
    PerChannel,
    PerGroup,
    PerTensor,
    Quantizer,
    QuantSpec,
    integer_range,
    unpack_codes,
)
from ditq.quant.adaround import (
    AdaRoundWeight,
    adaround,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
    rounding_regularizer,
)
from ditq.quant.layers import QuantLinear

SPECS = {
    "channel-asym-4": QuantSpec(bits=4, granularity=PerChannel()),
    "group-sym-4": QuantSpec(bits=4, symmetric=True, granularity=PerGroup(8)),
    "tensor-asym-3-clipped": QuantSpec(bits=3, range_method="percentile", percentile=90.0),
}
ACT8 = QuantSpec(bits=8)


def _layer(spec, seed=0, cin=32, cout=12):
    torch.manual_seed(seed)
    layer = QuantLinear.from_linear(nn.Linear(cin, cout), spec, QuantSpec(bits=16))
    layer.calibrate_weight()
    return layer


def _grid(layer):
    """``W/Δ`` (divided in float32 as the quantizer does), Δ and z per element in float64,
    and ``(q_min, q_max)``."""
    quantizer = layer.weight_quantizer
    w = layer.weight.detach()
    spec = quantizer.spec
    scale, zero = quantizer.scale, quantizer.zero_point
    if isinstance(spec.granularity, PerGroup):
        g = spec.granularity.group_size
        scale = scale.reshape(w.shape[0], -1).repeat_interleave(g, dim=1)
        zero = zero.reshape(w.shape[0], -1).repeat_interleave(g, dim=1)
    scale, zero = scale.expand_as(w), zero.expand_as(w)
    scaled = (w / scale).double()
    return scaled, scale.double(), zero.double(), integer_range(spec.bits, spec.symmetric)


def test_rectified_sigmoid_inverse_gives_back_the_fraction():
    rest = torch.tensor([0.0, 1e-6, 0.25, 0.5, 0.75, 0.999999], dtype=torch.float64)
    v = inverse_rectified_sigmoid(rest)
    torch.testing.assert_close(rectified_sigmoid(v), rest, rtol=0, atol=1e-12)
    assert abs(float(v[3])) < 1e-12  # h(V) = 0.5 at V = 0
    # the rectification clamps to [0, 1]
    assert rectified_sigmoid(torch.tensor([-30.0, 30.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("name", list(SPECS))
def test_soft_weight_at_init_is_the_clipped_unrounded_weight(name):
    layer = _layer(SPECS[name])
    scaled, scale, zero, (q_min, q_max) = _grid(layer)
    unclipped = scaled + zero
    expected = (unclipped.clamp(q_min, q_max) - zero) * scale  # Δ(clamp(W/Δ + z) - z)
    rounder = AdaRoundWeight(layer.weight, layer.weight_quantizer)
    soft = rounder().double()
    torch.testing.assert_close(soft, expected, rtol=0, atol=1e-5 * float(scale.max()))
    inside = (unclipped >= q_min) & (unclipped <= q_max)
    torch.testing.assert_close(soft[inside], layer.weight.double()[inside], rtol=0, atol=1e-6)
    if "clipped" in name:
        assert (~inside).any()  # the clipping branch is exercised


@pytest.mark.parametrize("name", list(SPECS))
def test_hard_rounding_at_init_is_round_to_nearest(name):
    layer = _layer(SPECS[name], seed=1)
    rtn = layer.quantized_weight().detach()
    rounder = AdaRoundWeight(layer.weight, layer.weight_quantizer)
    assert torch.equal(rounder.hard_weight(), rtn)


@pytest.mark.parametrize("name", list(SPECS))
def test_hardened_weights_lie_on_the_grid_and_pack_round_trips(name):
    layer = _layer(SPECS[name], seed=2)
    scaled, scale, zero, (q_min, q_max) = _grid(layer)
    torch.manual_seed(3)
    with adaround([layer]) as (rounder,):
        rounder.V.data = torch.randn_like(rounder.V) * 3
        up = (rounder.V >= 0).reshape(layer.weight.shape).double()
    assert isinstance(layer.weight_quantizer, Quantizer)
    codes = (torch.floor(scaled) + up + zero).clamp(q_min, q_max)  # float64 reference
    hard = layer.weight.detach().clone()
    torch.testing.assert_close(hard.double(), (codes - zero) * scale, rtol=0, atol=1e-6)
    assert torch.equal(layer.quantized_weight().detach(), hard)  # a fixed point of Q_w
    x = torch.randn(5, 32)
    before = layer(x)
    layer.pack()
    spec = layer.weight_quantizer.spec
    stored = unpack_codes(layer.weight_codes, spec.bits, spec.symmetric).double()
    assert torch.equal(stored, codes)
    assert torch.equal(layer.quantized_weight(), hard)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


@pytest.mark.parametrize(("v", "per_element"), [(-20.0, 0.0), (0.0, 1.0), (20.0, 0.0)])
def test_regularizer_at_h_0_half_and_1(v, per_element):
    layer = _layer(SPECS["channel-asym-4"])
    rounder = AdaRoundWeight(layer.weight, layer.weight_quantizer)
    rounder.V.data.fill_(v)
    assert float(rounder.regularizer(beta=20.0).detach()) == pytest.approx(per_element * 32 * 12)
    # closed form away from the ends: 1 - |2h - 1|^β
    h = torch.tensor([0.25, 0.6])
    expected = (1 - 0.5**3) + (1 - 0.2**3)
    assert float(rounding_regularizer(h, beta=3.0)) == pytest.approx(expected)


def test_forward_uses_the_soft_weight_and_an_exception_restores_the_layer():
    layer = _layer(SPECS["channel-asym-4"])
    layer.act_quantizer = Quantizer(ACT8)
    x = torch.randn(7, 32)
    layer.act_quantizer.find_params(x)
    weight = layer.weight.detach().clone()
    quantizer = layer.weight_quantizer
    with pytest.raises(RuntimeError, match="stop"), adaround([layer]) as (rounder,):
        rounder.V.data += 0.3
        out = layer(x)
        expected = F.linear(layer.act_quantizer(x), rounder(), layer.bias)
        torch.testing.assert_close(out, expected)
        out.sum().backward()
        assert rounder.V.grad is not None and rounder.V.grad.abs().sum() > 0
        raise RuntimeError("stop")
    assert layer.weight_quantizer is quantizer
    assert torch.equal(layer.weight.detach(), weight)


def test_layers_without_integer_static_weights_are_left_alone():
    fp8 = _layer(QuantSpec(bits=8, symmetric=True, fmt="fp8_e4m3", granularity=PerChannel()))
    float_weight = _layer(QuantSpec(bits=16))
    int4 = _layer(QuantSpec(bits=4, granularity=PerTensor()))
    with adaround([fp8, float_weight, int4]) as rounders:
        assert len(rounders) == 1 and isinstance(int4.weight_quantizer, AdaRoundWeight)
        with pytest.raises(DitqError, match="already installed"), adaround([int4]):
            pass
    with pytest.raises(DitqError, match="static integer"):
        AdaRoundWeight(fp8.weight, fp8.weight_quantizer)
    uncalibrated = QuantLinear.from_linear(nn.Linear(8, 4), QuantSpec(bits=4), ACT8)
    with pytest.raises(DitqError, match="calibrate_weight"):
        AdaRoundWeight(uncalibrated.weight, uncalibrated.weight_quantizer)


def test_grid_reference_helper_matches_the_layer_quantizer():
    """The float64 reference of these tests agrees with the layer's own RTN weight."""
    for spec in SPECS.values():
        layer = _layer(spec)
        scaled, scale, zero, (q_min, q_max) = _grid(layer)
        rtn = ((torch.round(scaled) + zero).clamp(q_min, q_max) - zero) * scale
        np.testing.assert_allclose(
            layer.quantized_weight().detach().double().numpy(), rtn.numpy(), atol=1e-6
        )
