"""``PerColumnGroup``: groups of g output channels sharing one input column (DiTAS' weight
grouping), against a float64 reference that enumerates every group with explicit indices."""

import json

import numpy as np
import pytest
import torch

from ditq.errors import DitqError
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.steps import wrap_layers
from ditq.quant import (
    PerChannel,
    PerColumnGroup,
    PerGroup,
    Quantizer,
    QuantSpec,
    find_range,
    from_range_groups,
    to_range_groups,
)
from ditq.quant.layers import QuantLinear

from conftest import tiny_dit

SHAPE = (24, 10)  # C_out = 24 rows, C_in = 10 columns
GROUP = 4


def column_group_rows(num_rows, group_size, strided):
    """Row indices of every group of one column, written out by hand."""
    count = num_rows // group_size
    if strided:
        return [[r + i * count for i in range(group_size)] for r in range(count)]
    return [[k * group_size + i for i in range(group_size)] for k in range(count)]


def reference_fake_quant(values, bits, symmetric):
    """Min/max fake quantization of one group in numpy float64 (0 exactly representable)."""
    low, high = min(values.min(), 0.0), max(values.max(), 0.0)
    if symmetric:
        q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale, zero = max(max(-low, high) / q_max, 1e-8), 0.0
    else:
        q_min, q_max = 0, 2**bits - 1
        scale = max((high - low) / q_max, 1e-8)
        zero = float(np.round(-low / scale))
    codes = np.clip(np.round(values / scale) + zero, q_min, q_max)
    return (codes - zero) * scale, scale


def weights(seed=0):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(SHAPE) * rng.uniform(0.1, 5.0, size=(SHAPE[0], 1))
    data[:, 2] = np.abs(data[:, 2]) + 0.3  # a positive-only column: range widened to 0
    data[5, :] = 0.0
    return data


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True), (3, False), (8, False)])
def test_column_groups_match_float64_reference(bits, symmetric, strided):
    data = weights(seed=bits)
    granularity = PerColumnGroup(GROUP, strided=strided)
    quantizer = Quantizer(QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity))
    x = torch.from_numpy(data)
    quantizer.find_params(x)
    output = quantizer(x).numpy()
    expected = np.empty_like(data)
    scales = []
    for rows in column_group_rows(SHAPE[0], GROUP, strided):
        for j in range(SHAPE[1]):
            expected[rows, j], scale = reference_fake_quant(data[rows, j], bits, symmetric)
            scales.append(scale)
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-12)
    # scale[k, j] belongs to group k of column j
    np.testing.assert_allclose(quantizer.scale.flatten().numpy(), scales, rtol=1e-15)
    assert quantizer.scale.shape == (SHAPE[0] // GROUP, SHAPE[1], 1)


@pytest.mark.parametrize("strided", [False, True])
def test_layout_and_inverse(strided):
    granularity = PerColumnGroup(GROUP, strided=strided)
    x = torch.arange(float(np.prod(SHAPE))).reshape(SHAPE)
    groups = to_range_groups(x, granularity)
    assert groups.shape == (SHAPE[0] // GROUP, SHAPE[1], GROUP)
    for k, rows in enumerate(column_group_rows(SHAPE[0], GROUP, strided)):
        assert torch.equal(groups[k, 3], x[rows, 3])
    assert torch.equal(from_range_groups(groups, x.shape, granularity), x)
    # a transposed layout is not undone by a plain reshape
    assert not torch.equal(groups.reshape(SHAPE), x)
    for other in (PerChannel(), PerGroup(5)):
        assert torch.equal(from_range_groups(to_range_groups(x, other), x.shape, other), x)


@pytest.mark.parametrize("strided", [False, True])
def test_codes_round_trip_and_packed_layer_output(strided):
    spec = QuantSpec(bits=4, granularity=PerColumnGroup(GROUP, strided=strided))
    x = torch.from_numpy(weights(seed=3)).float()
    quantizer = Quantizer(spec)
    quantizer.find_params(x)
    stored = quantizer.quantize_codes(x)
    assert stored.shape == (SHAPE[0], SHAPE[1] // 2) and stored.dtype == torch.uint8
    torch.testing.assert_close(quantizer.dequantize_codes(stored), quantizer(x), rtol=0, atol=0)

    layer = QuantLinear(SHAPE[1], SHAPE[0], True, spec, QuantSpec(bits=16))
    layer.weight.data = x.clone()
    layer.calibrate_weight()
    inputs = torch.randn(7, SHAPE[1])
    before = layer(inputs)
    layer.pack()
    torch.testing.assert_close(layer(inputs), before)


@pytest.mark.parametrize("strided", [False, True])
def test_column_scaling_commutes_with_column_group_quantization(strided):
    """Q(W diag(s)) = Q(W) diag(s): a column group lies in one column (why DiTAS groups so)."""
    spec = QuantSpec(bits=4, granularity=PerColumnGroup(GROUP, strided=strided))
    w = torch.from_numpy(weights(seed=4))
    s = torch.exp(torch.from_numpy(np.random.default_rng(0).standard_normal(SHAPE[1])))
    scaled, plain = Quantizer(spec), Quantizer(spec)
    scaled.find_params(w * s)
    plain.find_params(w)
    torch.testing.assert_close(scaled(w * s), plain(w) * s, rtol=1e-12, atol=1e-12)
    group_spec = QuantSpec(bits=4, granularity=PerGroup(5))
    by_input, plain_inputs = Quantizer(group_spec), Quantizer(group_spec)
    by_input.find_params(w * s)
    plain_inputs.find_params(w)
    assert not torch.allclose(by_input(w * s), plain_inputs(w) * s)


def test_find_range_mse_and_percentile_work_per_column_group():
    """Clipped ranges come per column group and lie within the group's [min, max] (widened to 0)."""
    x = torch.from_numpy(weights(seed=5))
    for method in ("mse", "percentile"):
        spec = QuantSpec(bits=4, granularity=PerColumnGroup(GROUP), range_method=method)
        low, high = find_range(x, spec)
        assert low.shape == high.shape == (SHAPE[0] // GROUP, SHAPE[1], 1)
        groups = to_range_groups(x, spec.granularity)
        assert (low >= groups.amin(-1, keepdim=True).clamp(max=0)).all()
        assert (high <= groups.amax(-1, keepdim=True).clamp(min=0)).all()


def test_spec_serialization_description_and_validation():
    for granularity in (PerColumnGroup(32), PerColumnGroup(32, strided=True)):
        spec = QuantSpec(bits=4, granularity=granularity)
        assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert PerColumnGroup(32).describe() == "per-column-group(32)"
    assert QuantSpec(bits=4, granularity=PerColumnGroup(32, strided=True)).describe() == (
        "int4 asym per-column-group(32, strided) minmax"
    )
    assert PerColumnGroup(8) != PerGroup(8)
    with pytest.raises(DitqError, match="PerColumnGroup: group_size=0"):
        PerColumnGroup(0)
    with pytest.raises(DitqError, match="strided must be a bool"):
        PerColumnGroup(8, strided="yes")
    with pytest.raises(DitqError, match="does not divide 20 output channels"):
        to_range_groups(torch.zeros(20, 4), PerColumnGroup(8))


def test_weight_shape_checks_name_the_layer():
    spec = QuantSpec(bits=4, granularity=PerColumnGroup(32))
    spec.check_weight_shape(96, 32)
    with pytest.raises(DitqError, match="does not divide layer 'l' with 48 output channels"):
        spec.check_weight_shape(48, 32, layer="l")
    with pytest.raises(DitqError, match="two per byte.*33 input channels"):
        QuantSpec(bits=4).check_weight_shape(8, 33)
    QuantSpec(bits=8).check_weight_shape(8, 33)  # one code per byte: any width
    with pytest.raises(DitqError, match="blocks.0.attn.qkv"):
        wrap_layers(tiny_dit(), QuantConfig(wbits=4, w_granularity="column_group", w_group_size=64))


@pytest.mark.parametrize(
    ("name", "strided"), [("column_group", False), ("column_group_strided", True)]
)
def test_quant_config_maps_column_group_names(name, strided):
    config = QuantConfig(wbits=4, w_granularity=name, w_group_size=32)
    assert config.weight_spec().granularity == PerColumnGroup(32, strided=strided)
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(DitqError, match="PerColumnGroup: group_size=0"):
        QuantConfig(w_granularity=name, w_group_size=0)
