"""Training-free low-rank weight module (METHODS.md, DiTAS): a 16-bit rank-r branch ``L R``
that absorbs what the quantizer loses, found by alternating quantization and truncated SVD.

Starting from ``L R = 0``, each of ``iters`` alternations does

    Q      ← quant(W − L R)         (the quantizer recalibrated on W − L R)
    (L, R) ← rank-r SVD of (W − Q)  with L = U √S, R = √S Vᵀ

The layer then holds the float weight ``W − L R`` (what its weight quantizer quantizes) and
the branch (:meth:`ditq.quant.layers.QuantLinear.set_lowrank`), and computes
``Q(W − L R) x + L (R x)``.
"""

from __future__ import annotations

import torch

from ditq.errors import DitqError
from ditq.quant.quantizer import Quantizer, range_dtype


def rank_r_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation ``L R`` of ``matrix`` (Eckart–Young) as
    ``L = U_r √S_r`` (out, r) and ``R = √S_r V_rᵀ`` (r, in), from the thin SVD."""
    u, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = singular[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def quantize_residual(
    weight: torch.Tensor, quantizer: Quantizer, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """``Q(W − L R)`` with ``quantizer`` (re)calibrated on ``W − L R`` when it is static."""
    residual = weight - up @ down
    if quantizer.spec.needs_calibration:
        quantizer.find_params(residual)
    return quantizer(residual)


@torch.no_grad()
def lowrank_quantize(
    weight: torch.Tensor, quantizer: Quantizer, rank: int, iters: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiTAS' low-rank module for ``weight`` (C_out, C_in): ``iters`` alternations of
    ``Q ← quant(W − L R)`` and ``(L, R) ← rank-r SVD of (W − Q)`` (see the module docstring).

    Returns ``(up L (C_out, r), down R (r, C_in))`` in the weight's dtype, on its device;
    computed in float64 for float64 weights, else float32. ``quantizer`` is left calibrated
    on the final ``W − L R``, so ``quantizer(W − L R) + L R`` is the reconstruction. With a
    16-bit (disabled) quantizer ``Q = W − L R`` and the branch is zero.
    """
    if weight.dim() != 2:
        raise DitqError(f"lowrank_quantize takes a 2-D weight, got shape {tuple(weight.shape)}")
    full_rank = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise DitqError(
            f"low-rank rank {rank!r} is not an int in 1..{full_rank} for a weight of shape "
            f"{tuple(weight.shape)}; pick e.g. 32 (DiTAS), or switch the branch off"
        )
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise DitqError(f"low-rank iterations must be a positive int, got {iters!r}; e.g. 10")
    w = weight.detach().to(range_dtype(weight.dtype))
    up = w.new_zeros(w.shape[0], rank)
    down = w.new_zeros(rank, w.shape[1])
    for _ in range(iters):
        up, down = rank_r_factors(w - quantize_residual(w, quantizer, up, down), rank)
    if quantizer.spec.needs_calibration:
        quantizer.find_params(w - up @ down)
    return up.to(weight.dtype), down.to(weight.dtype)
