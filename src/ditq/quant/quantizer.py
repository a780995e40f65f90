"""Fake quantization, range search and the ``Quantizer`` module (METHODS.md, "Uniform quantizers").

Integer format: ``q = clamp(round(x / Δ) + z, q_min, q_max)``, ``x̂ = (q - z) · Δ`` with
``(q_min, q_max)`` from ``integer_range``: symmetric ``[-2^(b-1), 2^(b-1)-1]`` with
``Δ = amax / (2^(b-1)-1)`` and ``z = 0``; asymmetric ``[0, 2^b-1]`` with
``Δ = (max - min) / (2^b-1)`` and ``z = round(-min / Δ)``, the range first widened to
contain 0 so that 0 is exactly representable. FP8 (e4m3) format:
``x̂ = fp8(x / Δ) · Δ`` with ``Δ = amax / 448``.

The integer ``Δ = range / n`` is computed as ``range · (1 / n)``, the reciprocal rounded
once to the range's dtype: what torch computes for ``tensor / n`` on CUDA and in compiled
(Inductor) code, and what ditq's Triton kernels compute, so that the CPU, CUDA, compiled
and kernel paths find the same Δ bit for bit. (A correctly rounded quotient can be one ulp
off it, and a value at an exact tie of ``x / Δ``, common with BF16 inputs, then rounds to the
other level: ``benchmarks/RESULTS.md``, "The W4A4 layers' kernel-check error".) The FP8 Δ
stays a quotient: no kernel computes it, and a product could put the largest value an ulp
beyond 448 Δ, where the straight-through gradient is cut.

Layout. ``to_range_groups`` lays a tensor out so that each range group is one row of the
last axis; every range, scale and zero point is that view reduced over its last axis with
``keepdim``, and ``from_range_groups`` puts a tensor in that layout back into the original
shape. For a weight W (C_out, C_in) and an activation X (..., C):

=================  ==========================  ===========================
granularity        view                         scale / zero_point shape
=================  ==========================  ===========================
PerTensor          (1, numel)                   (1, 1)
PerChannel         (C_out, numel / C_out)       (C_out, 1)
PerGroup(g)        (..., C_in / g, g)           (..., C_in / g, 1)
PerColumnGroup(g)  (C_out / g, C_in, g)         (C_out / g, C_in, 1)
PerToken           (tokens, C)                  (tokens, 1)
=================  ==========================  ===========================

``PerColumnGroup(g)`` views are transposes (element ``[k, j, i]`` is ``W[g·k + i, j]``, or
``W[k + i·C_out/g, j]`` when strided), so only ``from_range_groups`` undoes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ditq.errors import DitqError
from ditq.quant.packing import code_dtype, pack_codes, unpack_codes
from ditq.quant.spec import (
    SEARCHED_PERCENTILES,
    Granularity,
    PerChannel,
    PerColumnGroup,
    PerGroup,
    PerTensor,
    QuantSpec,
    integer_range,
)

MIN_SCALE = 1e-8
FP8_E4M3_MAX = 448.0
MSE_MIN_RATIO = 0.2

TensorPair = tuple[torch.Tensor, torch.Tensor]


def to_range_groups(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """View of ``x`` whose last axis holds the elements sharing one range (see the module
    docstring's table); ``from_range_groups(view, x.shape, granularity)`` undoes it."""
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1)
    if isinstance(granularity, PerChannel):
        return x.reshape(x.shape[0], -1)
    if isinstance(granularity, PerGroup):
        granularity.check_divides(x.shape[-1])
        size = granularity.group_size
        return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
    if isinstance(granularity, PerColumnGroup):
        granularity.check_divides(x.shape[0])
        size, count = granularity.group_size, x.shape[0] // granularity.group_size
        if granularity.strided:
            return x.reshape(size, count, -1).permute(1, 2, 0)
        return x.reshape(count, size, -1).permute(0, 2, 1)
    return x.reshape(-1, x.shape[-1])


def from_range_groups(
    groups: torch.Tensor, shape: torch.Size | tuple[int, ...], granularity: Granularity
) -> torch.Tensor:
    """Inverse of ``to_range_groups``: the tensor of shape ``shape`` laid out as ``groups``."""
    if isinstance(granularity, PerColumnGroup):
        order = (2, 0, 1) if granularity.strided else (0, 2, 1)
        return groups.permute(order).reshape(shape)
    return groups.reshape(shape)


def range_dtype(dtype: torch.dtype) -> torch.dtype:
    """Ranges and scales are computed in float64 for float64 tensors, else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _straight_through(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` in the forward pass, gradient of ``value`` in the backward pass (plain
    ``rounded`` when nothing needs a gradient, e.g. in range search and inference)."""
    if not value.requires_grad:
        return rounded
    return value + (rounded - value).detach()


def _round_straight_through(value: torch.Tensor) -> torch.Tensor:
    return _straight_through(value, torch.round(value))


def compute_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size Δ (at least ``MIN_SCALE``) and zero point z (float holding an integer in
    ``[q_min, q_max]``, 0 if symmetric) for the range ``[x_min, x_max]`` widened to contain 0."""
    x_min = x_min.clamp(max=0)
    x_max = x_max.clamp(min=0)
    reciprocal = 1.0 / integer_range(bits, symmetric)[1]  # Δ as a product (module docstring)
    if symmetric:
        scale = (torch.maximum(-x_min, x_max) * reciprocal).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((x_max - x_min) * reciprocal).clamp(min=MIN_SCALE)
    return scale, torch.round(-x_min / scale)


def compute_fp8_scale(x_min: torch.Tensor, x_max: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 scale ``max(|x_min|, |x_max|) / 448`` (at least ``MIN_SCALE``)."""
    return (torch.maximum(x_min.abs(), x_max.abs()) / FP8_E4M3_MAX).clamp(min=MIN_SCALE)


def qparams_from_range(x_min: torch.Tensor, x_max: torch.Tensor, spec: QuantSpec) -> TensorPair:
    """``(scale, zero_point)`` for ``spec``'s format; FP8 zero points are 0."""
    if spec.fmt == "fp8_e4m3":
        scale = compute_fp8_scale(x_min, x_max)
        return scale, torch.zeros_like(scale)
    return compute_qparams(x_min, x_max, spec.bits, spec.symmetric)


def _clamped_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    symmetric: bool,
    round_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    q_min, q_max = integer_range(bits, symmetric)
    return torch.clamp(round_fn(x / scale) + zero_point, q_min, q_max)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / Δ) + z, q_min, q_max)``: int8 if symmetric, else uint8.
    ``scale`` and ``zero_point`` broadcast against ``x`` (lay ``x`` out with
    ``to_range_groups``)."""
    codes = _clamped_codes(x, scale, zero_point, bits, symmetric, torch.round)
    return codes.to(code_dtype(symmetric))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - z) · Δ`` in the dtype of ``scale`` (integer or FP8 codes)."""
    return (codes.to(scale.dtype) - zero_point) * scale


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """``(clamp(round(x / Δ) + z, q_min, q_max) - z) · Δ`` with a straight-through round:
    d/dx is 1 inside the range and 0 where clamped, and ``scale`` gets the LSQ gradient."""
    codes = _clamped_codes(x, scale, zero_point, bits, symmetric, _round_straight_through)
    return (codes - zero_point) * scale


def _fp8_scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 codes ``float8_e4m3fn(clamp(x / Δ, ±448))``."""
    return _fp8_scaled(x, scale).to(torch.float8_e4m3fn)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fp8(clamp(x / Δ, ±448)) · Δ`` with a straight-through cast (gradients as in
    ``fake_quantize``)."""
    scaled = _fp8_scaled(x, scale)
    rounded = scaled.to(torch.float8_e4m3fn).to(scaled.dtype)
    return _straight_through(scaled, rounded) * scale


def _fake_quantize_groups(
    groups: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    if spec.fmt == "fp8_e4m3":
        return fake_quantize_fp8(groups, scale)
    return fake_quantize(groups, scale, zero_point, spec.bits, spec.symmetric)


def _percentile_last_dim(groups: torch.Tensor, percent: float) -> torch.Tensor:
    """``numpy.percentile`` (linear interpolation) over the last axis, with ``keepdim``.
    ``kthvalue`` has no input size limit, unlike ``torch.quantile`` (16M elements)."""
    count = groups.shape[-1]
    position = percent / 100 * (count - 1)
    below = math.floor(position)
    fraction = position - below
    lower = groups.kthvalue(below + 1, dim=-1, keepdim=True).values
    if fraction == 0:
        return lower
    upper = groups.kthvalue(below + 2, dim=-1, keepdim=True).values
    return lower + (upper - lower) * fraction


def _best_range(
    groups: torch.Tensor, candidates: Iterable[TensorPair], spec: QuantSpec, norm: float
) -> TensorPair:
    """Per range group, the candidate ``(x_min, x_max)`` whose quantization has the
    smallest ``sum |x - x̂|^norm`` (the first one on ties)."""
    best_error = best_min = best_max = None
    for candidate_min, candidate_max in candidates:
        scale, zero_point = qparams_from_range(candidate_min, candidate_max, spec)
        error = _fake_quantize_groups(groups, scale, zero_point, spec).sub_(groups)
        error = error.abs_().pow_(norm).sum(dim=-1, keepdim=True)
        if best_error is None:
            best_error, best_min, best_max = error, candidate_min, candidate_max
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_min = torch.where(better, candidate_min, best_min)
        best_max = torch.where(better, candidate_max, best_max)
    return best_min, best_max


def _mse_search(
    groups: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, spec: QuantSpec
) -> TensorPair:
    """Per range group, the clipping ratio r (``mse_grid`` values from 1 down to
    ``MSE_MIN_RATIO``) minimizing ``sum |x - x̂|^p`` for the range ``[r·min, r·max]``."""
    ratios = torch.linspace(1.0, MSE_MIN_RATIO, spec.mse_grid, dtype=torch.float64).tolist()
    candidates = ((x_min * ratio, x_max * ratio) for ratio in ratios)
    return _best_range(groups, candidates, spec, spec.mse_norm)


def _percentile_search(groups: torch.Tensor, spec: QuantSpec) -> TensorPair:
    """Per range group, of the ranges ``[P(100 - p), P(p)]`` for p in
    :data:`SEARCHED_PERCENTILES`, the one whose quantization has the smallest squared
    error (the first one on ties)."""
    candidates = (
        (_percentile_last_dim(groups, 100 - p), _percentile_last_dim(groups, p))
        for p in SEARCHED_PERCENTILES
    )
    return _best_range(groups, candidates, spec, 2.0)


def find_range(x: torch.Tensor, spec: QuantSpec) -> TensorPair:
    """``(x_min, x_max)`` per range group of ``spec.granularity`` (shaped as the scale) by
    ``spec.range_method``: min/max, percentile, the best of the searched percentiles, or
    the L_p-optimal clipping ratio."""
    groups = to_range_groups(x.detach(), spec.granularity).to(range_dtype(x.dtype))
    if spec.range_method == "percentile":
        return (
            _percentile_last_dim(groups, 100 - spec.percentile),
            _percentile_last_dim(groups, spec.percentile),
        )
    if spec.range_method == "percentile_search":
        return _percentile_search(groups, spec)
    x_min, x_max = torch.aminmax(groups, dim=-1, keepdim=True)
    if spec.range_method == "mse":
        return _mse_search(groups, x_min, x_max, spec)
    return x_min, x_max


class Quantizer(nn.Module):
    """Fake quantizer of one tensor for ``spec`` (METHODS.md, "Uniform quantizers").

    Static specs need ``find_params(x)`` or ``set_range(x_min, x_max)`` before use; their
    ``scale`` and ``zero_point`` (buffers, or ``scale`` a Parameter after
    ``enable_learning``) have the shapes of the module docstring's table. Dynamic specs
    take the range of every input. Specs with ``bits=16`` pass inputs through.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise DitqError(f"Quantizer takes a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.bypass = False
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))

    @property
    def calibrated(self) -> bool:
        """True once a static range has been set."""
        return self.scale.numel() > 0

    @property
    def learning(self) -> bool:
        """True while ``scale`` is a learnable ``nn.Parameter``."""
        return isinstance(self.scale, nn.Parameter)

    def _require_static(self, action: str) -> None:
        if not self.spec.needs_calibration:
            raise DitqError(
                f"{action} applies to static quantizers; this one is "
                f"{self.spec.describe()} (check spec.needs_calibration first)"
            )

    def find_params(self, x: torch.Tensor) -> None:
        """Calibrate the static range from ``x`` (a weight, or stored activations)."""
        self._require_static("find_params")
        self.set_range(*find_range(x, self.spec))

    def set_range(self, x_min: torch.Tensor | float, x_max: torch.Tensor | float) -> None:
        """Calibrate from a range shaped like ``find_range``'s (e.g. observer statistics);
        per-tensor specs also take floats or one-element tensors."""
        self._require_static("set_range")
        x_min, x_max = torch.as_tensor(x_min), torch.as_tensor(x_max)
        if isinstance(self.spec.granularity, PerTensor):
            x_min, x_max = x_min.reshape(1, 1), x_max.reshape(1, 1)
        dtype = range_dtype(x_min.dtype)
        scale, zero_point = qparams_from_range(x_min.to(dtype), x_max.to(dtype), self.spec)
        if self.learning:
            self.scale.data = scale
        else:
            self.scale = scale
        self.zero_point = zero_point

    def _require_calibrated(self) -> None:
        if not self.calibrated:
            raise DitqError(
                f"quantizer {self.spec.describe()} is not calibrated; call find_params(x) "
                "or set_range(x_min, x_max) before using it"
            )

    def _calibrated_qparams(self, groups: torch.Tensor) -> TensorPair:
        self._require_calibrated()
        # Leading dims broadcast: a static per-group activation range, (C/g, 1), serves
        # every token of a (..., C/g, g) view.
        if self.scale.dim() > groups.dim() or (
            self.scale.shape[:-1] != groups.shape[groups.dim() - self.scale.dim() : -1]
        ):
            raise DitqError(
                f"quantizer {self.spec.describe()} was calibrated with scales of shape "
                f"{tuple(self.scale.shape)}, which do not fit a tensor grouped as "
                f"{tuple(groups.shape)}; calibrate it on a tensor of the same shape"
            )
        return self.scale.clamp(min=MIN_SCALE), self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``x`` in ``x``'s dtype (``x`` itself if not enabled or bypassed,
        as while activation statistics are being collected)."""
        if not self.spec.enabled or self.bypass:
            return x
        groups = to_range_groups(x, self.spec.granularity)
        if self.spec.dynamic:
            scale, zero_point = qparams_from_range(*find_range(x, self.spec), self.spec)
        else:
            scale, zero_point = self._calibrated_qparams(groups)
        fake = _fake_quantize_groups(groups, scale, zero_point, self.spec)
        return from_range_groups(fake, x.shape, self.spec.granularity).to(x.dtype)

    def quantize_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Storage form of ``x`` (shape of ``x``; packed two per byte along the last dim for
        at most 4 bits, see ``ditq.quant.packing``) for this static quantizer."""
        self._require_static("quantize_codes")
        groups = to_range_groups(x, self.spec.granularity)
        scale, zero_point = self._calibrated_qparams(groups)
        granularity = self.spec.granularity
        if self.spec.fmt == "fp8_e4m3":
            return from_range_groups(quantize_fp8(groups, scale), x.shape, granularity)
        codes = quantize(groups, scale, zero_point, self.spec.bits, self.spec.symmetric)
        codes = from_range_groups(codes, x.shape, granularity).contiguous()
        return pack_codes(codes, self.spec.bits, self.spec.symmetric)

    def dequantize_codes(self, stored: torch.Tensor) -> torch.Tensor:
        """Inverse of ``quantize_codes``: the fake-quantized tensor in the dtype of ``scale``."""
        self._require_static("dequantize_codes")
        codes = (
            stored
            if self.spec.fmt == "fp8_e4m3"
            else unpack_codes(stored, self.spec.bits, self.spec.symmetric)
        )
        groups = to_range_groups(codes, self.spec.granularity)
        scale, zero_point = self._calibrated_qparams(groups)
        values = dequantize(groups, scale, zero_point)
        return from_range_groups(values, codes.shape, self.spec.granularity)

    def enable_learning(self) -> nn.Parameter:
        """Turn ``scale`` into an ``nn.Parameter`` (learned step size, LSQ) and return it."""
        self._require_static("enable_learning")
        self._require_calibrated()
        if not self.learning:
            scale = self.scale
            delattr(self, "scale")
            self.scale = nn.Parameter(scale.detach().clone())
        return self.scale

    def disable_learning(self) -> None:
        """Freeze a learned ``scale`` back into a buffer."""
        if self.learning:
            scale = self.scale.detach().clone()
            delattr(self, "scale")
            self.register_buffer("scale", scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Calibrated shapes depend on the calibrated tensor: take them from the state dict.
        for name in ("scale", "zero_point"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                current = getattr(self, name)
                current.data = torch.empty_like(stored, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        notes = [self.spec.describe()]
        if self.spec.needs_calibration and not self.calibrated:
            notes.append("uncalibrated")
        if self.learning:
            notes.append("learned scale")
        return ", ".join(notes)
