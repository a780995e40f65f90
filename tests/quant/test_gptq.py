"""GPTQ against a straightforward float64 reference: the original optimal-brain-quantizer
update, one column at a time with the explicit inverse Hessian (no Cholesky, no lazy
batches), group ranges fixed at each group's first column from the columns as updated."""

import pytest
import torch

from ditq.errors import DitqError
from ditq.quant.gptq import GPTQSettings, HessianAccumulator, gptq_quantize
from ditq.quant.quantizer import Quantizer, fake_quantize, find_range, qparams_from_range
from ditq.quant.spec import PerChannel, PerColumnGroup, PerGroup, QuantSpec

ROWS, COLUMNS = 12, 32


def correlated_inputs(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(COLUMNS, COLUMNS, generator=generator, dtype=torch.float64)
    return torch.randn(300, COLUMNS, generator=generator, dtype=torch.float64) @ mix


def weight(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, COLUMNS, generator=generator, dtype=torch.float64)


def column_by_column(w, hessian, spec, damp):
    """The reference: quantize column j, spread its error with row j of H⁻¹, then remove j
    from H⁻¹ by Gaussian elimination."""
    w = w.clone()
    hinv = torch.linalg.inv(hessian + damp * hessian.diagonal().mean() * torch.eye(COLUMNS))
    q = torch.zeros_like(w)
    scale = zero = None
    for j in range(COLUMNS):
        if isinstance(spec.granularity, PerGroup):
            if j % spec.granularity.group_size == 0:
                block = w[:, j : j + spec.granularity.group_size]
                scale, zero = qparams_from_range(*find_range(block, spec), spec)
                scale, zero = scale[:, 0, 0], zero[:, 0, 0]
        elif scale is None:
            scale, zero = qparams_from_range(*find_range(w, spec), spec)
            scale, zero = scale[:, 0], zero[:, 0]
        q[:, j] = fake_quantize(w[:, j], scale, zero, spec.bits, spec.symmetric)
        error = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j:] -= error[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return q


def output_error(w, q, hessian):
    delta = w - q
    return float(torch.trace(delta @ hessian @ delta.T))


def test_hessian_accumulates_two_x_transpose_x_over_all_rows():
    x = correlated_inputs()
    accumulator = HessianAccumulator()
    for chunk in x.split(70):
        accumulator.update(chunk.reshape(-1, 2, COLUMNS) if len(chunk) % 2 == 0 else chunk)
    torch.testing.assert_close(accumulator.result(), 2 * x.T @ x / len(x))


@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(8)], ids=["channel", "group8"])
@pytest.mark.parametrize("block_size", [5, 128])
def test_gptq_matches_the_column_by_column_reference_and_beats_rtn(granularity, block_size):
    spec = QuantSpec(bits=3, granularity=granularity)
    w, x = weight(), correlated_inputs()
    hessian = 2 * x.T @ x / len(x)
    quantizer = Quantizer(spec)
    quantizer.find_params(w)
    rtn = quantizer(w)
    settings = GPTQSettings(damp=0.01, block_size=block_size, act_order=False)
    solved = gptq_quantize(w, hessian, quantizer, settings)
    torch.testing.assert_close(solved, column_by_column(w, hessian, spec, 0.01))
    assert output_error(w, solved, hessian) < 0.7 * output_error(w, rtn, hessian)
    torch.testing.assert_close(quantizer(solved), solved)  # on the grid: packing keeps it


def test_act_order_keeps_static_groups_and_the_grid():
    spec = QuantSpec(bits=4, symmetric=True, granularity=PerGroup(8))
    w, x = weight(2), correlated_inputs(3)
    hessian = 2 * x.T @ x / len(x)
    quantizer = Quantizer(spec)
    quantizer.find_params(w)
    before = quantizer.scale.clone()
    solved = gptq_quantize(w, hessian, quantizer, GPTQSettings(act_order=True))
    torch.testing.assert_close(quantizer.scale, before)  # ranges of the original weight
    torch.testing.assert_close(quantizer(solved), solved)
    assert output_error(w, solved, hessian) < output_error(w, quantizer(w), hessian)


def test_column_groups_are_refused_with_the_alternatives():
    quantizer = Quantizer(QuantSpec(bits=4, granularity=PerColumnGroup(4)))
    quantizer.find_params(weight())
    with pytest.raises(DitqError, match="--w-granularity channel or group"):
        gptq_quantize(weight(), torch.eye(COLUMNS), quantizer, GPTQSettings())
