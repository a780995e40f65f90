"""GPTQ (Frantar et al., ICLR 2023; METHODS.md "Beyond the seeds: GPTQ"): the rounding of
one weight solved column by column against the Hessian of its layer's inputs.

With calibration inputs X (rows = tokens) of a linear, ``H = 2 XᵀX / n`` (accumulated by
:class:`HessianAccumulator`), damped by ``λ = damp · mean(diag H)``. The columns of W are
quantized in order (by decreasing ``diag H`` with ``act_order``) in lazy batches of
``block_size`` columns: for column j, ``q_j = Q(w_j)``, ``e = (w_j − q_j) / [H⁻¹]_jj`` and
the columns not yet quantized absorb the error, ``W_{:,k>j} −= e [H⁻¹]_{j,k>j}``, with
``H⁻¹`` through the upper Cholesky factor of the damped inverse. The result lies on the
weight quantizer's grid, so packing stores exactly these codes.

Ranges. Per tensor and per output channel: the quantizer's calibrated ranges (searched on
the float weight before the solve, as the reference ``find_params(W)``). Per group of g
input channels: fixed when the group's first column is reached, from the columns as
updated so far (the reference's default, with the lazy batch's pending updates applied);
with ``act_order`` the calibrated ranges of the
original weight instead (the reference's ``static_groups``), so that groups stay runs of
consecutive input channels, the format the kernels read.

The inner loop over a lazy batch's columns is a :data:`ColumnSolver`: the torch loop of
:func:`solve_columns`, or on a GPU one Triton kernel per lazy batch
(``ditq.kernels.triton_ops.gptq_columns``, passed in by the pipeline's GPTQ solver, so that
this module needs nothing above ``quant/``).

Deviations from the reference implementation (IST-DASLab/gptq): the range of a group is
found on its columns with every update so far (the reference reads columns whose
in-batch updates are still pending when a group starts inside a lazy batch); input
channels never seen in calibration (``diag H = 0``) keep their weight instead of being
zeroed (they may be live at inference); when the damped Hessian is not positive definite
the damping grows tenfold up to three times before giving up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch

from ditq.errors import DitqError
from ditq.quant.quantizer import (
    MIN_SCALE,
    Quantizer,
    fake_quantize,
    fake_quantize_fp8,
    find_range,
    qparams_from_range,
    range_dtype,
)
from ditq.quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec

DAMP_RETRIES = 3


@dataclass(frozen=True)
class GPTQSettings:
    """``damp``: λ as a fraction of mean(diag H); ``block_size``: columns per lazy batch;
    ``act_order``: quantize columns by decreasing diag H (with static group ranges)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise DitqError(f"GPTQ damping must lie in (0, 1), got {self.damp}; e.g. 0.01")
        if self.block_size < 1:
            raise DitqError(f"GPTQ block size must be positive, got {self.block_size}; e.g. 128")


class HessianAccumulator:
    """Running ``H = 2 XᵀX / n`` over every row (token) of the inputs seen."""

    def __init__(self) -> None:
        self.hessian: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        rows = rows.to(range_dtype(rows.dtype))
        if self.hessian is None:
            self.hessian = torch.zeros(
                rows.shape[1], rows.shape[1], dtype=rows.dtype, device=rows.device
            )
        total = self.rows + len(rows)
        self.hessian.mul_(self.rows / total).addmm_(rows.T, rows, alpha=2 / total)
        self.rows = total

    def result(self) -> torch.Tensor:
        if self.hessian is None:
            raise DitqError("no calibration inputs reached this layer; GPTQ needs its inputs")
        return self.hessian


def supports_gptq(quantizer: Quantizer) -> bool:
    """GPTQ solves static int or FP8 weights per tensor, channel or group of inputs."""
    spec = quantizer.spec
    return spec.needs_calibration and isinstance(
        spec.granularity, (PerTensor, PerChannel, PerGroup)
    )


def _upper_inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + λI)⁻¹``, λ = damp · mean(diag H)."""
    eye = torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    for attempt in range(DAMP_RETRIES + 1):
        lam = damp * 10**attempt * hessian.diagonal().mean()
        factor, info = torch.linalg.cholesky_ex(hessian + lam * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise DitqError(
        "the layer's input Hessian is not positive definite even with 1000x the damping; "
        "the calibration inputs may be degenerate (too few, or constant)"
    )


class _ColumnGrid:
    """The quantizer's step and zero point of each weight element, column by column."""

    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer, self.spec = quantizer, quantizer.spec

    def set_group_range(self, group: int, columns: torch.Tensor) -> None:
        """Fix group ``group``'s ranges from ``columns`` (rows, g), as they are now."""
        scale, zero = qparams_from_range(*find_range(columns, self.spec), self.spec)
        self.quantizer.scale[:, group] = scale[:, 0].to(self.quantizer.scale.dtype)
        self.quantizer.zero_point[:, group] = zero[:, 0].to(self.quantizer.zero_point.dtype)

    def columns(
        self, indices: torch.Tensor, rows: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point (rows, len(indices)) of the original input columns
        ``indices``, as the ranges are now (broadcast views)."""
        granularity = self.spec.granularity
        scale, zero = self.quantizer.scale, self.quantizer.zero_point
        if isinstance(granularity, PerTensor):
            scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
        elif isinstance(granularity, PerChannel):
            scale, zero = scale[:, :1], zero[:, :1]
        else:
            groups = indices // granularity.group_size
            scale, zero = scale[:, groups, 0], zero[:, groups, 0]
        shape = (rows, len(indices))
        return scale.to(dtype).clamp(min=MIN_SCALE).expand(shape), zero.to(dtype).expand(shape)


@dataclass
class LazyBatch:
    """One lazy batch of B columns of GPTQ's loop, solved in place: ``block`` (rows, B),
    the columns as updated so far; ``hinv`` (B, B), the batch's part of the upper factor of
    ``H⁻¹``; ``scale`` and ``zero`` (rows, B), each element's step and zero point;
    ``quantized`` and ``errors`` (rows, B), what the solve writes."""

    block: torch.Tensor
    hinv: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    quantized: torch.Tensor
    errors: torch.Tensor


ColumnSolver = Callable[[LazyBatch, QuantSpec, int, int], None]
"""``solve(batch, spec, first, last)``: the columns ``first`` to ``last - 1`` of a lazy
batch (:func:`solve_columns`)."""


def solve_columns(batch: LazyBatch, spec: QuantSpec, first: int, last: int) -> None:
    """GPTQ's inner loop over columns ``first`` to ``last - 1`` of a lazy batch, in place:
    ``q_j = Q(w_j)`` with column j's steps and zero points, into ``quantized``;
    ``e = (w_j − q_j) / [H⁻¹]_jj`` into ``errors``; the block's columns from j on absorb
    ``e [H⁻¹]_{j,k≥j}`` (module docstring). Rows are independent, which the fused kernel of
    the CUDA backend uses (``ditq.kernels``)."""
    block, hinv = batch.block, batch.hinv
    for i in range(first, last):
        value = block[:, i]
        if spec.fmt == "fp8_e4m3":
            q = fake_quantize_fp8(value, batch.scale[:, i])
        else:
            q = fake_quantize(value, batch.scale[:, i], batch.zero[:, i], spec.bits, spec.symmetric)
        batch.quantized[:, i] = q
        error = (value - q) / hinv[i, i]
        block[:, i:] -= error[:, None] * hinv[i, i:][None, :]
        batch.errors[:, i] = error


def _segments(start: int, stop: int, group_size: int | None) -> list[tuple[int, int]]:
    """The runs of columns of the lazy batch ``[start, stop)`` (relative to it) between
    group starts (one run without ``group_size``)."""
    cuts = [0, stop - start]
    if group_size is not None:
        cuts[1:1] = [c - start for c in range(start + 1, stop) if c % group_size == 0]
    return list(pairwise(cuts))


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: Quantizer,
    settings: GPTQSettings,
    solve: ColumnSolver = solve_columns,
) -> torch.Tensor:
    """GPTQ's ``Q(W)`` for ``weight`` (C_out, C_in) with input Hessian ``hessian``
    (C_in, C_in) and the calibrated weight ``quantizer``, whose group ranges it fixes
    (module docstring); ``solve`` runs the columns of each lazy batch. Returns grid values
    in the weight's dtype, computed in float64 for float64 weights, else float32."""
    if not supports_gptq(quantizer) or not quantizer.calibrated:
        raise DitqError(
            f"GPTQ solves calibrated static weights per tensor, channel or group of input "
            f"channels; got {quantizer.spec.describe()} (use --w-granularity channel or group)"
        )
    dtype = range_dtype(weight.dtype)
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype=dtype, device=w.device).clone()
    rows, columns = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    order = (
        torch.argsort(h.diagonal(), descending=True, stable=True)
        if settings.act_order
        else torch.arange(columns, device=w.device)
    )
    w, h = w[:, order], h[order][:, order]
    hinv = _upper_inverse_cholesky(h, settings.damp)
    grid = _ColumnGrid(quantizer)
    granularity = quantizer.spec.granularity
    dynamic = isinstance(granularity, PerGroup) and not settings.act_order
    size = granularity.group_size if dynamic else None
    original = order.to(quantizer.scale.device)
    q = torch.zeros_like(w)
    for start in range(0, columns, settings.block_size):
        stop = min(start + settings.block_size, columns)
        block = w[:, start:stop].clone()
        batch = LazyBatch(
            block,
            hinv[start:stop, start:stop].contiguous(),
            torch.empty_like(block),
            torch.empty_like(block),
            q[:, start:stop],
            torch.zeros_like(block),
        )
        for first, last in _segments(start, stop, size):
            column = start + first
            if dynamic and column % size == 0:
                beyond = slice(stop, stop + max(0, size - (stop - column)))
                later = w[:, beyond] - batch.errors[:, :first] @ hinv[start:column, beyond]
                grid.set_group_range(
                    column // size, torch.cat([block[:, first:], later], dim=1)[:, :size]
                )
            # the run's steps and zero points, from the ranges as fixed by now
            run = original[column : start + last]
            batch.scale[:, first:last], batch.zero[:, first:last] = grid.columns(run, rows, dtype)
            solve(batch, quantizer.spec, first, last)
        w[:, stop:] -= batch.errors @ hinv[start:stop, stop:]
    return q[:, torch.argsort(order)].to(weight.dtype)
