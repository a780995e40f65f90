"""Fake quantization, range search and ``Quantizer``, against float64 references written here.

The reference enumerates the elements of each range group with explicit indexing (not the
library's reshaping helper) and quantizes each group in numpy float64.
"""

import math

import numpy as np
import pytest
import torch

from ditq.errors import DitqError
from ditq.quant import (
    FP8_E4M3_MAX,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    Quantizer,
    QuantSpec,
    compute_qparams,
    fake_quantize,
    find_range,
    quantize,
    storage_dtype_for,
    to_range_groups,
)
from ditq.quant.spec import integer_range

GROUP = 8
WEIGHT_SHAPE = (6, 32)
ACTIVATION_SHAPE = (2, 3, 16)


def reference_qparams(low, high, bits, symmetric):
    """Step size, zero point and code range for [low, high], widened to contain 0."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return max(max(-low, high) / q_max, 1e-8), 0.0, q_min, q_max
    q_min, q_max = 0, 2**bits - 1
    scale = max((high - low) / q_max, 1e-8)
    return scale, float(round(-low / scale)), q_min, q_max


def reference_fake_quant(values, low, high, bits, symmetric):
    """Codes, dequantized values and step size of one range group (numpy float64)."""
    scale, zero, q_min, q_max = reference_qparams(low, high, bits, symmetric)
    codes = np.clip(np.round(values / scale) + zero, q_min, q_max)
    return codes, (codes - zero) * scale, scale


def group_indices(shape, granularity):
    """Index of every range group, enumerated explicitly."""
    if isinstance(granularity, PerTensor):
        return [...]
    if isinstance(granularity, PerChannel):
        return [(i,) for i in range(shape[0])]
    if isinstance(granularity, PerGroup):
        size = granularity.group_size
        return [
            (i, slice(j * size, (j + 1) * size))
            for i in range(shape[0])
            for j in range(shape[1] // size)
        ]
    return [(b, n) for b in range(shape[0]) for n in range(shape[1])]


def sample_data(shape, seed):
    """Gaussian data with row offsets (asymmetric ranges), a positive-only row (range
    widened to 0) and exact zeros (must be reproduced exactly)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape) * rng.uniform(0.2, 3.0, size=shape[:-1] + (1,))
    data += rng.uniform(-1.0, 1.0, size=shape[:-1] + (1,))
    data.reshape(-1, shape[-1])[0] = np.abs(data.reshape(-1, shape[-1])[0]) + 0.5
    data[..., 3] = 0.0
    return data


SPECS = [
    pytest.param(
        bits, symmetric, granularity, id=f"{bits}b-{'sym' if symmetric else 'asym'}-{name}"
    )
    for bits in (2, 3, 4, 8)
    for symmetric in (True, False)
    for name, granularity in (
        ("tensor", PerTensor()),
        ("channel", PerChannel()),
        ("group", PerGroup(GROUP)),
        ("token", PerToken()),
    )
]


@pytest.mark.parametrize(("bits", "symmetric", "granularity"), SPECS)
def test_every_mode_matches_float64_reference(bits, symmetric, granularity):
    dynamic = isinstance(granularity, PerToken)
    shape = ACTIVATION_SHAPE if dynamic else WEIGHT_SHAPE
    data = sample_data(shape, seed=bits)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, dynamic=dynamic)
    x = torch.from_numpy(data)

    quantizer = Quantizer(spec)
    if not dynamic:
        quantizer.find_params(x)
    output = quantizer(x).numpy()
    scale, zero_point = compute_qparams(*find_range(x, spec), bits, symmetric)
    codes = quantize(to_range_groups(x, granularity), scale, zero_point, bits, symmetric)
    codes = codes.reshape(shape).numpy().astype(np.int64)

    q_min, q_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert codes.min() >= q_min and codes.max() <= q_max
    reference_scales = []
    for index in group_indices(shape, granularity):
        values = data[index]
        ref_codes, ref_output, ref_scale = reference_fake_quant(
            values, values.min(), values.max(), bits, symmetric
        )
        reference_scales.append(ref_scale)
        np.testing.assert_array_equal(codes[index], ref_codes)
        np.testing.assert_allclose(output[index], ref_output, rtol=0, atol=1e-12)
        assert np.abs(output[index] - values).max() <= ref_scale / 2 * (1 + 1e-9)
    np.testing.assert_allclose(scale.flatten().numpy(), reference_scales, rtol=1e-15)
    assert (output[..., 3] == 0.0).all(), "zero must be exactly representable"
    if not dynamic:
        assert quantizer.scale.shape == quantizer.zero_point.shape == scale.shape


@pytest.mark.parametrize(
    ("granularity", "shape", "scale_shape"),
    [
        (PerTensor(), (6, 32), (1, 1)),
        (PerTensor(), (2, 5, 32), (1, 1)),
        (PerChannel(), (6, 32), (6, 1)),
        (PerGroup(8), (6, 32), (6, 4, 1)),
        (PerToken(), (2, 5, 32), (10, 1)),
    ],
)
def test_range_group_layout(granularity, shape, scale_shape):
    x = torch.randn(shape)
    dynamic = isinstance(granularity, PerToken)
    x_min, x_max = find_range(x, QuantSpec(granularity=granularity, dynamic=dynamic))
    assert x_min.shape == x_max.shape == scale_shape
    assert torch.equal(to_range_groups(x, granularity).reshape(shape), x)


def test_static_per_tensor_activation_works_for_any_shape():
    calibration = torch.from_numpy(sample_data((4, 16, 32), seed=1))
    quantizer = Quantizer(QuantSpec(bits=8))
    quantizer.find_params(calibration)
    low, high = calibration.min().item(), calibration.max().item()
    for shape in ((2, 7, 32), (5, 32), (3, 4, 5, 6)):
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape))
        _, expected, _ = reference_fake_quant(x.numpy(), low, high, 8, False)
        np.testing.assert_allclose(quantizer(x).numpy(), expected, rtol=0, atol=1e-12)


def test_output_keeps_input_dtype_and_scale_is_float32():
    weight = torch.randn(8, 16, dtype=torch.bfloat16)
    quantizer = Quantizer(QuantSpec(bits=4, granularity=PerChannel()))
    quantizer.find_params(weight)
    assert quantizer.scale.dtype == torch.float32
    assert quantizer(weight).dtype == torch.bfloat16


def fp8_e4m3_table():
    """All finite float8_e4m3fn values, decoded from their bit patterns in float64."""
    values = set()
    for byte in range(256):
        sign = -1.0 if byte >> 7 else 1.0
        exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
        if exponent == 15 and mantissa == 7:
            continue  # NaN
        if exponent == 0:
            values.add(sign * mantissa / 8 * 2.0**-6)
        else:
            values.add(sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return np.array(sorted(values))


def test_fp8_values_are_nearest_e4m3_numbers_times_scale():
    table = fp8_e4m3_table()
    assert len(table) == 253 and table.max() == 448.0
    rng = np.random.default_rng(0)
    data = rng.standard_normal((4, 256)) * np.exp(rng.uniform(-8, 2, size=(4, 256)))
    x = torch.from_numpy(data).requires_grad_()
    quantizer = Quantizer(QuantSpec(fmt="fp8_e4m3", symmetric=True, granularity=PerChannel()))
    quantizer.find_params(x)
    output = quantizer(x)
    output.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)), "no element is clipped at amax / 448"
    output = output.detach().numpy()
    for row, row_output in zip(data, output, strict=True):
        scale = np.abs(row).max() / 448
        nearest = table[np.abs(row[:, None] / scale - table[None, :]).argmin(axis=1)]
        np.testing.assert_allclose(row_output, nearest * scale, rtol=1e-15, atol=0)
        normal = np.abs(row) >= 2.0**-6 * scale
        error = np.abs(row_output - row)
        assert (error[normal] <= 2.0**-4 * np.abs(row[normal]) * (1 + 1e-12)).all()
        assert (error[~normal] <= 2.0**-10 * scale * (1 + 1e-12)).all()
        assert np.abs(row_output).max() == pytest.approx(np.abs(row).max(), rel=1e-15)
    assert quantizer.quantize_codes(x.detach()).dtype == storage_dtype_for(8, True, "fp8_e4m3")


def test_fp8_clamps_values_outside_the_calibrated_range():
    quantizer = Quantizer(QuantSpec(fmt="fp8_e4m3", symmetric=True))
    quantizer.set_range(-1.0, 1.0)
    x = torch.tensor([-3.0, -1.0, 0.5, 2.0], requires_grad=True)
    output = quantizer(x)
    output.sum().backward()
    assert output.tolist() == [-1.0, -1.0, 0.5, 1.0]
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert FP8_E4M3_MAX == 448.0


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel()])
def test_percentile_range_equals_numpy(granularity):
    data = np.random.default_rng(0).standard_normal((3, 1001)) ** 3
    spec = QuantSpec(granularity=granularity, range_method="percentile", percentile=99.9)
    x_min, x_max = find_range(torch.from_numpy(data), spec)
    rows = data.reshape(1, -1) if isinstance(granularity, PerTensor) else data
    np.testing.assert_allclose(x_max.flatten(), np.percentile(rows, 99.9, axis=1), rtol=1e-12)
    np.testing.assert_allclose(x_min.flatten(), np.percentile(rows, 0.1, axis=1), rtol=1e-12)


def test_percentile_handles_more_than_16m_elements():
    data = torch.randn(2**24 + 6, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(range_method="percentile", percentile=99.9)
    x_min, x_max = find_range(data, spec)
    values = data.numpy().astype(np.float64)
    assert x_max.item() == pytest.approx(np.percentile(values, 99.9), rel=1e-6)
    assert x_min.item() == pytest.approx(np.percentile(values, 0.1), rel=1e-6)


@pytest.mark.parametrize(("symmetric", "norm"), [(False, 2.0), (True, 2.0), (False, 2.4)])
def test_mse_search_clips_planted_outlier_like_brute_force(symmetric, norm):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((4, 256))
    data[np.arange(4), rng.integers(0, 256, size=4)] = [25.0, -30.0, 18.0, 40.0]
    spec = QuantSpec(
        bits=4,
        symmetric=symmetric,
        granularity=PerChannel(),
        range_method="mse",
        mse_norm=norm,
    )
    x_min, x_max = find_range(torch.from_numpy(data), spec)
    for row, low, high in zip(
        data, x_min.flatten().tolist(), x_max.flatten().tolist(), strict=True
    ):

        def error(lo, hi, row=row):
            return (np.abs(reference_fake_quant(row, lo, hi, 4, symmetric)[1] - row) ** norm).sum()

        grid = [error(r * row.min(), r * row.max()) for r in np.linspace(1.0, 0.2, 80)]
        assert error(low, high) == pytest.approx(min(grid), rel=1e-9)
        assert min(grid) < error(row.min(), row.max())
        assert max(abs(low), abs(high)) < np.abs(row).max(), "the outlier is clipped"


def test_mse_search_is_exact_minmax_with_one_ratio():
    data = torch.randn(5, 64, dtype=torch.float64)
    spec = QuantSpec(granularity=PerChannel(), range_method="mse", mse_grid=1)
    for got, expected in zip(find_range(data, spec), torch.aminmax(data, dim=1), strict=True):
        assert torch.equal(got.flatten(), expected)


def test_straight_through_gradient_of_input():
    quantizer = Quantizer(QuantSpec(bits=8))
    quantizer.set_range(-1.0, 1.0)
    inside = torch.linspace(-0.9, 0.9, 41)
    outside = torch.cat([torch.linspace(-3.0, -1.1, 10), torch.linspace(1.1, 3.0, 10)])
    x = torch.cat([inside, outside]).requires_grad_()
    quantizer(x).sum().backward()
    assert torch.equal(x.grad[:41], torch.ones(41))
    assert torch.equal(x.grad[41:], torch.zeros(20))


def test_learned_scale_gets_lsq_gradient():
    bits, q_min, q_max = 4, -8, 7
    data = np.random.default_rng(2).standard_normal(1000) * 0.6
    quantizer = Quantizer(QuantSpec(bits=bits, symmetric=True))
    quantizer.set_range(
        torch.tensor(-1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    )
    scale = quantizer.enable_learning()
    assert isinstance(scale, torch.nn.Parameter) and quantizer.learning
    assert "learned scale" in repr(quantizer)
    quantizer(torch.from_numpy(data)).sum().backward()

    step = 1.0 / q_max
    scaled = data / step
    rounded = np.round(scaled)
    clipped_codes = np.clip(rounded, q_min, q_max)
    expected = np.where(rounded == clipped_codes, rounded - scaled, clipped_codes).sum()
    assert scale.grad.item() == pytest.approx(expected, rel=1e-9)

    optimizer = torch.optim.SGD([scale], lr=1e-4)
    before = quantizer(torch.from_numpy(data)).detach()
    optimizer.step()
    assert not torch.equal(quantizer(torch.from_numpy(data)).detach(), before)
    quantizer.disable_learning()
    assert not quantizer.learning and "scale" in dict(quantizer.named_buffers())


def test_fake_quantize_function_passes_gradient_to_scale_parameter():
    scale = torch.nn.Parameter(torch.tensor(0.1))
    x = torch.tensor([0.26, -0.33, 5.0])
    fake_quantize(x, scale, torch.tensor(0.0), bits=4, symmetric=True).sum().backward()
    # LSQ: round(x/s) - x/s inside the range, the clamped code (7) outside.
    assert scale.grad.item() == pytest.approx((3 - 2.6) + (-3 + 3.3) + 7, rel=1e-5)


def test_bits_16_is_identity():
    x = torch.randn(3, 4)
    quantizer = Quantizer(QuantSpec(bits=16))
    assert quantizer(x) is x
    assert "16-bit (not quantized)" in repr(quantizer)
    with pytest.raises(DitqError, match="needs_calibration"):
        quantizer.find_params(x)
    with pytest.raises(DitqError, match="quantize_codes applies to static quantizers"):
        quantizer.quantize_codes(x)


def test_usage_errors_are_helpful():
    uncalibrated = Quantizer(QuantSpec(bits=8))
    assert "uncalibrated" in repr(uncalibrated)
    with pytest.raises(DitqError, match=r"not calibrated; call find_params\(x\) or set_range"):
        uncalibrated(torch.randn(4))
    with pytest.raises(DitqError, match="not calibrated"):
        uncalibrated.enable_learning()
    dynamic = Quantizer(QuantSpec(granularity=PerToken(), dynamic=True))
    with pytest.raises(DitqError, match="set_range applies to static quantizers"):
        dynamic.set_range(-1.0, 1.0)
    per_channel = Quantizer(QuantSpec(granularity=PerChannel()))
    per_channel.find_params(torch.randn(6, 32))
    with pytest.raises(DitqError, match=r"scales of shape \(6, 1\)"):
        per_channel(torch.randn(5, 32))
    grouped = Quantizer(QuantSpec(granularity=PerGroup(12)))
    with pytest.raises(DitqError, match=r"group size 12 \(--w-group-size\) does not divide 32"):
        grouped.find_params(torch.randn(6, 32))
    with pytest.raises(DitqError, match="takes a QuantSpec"):
        Quantizer({"bits": 8})  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_storage_round_trip(bits, symmetric):
    weight = torch.randn(6, 32)
    quantizer = Quantizer(QuantSpec(bits=bits, symmetric=symmetric, granularity=PerGroup(8)))
    quantizer.find_params(weight)
    stored = quantizer.quantize_codes(weight)
    assert stored.dtype == storage_dtype_for(bits, symmetric)
    assert stored.shape == ((6, 16) if bits <= 4 else (6, 32))
    assert torch.equal(quantizer.dequantize_codes(stored), quantizer(weight))


def test_state_dict_round_trip_restores_calibrated_shapes():
    weight = torch.randn(6, 32)
    calibrated = Quantizer(QuantSpec(bits=4, granularity=PerGroup(8)))
    calibrated.find_params(weight)
    restored = Quantizer(QuantSpec(bits=4, granularity=PerGroup(8)))
    restored.load_state_dict(calibrated.state_dict())
    assert restored.scale.shape == (6, 4, 1)
    assert torch.equal(restored(weight), calibrated(weight))


def test_dynamic_per_token_ranges_follow_each_input():
    quantizer = Quantizer(QuantSpec(bits=8, granularity=PerToken(), dynamic=True))
    small, large = torch.randn(1, 2, 16) * 1e-3, torch.randn(1, 2, 16) * 1e3
    for x in (small, large):
        step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 255
        assert ((quantizer(x) - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert math.isclose(quantizer(torch.zeros(2, 4)).abs().sum().item(), 0.0)


def _numpy_percentile_search(row: np.ndarray, bits: int) -> tuple[float, float]:
    """The official PTQ4DiT / Q-Diffusion "mse" search, written with numpy in float64:
    of the ranges [P(100-p), P(p)] (widened to contain 0), p in 99.9, 99.99, 99.999, the
    one with the smallest squared error of asymmetric rounding to nearest."""
    best = None
    for p in (99.9, 99.99, 99.999):
        low, high = np.percentile(row, [100 - p, p])
        lo, hi = min(low, 0.0), max(high, 0.0)
        scale = max((hi - lo) / (2**bits - 1), 1e-8)
        zero = np.round(-lo / scale)
        codes = np.clip(np.round(row / scale) + zero, 0, 2**bits - 1)
        error = np.sum(((codes - zero) * scale - row) ** 2)
        if best is None or error < best[0]:
            best = (error, low, high)
    return best[1], best[2]


@pytest.mark.parametrize("bits", [4, 8])
def test_percentile_search_matches_a_numpy_reference(bits):
    rng = np.random.default_rng(bits)
    rows = rng.standard_t(2.5, size=(8, 20_000)) * rng.uniform(0.1, 3.0, size=(8, 1))
    rows[3, :40] *= 50  # a heavy tail: a lower percentile should win for some rows
    spec = QuantSpec(bits=bits, granularity=PerChannel(), range_method="percentile_search")
    low, high = find_range(torch.from_numpy(rows), spec)
    expected = np.array([_numpy_percentile_search(row, bits) for row in rows])
    np.testing.assert_allclose(low.numpy().ravel(), expected[:, 0], rtol=1e-10)
    np.testing.assert_allclose(high.numpy().ravel(), expected[:, 1], rtol=1e-10)
    chosen = {round(float(h), 12) for h in high.ravel()}
    assert len(chosen) == 8  # one range per channel
    tensor = QuantSpec(bits=bits, range_method="percentile_search")
    t_low, t_high = find_range(torch.from_numpy(rows), tensor)
    np.testing.assert_allclose(
        [t_low.item(), t_high.item()], _numpy_percentile_search(rows.ravel(), bits), rtol=1e-10
    )


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_step_size_is_the_range_times_the_fp32_reciprocal_of_the_levels(bits, symmetric):
    """Δ = range · fl32(1 / n), bit for bit (numpy float32): the product torch computes for
    ``range / n`` on CUDA and in compiled code and the Triton kernels compute, so that every
    path finds the same Δ. The largest value is never beyond the top level: on it, or one
    below where an asymmetric zero point rounds down."""
    rng = np.random.default_rng(bits)
    x_max = rng.uniform(1e-3, 50, 4096).astype(np.float32)
    x_min = -(x_max * rng.uniform(0.2, 1.0, 4096).astype(np.float32))
    scale, zero = compute_qparams(torch.from_numpy(x_min), torch.from_numpy(x_max), bits, symmetric)
    q_max = integer_range(bits, symmetric)[1]
    value_range = np.maximum(-x_min, x_max) if symmetric else x_max - x_min
    expected = value_range * (np.float32(1) / np.float32(q_max))
    assert scale.dtype == torch.float32
    np.testing.assert_array_equal(scale.numpy(), expected)
    top = torch.round(torch.from_numpy(x_max) / scale) + zero
    assert (top <= q_max).all() and (top >= q_max - 1).all()
