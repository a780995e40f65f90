"""DiTAS' training-free low-rank module (METHODS.md): alternating quantization and truncated
SVD, checked against numpy float64 SVD and against plain quantization."""

import numpy as np
import pytest
import torch

from ditq.errors import DitqError
from ditq.quant import PerChannel, PerColumnGroup, Quantizer, QuantSpec
from ditq.quant.lowrank import lowrank_quantize

SPEC = QuantSpec(bits=4, granularity=PerColumnGroup(8, strided=True))


def weight(seed=0, shape=(48, 40)):
    """A float64 weight with a low-rank structure, column outliers and noise."""
    rng = np.random.default_rng(seed)
    low_rank = rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1]))
    data = 0.3 * low_rank + rng.standard_normal(shape)
    data[:, [4, 17]] *= 8.0
    return torch.from_numpy(data)


def reconstruction_error(w, spec, up, down):
    """‖W − (Q(W − L R) + L R)‖_F / ‖W‖_F with Q calibrated on W − L R."""
    quantizer = Quantizer(spec)
    residual = w - up @ down
    quantizer.find_params(residual)
    return float((w - quantizer(residual) - up @ down).norm() / w.norm())


def test_one_alternation_is_the_truncated_svd_of_the_quantization_error():
    w = weight()
    up, down = lowrank_quantize(w, Quantizer(SPEC), rank=5, iters=1)
    assert up.shape == (48, 5) and down.shape == (5, 40) and up.dtype == torch.float64
    quantizer = Quantizer(SPEC)
    quantizer.find_params(w)
    error = (w - quantizer(w)).numpy()
    u, s, vt = np.linalg.svd(error, full_matrices=False)
    np.testing.assert_allclose((up @ down).numpy(), (u[:, :5] * s[:5]) @ vt[:5], atol=1e-10)
    # L = U √S and R = √S Vᵀ: both Gram matrices are diag(S)
    np.testing.assert_allclose((up.T @ up).numpy(), np.diag(s[:5]), atol=1e-10)
    np.testing.assert_allclose((down @ down.T).numpy(), np.diag(s[:5]), atol=1e-10)


def test_alternations_reduce_the_error_below_plain_quantization():
    w = weight(seed=1)
    plain = reconstruction_error(w, SPEC, torch.zeros(48, 1, dtype=w.dtype), 0 * w[:1])
    errors = [
        reconstruction_error(w, SPEC, *lowrank_quantize(w, Quantizer(SPEC), 8, iters))
        for iters in range(1, 11)
    ]
    assert errors[0] < plain
    assert errors[-1] < errors[0] * 0.98
    # Each alternation is a minimization step; recalibrating the ranges may cost a hair.
    assert all(later <= earlier * 1.01 for earlier, later in zip(errors, errors[1:], strict=False))


def test_full_rank_reconstructs_the_weight_and_leaves_the_quantizer_calibrated():
    w = weight(seed=2)
    quantizer = Quantizer(SPEC)
    up, down = lowrank_quantize(w, quantizer, rank=40, iters=2)
    residual = w - up @ down
    assert float((w - quantizer(residual) - up @ down).norm() / w.norm()) < 1e-9
    fresh = Quantizer(SPEC)
    fresh.find_params(residual)
    torch.testing.assert_close(quantizer.scale, fresh.scale, rtol=0, atol=0)


def test_float32_weights_and_16_bit_quantizers():
    w = weight(seed=3).float()
    spec = QuantSpec(bits=4, granularity=PerChannel())
    up, down = lowrank_quantize(w, Quantizer(spec), 4)
    assert up.dtype == down.dtype == torch.float32
    w, up, down = w.double(), up.double(), down.double()
    assert reconstruction_error(w, spec, up, down) < reconstruction_error(w, spec, 0 * up, down)
    up, down = lowrank_quantize(w, Quantizer(QuantSpec(bits=16)), 4)
    assert torch.count_nonzero(up @ down) == 0  # nothing is lost, nothing to absorb


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), "rank 0"),
        (dict(rank=41), "1..40"),
        (dict(rank=4, iters=0), "iterations"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(DitqError, match=message):
        lowrank_quantize(weight(), Quantizer(SPEC), **kwargs)
    with pytest.raises(DitqError, match="2-D"):
        lowrank_quantize(torch.zeros(2, 3, 4), Quantizer(SPEC), 1)
