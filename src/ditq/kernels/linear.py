"""Real low-bit execution of packed ``QuantLinear`` layers: ``RealQuantLinear`` and
``convert_model``.

``RealQuantLinear.from_quant_linear`` reads only the packed layer's tensors (weight codes,
scales, zero points, activation quantizer, ``input_scale``, low-rank branch) and lays
them out once for the kernels; no float weight is ever kept. How a layer runs (``kind``):

=============  =========================================  ===================================
kind           formats                                    CUDA path
=============  =========================================  ===================================
``int``        int weights (2-8 bits) per-tensor/channel,  Triton ``quantize_act`` (or its
               or per-group with g in {32, 64, 128, 256};  torch twin, fused by Inductor) +
               int activations (static per-tensor,         autotuned ``int_gemm`` (int8 tensor
               dynamic per-tensor, per-token, or per       cores; packed int4 codes unpacked
               token and group of g in {32, ..., 256}      to int8 by one elementwise kernel
               with weight groups a multiple of g)         per call, dequantization in the
                                                           epilogue)
``dequant``    int weights of any granularity (per-column  weight dequantized to the compute
               group, other group sizes) with int or       dtype per call (one elementwise
               16-bit activations (W4A16, W8A16, DiTAS'    kernel under ``torch.compile``),
               W4A8 column groups)                         then one cuBLAS GEMM
``fp8``        FP8 e4m3 weights (per-tensor/channel) with  ``fp8_gemm``: the Triton GEMM (FP8
               FP8 activations (static or dynamic), or     tensor cores, the int kernel's
               int weights of 2-4 bits per-tensor/channel  epilogues) or ``torch._scaled_mm``,
               with FP8 activations (codes minus zero      the faster for the shape (measured
               points, |v| <= 15, are exact in e4m3)       once); activation cast in torch;
                                                           int4 codes unpacked to e4m3 per
                                                           call (or read packed by the GEMM)
``reference``  anything else (e.g. int8 weights with FP8   the dequantizing path below, on
               activations)                                the GPU too
=============  =========================================  ===================================

Weights stay packed in memory (int8 codes, two int4 codes per byte, FP8): the int8 or
16-bit copies above exist only while their layer runs. At DiT-XL/2 sizes on an H200 the
``dequant`` path runs at BF16 GEMM speed, where a Triton kernel dequantizing in registers
was much slower (``benchmarks/RESULTS.md``).

The dequantizing path (every kind whenever the input is not on a CUDA device) dequantizes
the codes and runs ``F.linear``, exactly the simulated model's arithmetic, so it matches
``QuantLinear`` up to float rounding. Activation codes there come from
:func:`quantize_activation`, the torch twin of the Triton kernel (also used on CUDA while
``torch.compile`` traces, so that Inductor fuses the quantization into the preceding
LayerNorm / modulate / GELU).

The DiTAS low-rank branch ``L (R x')`` with ``x' = x / s``: ``s`` is folded into ``R`` at
conversion (``R' = R / s``) and ``T = x R'ᵀ`` is one small cuBLAS GEMM. ``int`` adds
``T Lᵀ`` inside its epilogue; the dequantizing path batches it into the main GEMM as
``[x̂, T] [Ŵ, L]ᵀ``: one extra launch per layer either way, not two plus an add (the FP8
path adds it with two small GEMMs). A layer with an online Hadamard rotation computes
``(x / s) H`` with torch ops first (a Walsh–Hadamard transform) and then runs as above.
A DiT block hands ``proj`` and its MLP (``gated_residual``) the adaLN-Zero residual
``x + gate ⊙ y``, which the ``int`` and ``fp8`` GEMMs' epilogue adds, so ``y`` is never
written.
Weight layers left unquantized (``wbits=16``) and layers with static per-group activation
ranges (no kernel takes them) stay simulated, as do attention matmul quantizers that the
fused attention kernel does not take (:mod:`ditq.kernels.attention`); ``convert_model``
names them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import DitqError
from ditq.kernels.attention import fuse_attention
from ditq.quant.hadamard import rotate
from ditq.quant.layers import QuantLinear
from ditq.quant.packing import unpack_int4
from ditq.quant.quantizer import FP8_E4M3_MAX, MIN_SCALE, qparams_from_range
from ditq.quant.spec import (
    PACKED_BITS,
    PerChannel,
    PerColumnGroup,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    integer_range,
)

INT_GROUP_SIZES = (32, 64, 128, 256)
"""Weight group sizes the ``int`` kernel takes (its BLOCK_K is the group size)."""
ASYM_SHIFT = 128
"""Asymmetric 5-8-bit codes [0, 255] are held as int8 ``q - 128`` (and zero point ``z - 128``)."""
NIBBLE_OFFSET = 8
"""Packed 2-4-bit codes are stored as nibbles u in [0, 15]; the kernels use ``u - 8``."""
KEPT_DTYPE = ("weight", "w_scale", "w_zero", "bias", "static_qparams")
"""Buffers whose dtype ``Module.to(dtype)`` must not change (codes, fp32 scales)."""


@dataclass(frozen=True)
class ActFormat:
    """How the layer input is quantized: ``None`` fields for 16-bit activations."""

    fmt: str | None
    qmin: int = 0
    qmax: int = 0
    symmetric: bool = True
    per_token: bool = False
    dynamic: bool = False
    group_size: int = 0
    """Dynamic ranges per token and group of this many input channels (0: none)."""
    spec: QuantSpec | None = None
    """The activation spec (built once: dataclass validation cannot run under torch.compile)."""


def _act_format(spec: QuantSpec) -> ActFormat:
    if not spec.enabled:
        return ActFormat(None)
    qmin, qmax = integer_range(spec.bits, spec.symmetric) if spec.fmt == "int" else (0, 0)
    grouped = isinstance(spec.granularity, PerGroup) and spec.dynamic
    return ActFormat(
        spec.fmt,
        qmin,
        qmax,
        spec.symmetric,
        isinstance(spec.granularity, PerToken),
        spec.dynamic,
        spec.granularity.group_size if grouped else 0,
        spec,
    )


SCALED_MM_ALIGNMENT = 16
"""``torch._scaled_mm`` needs both GEMM dimensions divisible by 16: FP8 layers with other
widths (e.g. a patch embedding over 2x2x3 pixels, 12 inputs) take the dequantizing path."""


def layer_kind(layer: QuantLinear) -> str:
    """``"int"``, ``"dequant"``, ``"fp8"`` or ``"reference"`` for a packed layer (table in
    the module docstring)."""
    w, a = layer.weight_quantizer.spec, layer.act_quantizer.spec
    per_channel = isinstance(w.granularity, (PerTensor, PerChannel))
    fp8_activations = a.enabled and a.fmt == "fp8_e4m3"
    # int4 codes minus their zero point (|v| <= 15) are exact in e4m3: FP8 GEMM operands too
    if w.fmt == "fp8_e4m3" or (fp8_activations and w.bits <= PACKED_BITS):
        aligned = not (
            layer.in_features % SCALED_MM_ALIGNMENT or layer.out_features % SCALED_MM_ALIGNMENT
        )
        row_scales = not isinstance(a.granularity, PerGroup)  # _scaled_mm: one per row
        fast = fp8_activations and per_channel and aligned and row_scales
        return "fp8" if fast else "reference"
    if a.enabled and a.fmt != "int":
        return "reference"
    grouped = isinstance(w.granularity, PerGroup) and w.granularity.group_size in INT_GROUP_SIZES
    if a.enabled and isinstance(a.granularity, PerGroup):  # the kernel's K block is a's group
        size = a.granularity.group_size
        fits = per_channel or (grouped and w.granularity.group_size % size == 0)
        return "int" if size in INT_GROUP_SIZES and fits else "dequant"
    return "int" if a.enabled and (per_channel or grouped) else "dequant"


def quantize_activation(
    x: torch.Tensor,
    act: ActFormat,
    input_scale: torch.Tensor | None,
    static_qparams: torch.Tensor | None,
    code_sums: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Torch twin of the Triton ``quantize_act`` (and ``quantize_act_groups``): codes (M, K)
    int8 (or float8_e4m3fn), per-row scale (fp32), shifted zero point (int32) and code sum
    (int32; None unless ``code_sums``: the sum is a row reduction that keeps Inductor from
    fusing a static quantization as a plain elementwise op) of a (M, K) input, with the
    simulated quantizer's arithmetic (divide by ``input_scale`` in the input dtype, ranges
    in fp32, round half to even). Per-group ranges: scale and zero point (M, K / g), no sum
    (the GEMM sums each group's codes itself)."""
    if input_scale is not None:
        x = x / input_scale.to(x.dtype)
    rows, width = x.shape
    size = act.group_size or width
    xf = x.float().reshape(rows, width // size, size)  # (M, groups, g); one group per row
    if static_qparams is not None:
        scale, zero = (v.reshape(1, 1, 1).expand(rows, 1, 1) for v in static_qparams[:2])
    else:
        if act.per_token or act.group_size:
            x_min, x_max = torch.aminmax(xf, dim=-1, keepdim=True)
        else:
            x_min, x_max = (v.reshape(1, 1, 1) for v in torch.aminmax(xf))
        scale, zero = qparams_from_range(x_min, x_max, act.spec)
        scale, zero = scale.expand(rows, -1, 1), zero.expand(rows, -1, 1)

    def table(values: torch.Tensor) -> torch.Tensor:  # (M,) per row, (M, K / g) per group
        return values.reshape(rows, -1) if act.group_size else values.reshape(-1)

    if act.fmt == "fp8_e4m3":
        codes = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        zero = table(zero).to(torch.int32)
        return codes.reshape(rows, width), table(scale).contiguous(), zero, zero
    shift = 0 if act.symmetric else ASYM_SHIFT
    codes = (torch.round(xf / scale) + zero).clamp(act.qmin, act.qmax) - shift
    codes = codes.to(torch.int8).reshape(rows, width)
    return (
        codes,
        table(scale).contiguous(),
        (table(zero) - shift).to(torch.int32),
        codes.sum(dim=-1, dtype=torch.int32) if code_sums and not act.group_size else None,
    )


def _static_qparams(layer: QuantLinear) -> torch.Tensor | None:
    quantizer = layer.act_quantizer
    if not quantizer.spec.needs_calibration:
        return None
    scale = quantizer.scale.detach().float().clamp(min=MIN_SCALE).reshape(1)
    return torch.cat([scale, quantizer.zero_point.detach().float().reshape(1)])


class RealQuantLinear(nn.Module):
    """A packed ``QuantLinear`` executed with real low-bit kernels (module docstring).

    Buffers: ``weight`` (int8 codes ``q'``, packed int4 bytes, or float8_e4m3fn codes; shape
    (N, K) or (N, K/2)), ``w_scale``/``w_zero`` (fp32 / int32 for ``int``; fp32 for the
    others), ``w_sum`` (int32 code sums per output channel or group), ``bias`` (fp32),
    ``static_qparams`` ([scale, zero point] of a static activation range), ``input_scale``,
    ``lowrank_down`` (R / s) and ``lowrank_up`` (L) in the layer's compute dtype.
    """

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        if not layer.packed:
            raise DitqError(
                "RealQuantLinear takes a packed QuantLinear (integer codes); call "
                "ditq.quant.pack_model(model) first"
            )
        w_spec = layer.weight_quantizer.spec
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.kind = layer_kind(layer)
        self.act = _act_format(layer.act_quantizer.spec)
        self.weight_spec = w_spec
        self.packed_int4 = w_spec.fmt == "int" and w_spec.bits <= PACKED_BITS
        self.int4_in_kernel = False
        """Read packed int4 weights inside the GEMM (``convert_model(int4_in_kernel=True)``)
        instead of unpacking them to int8 codes first, once per call."""
        self.group_size = 0
        """The ``int`` kernel's K block: the activation group, else the weight group, else 0."""
        if self.kind == "int" and self.act.group_size:
            self.group_size = self.act.group_size
        elif self.kind == "int" and isinstance(w_spec.granularity, PerGroup):
            self.group_size = w_spec.granularity.group_size
        self._prepare_weight(layer)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        self.register_buffer("static_qparams", _static_qparams(layer))
        scale, signs = layer.input_scale, layer.rotation_signs
        # A rotated layer transforms its rows first ((x / s) H, torch ops), then runs as a
        # layer without input scale; otherwise the scale is fused into the quantization.
        self.register_buffer("rotation_signs", None if signs is None else signs.detach().clone())
        rotation_scale = scale if signs is not None else None
        self.register_buffer(
            "rotation_input_scale", None if rotation_scale is None else scale.detach().clone()
        )
        if signs is not None:
            scale = None
        self.register_buffer("input_scale", None if scale is None else scale.detach().clone())
        down, up = layer.lowrank_down, layer.lowrank_up
        if down is not None and scale is not None:
            down = down / scale.to(down.dtype)
        self.register_buffer("lowrank_down", None if down is None else down.detach().clone())
        self.register_buffer("lowrank_up", None if up is None else up.detach().contiguous())

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> RealQuantLinear:
        """The real-kernel twin of a packed ``layer`` (same device)."""
        return cls(layer)

    def _prepare_weight(self, layer: QuantLinear) -> None:
        spec, stored = self.weight_spec, layer.weight_codes
        scale = layer.weight_quantizer.scale.detach().float().clamp(min=MIN_SCALE)
        zero = layer.weight_quantizer.zero_point.detach().float()
        if spec.fmt == "fp8_e4m3":
            self.register_buffer("weight", stored.contiguous())
            self._register_scales(scale, zero, None)
            return
        if self.packed_int4:
            offset = -integer_range(spec.bits, spec.symmetric)[0]
            codes = unpack_int4(stored).to(torch.int16) - NIBBLE_OFFSET
            zero = zero + offset - NIBBLE_OFFSET
            weight = stored.contiguous()
        else:
            shift = 0 if spec.symmetric else ASYM_SHIFT
            codes = stored.to(torch.int16) - shift
            zero = zero - shift
            weight = codes.to(torch.int8).contiguous()
        self.register_buffer("weight", weight)
        self._register_scales(scale, zero, codes)

    def _register_scales(
        self, scale: torch.Tensor, zero: torch.Tensor, codes: torch.Tensor | None
    ) -> None:
        """Scales laid out per kind: (N,) per channel, (N, K/g) per group, or the
        quantizer's own layout (``dequant``, addressed through ``scale_index``)."""
        granularity, N = self.weight_spec.granularity, self.out_features
        if self.kind == "int" and self.act.group_size:  # tables per activation group
            groups = self.in_features // self.group_size
            scale, zero = (_group_table(t, N, groups) for t in (scale, zero))
            granularity = PerGroup(self.group_size)
        elif self.kind in ("int", "fp8"):
            scale = scale.reshape(N, -1) if self.group_size else scale.reshape(-1).expand(N)
            zero = zero.reshape(scale.shape) if self.group_size else zero.reshape(-1).expand(N)
        self.scale_index = _scale_index(granularity, scale.shape, N, self.in_features)
        self.register_buffer("w_scale", scale.contiguous())
        integer = self.kind == "int"
        has_zero = bool((zero != 0).any()) if codes is not None else False
        stored_zero = zero.round().to(torch.int32) if integer else zero
        self.register_buffer("w_zero", stored_zero.contiguous() if has_zero else None)
        self.needs_code_sums = integer and has_zero and not self.group_size
        """Per-channel weights with zero points need the activation code sums."""
        w_sum = None
        if integer:
            group = self.group_size or self.in_features
            w_sum = codes.reshape(N, -1, group).sum(-1, dtype=torch.int32).reshape(scale.shape)
        self.register_buffer("w_sum", None if w_sum is None else w_sum.contiguous())

    def dequantized_weight(self) -> torch.Tensor:
        """``Q_w(W)`` (N, K) in fp32, from the prepared codes (the CPU path)."""
        N = self.out_features
        if self.kind == "fp8" and not self.packed_int4:
            return self.weight.float() * self.w_scale.reshape(N, 1)
        zero = 0.0 if self.w_zero is None else self._expand(self.w_zero.float())
        return (self._float_codes() - zero) * self._expand(self.w_scale)

    def _float_codes(self) -> torch.Tensor:
        """Weight codes ``q'`` (N, K) in fp32: packed int4 nibbles ``u`` unpacked to ``u - 8``."""
        if not self.packed_int4:
            return self.weight.float()
        return unpack_int4(self.weight).float() - NIBBLE_OFFSET

    def _expand(self, table: torch.Tensor) -> torch.Tensor:
        """A scale / zero-point table to (N, K) through ``scale_index``."""
        gn, mn, gk, sr, sc = self.scale_index
        n = torch.arange(self.out_features, device=table.device)
        k = torch.arange(self.in_features, device=table.device)
        flat = table.reshape(-1) if table.dim() else table.reshape(1)
        return flat[((n // gn) % mn * sr)[:, None] + (k // gk * sc)[None, :]]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input as (tokens, K), rotated first where the layer is ((x / s) H)."""
        rows = x.reshape(-1, x.shape[-1])
        if self.rotation_signs is not None:
            if self.rotation_input_scale is not None:
                rows = rows / self.rotation_input_scale.to(rows.dtype)
            rows = rotate(rows, self.rotation_signs).contiguous()
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = self._rows(x)
        if rows.device.type == "cuda" and self.kind != "reference":
            y = self._forward_cuda(rows)
        else:
            y = self._forward_dequantized(rows)
        return y.reshape(*shape[:-1], self.out_features)

    @property
    def fuses_gated_residual(self) -> bool:
        """Whether :meth:`gated_residual` adds the residual in the GEMM's epilogue."""
        return self.kind in ("int", "fp8")

    def gated_residual(
        self, x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor
    ) -> torch.Tensor:
        """``residual + gate ⊙ self(x)`` for x (B, T, K), residual (B, T, N), gate (B, N): a
        DiT block's gated residual, added by the GEMM's epilogue on CUDA (the layer's
        output never goes through memory), in torch otherwise."""
        if x.device.type != "cuda" or not self.fuses_gated_residual:
            return residual + gate.unsqueeze(1) * self(x)
        y = self._quantized_cuda(self._rows(x), residual.reshape(-1, self.out_features), gate)
        return y.reshape(residual.shape)

    @property
    def quantizes_norm(self) -> bool:
        """Whether :meth:`forward_from_norm` quantizes the input in one kernel with the
        modulated LayerNorm before it: a static per-tensor input range, and no low-rank
        branch or rotation (which need the float input)."""
        return (
            self.kind in ("int", "fp8")
            and self.static_qparams is not None
            and not self.act.group_size
            and self.lowrank_down is None
            and self.rotation_signs is None
        )

    def forward_from_norm(
        self, x: torch.Tensor, eps: float, shift: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """``self(LayerNorm(x) ⊙ (1 + scale) + shift)`` for x (B, T, K) on CUDA, where
        :attr:`quantizes_norm`: the norm, the modulation and the input's quantization in
        one kernel (``triton_ops.norm_quantize``), then the GEMM."""
        rows = x.reshape(-1, x.shape[-1])
        y = self._gemm(self._norm_activation(rows, eps, shift, scale), None, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _norm_activation(
        self, rows: torch.Tensor, eps: float, shift: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This layer's quantized input ``(codes, scale, zero, sums)`` from the rows of the
        modulated LayerNorm's input (:meth:`forward_from_norm`)."""
        from ditq.kernels import triton_ops

        summed = self.needs_code_sums
        codes, sums = triton_ops.norm_quantize(
            rows.contiguous(), shift, scale, eps, self.input_scale, self.static_qparams,
            self.act.qmin, self.act.qmax, self.act.symmetric, self.kind == "fp8", summed,
        )  # fmt: skip
        row_scale, row_zero = self._static_row_qparams(len(rows))
        return codes, row_scale, row_zero, sums if summed else None

    def _lowrank_t(self, rows: torch.Tensor) -> torch.Tensor | None:
        if self.lowrank_down is None:
            return None
        return F.linear(rows, self.lowrank_down.to(rows.dtype)).contiguous()

    def _forward_dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        """Dequantize, then one matmul: the simulated model's arithmetic."""
        x = rows if self.input_scale is None else rows / self.input_scale.to(rows.dtype)
        if self.act.fmt is not None:
            qp = self.static_qparams
            codes, scale, zero, _ = quantize_activation(
                rows, self.act, self.input_scale, qp, code_sums=False
            )
            if self.act.group_size:  # (M, K / g) tables to (M, K)
                scale = scale.repeat_interleave(self.act.group_size, dim=1)
                zero = zero.repeat_interleave(self.act.group_size, dim=1)
            else:
                scale, zero = scale[:, None], zero[:, None]
            x = ((codes.float() - zero.float()) * scale).to(rows.dtype)
        weight = self.dequantized_weight().to(rows.dtype)
        t = self._lowrank_t(rows)
        if t is not None:  # batched low-rank branch: [x̂, T] [Ŵ, L]ᵀ
            x = torch.cat([x, t], dim=-1)
            weight = torch.cat([weight, self.lowrank_up.to(rows.dtype)], dim=-1)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(rows.dtype))

    def _int8_weight(self) -> torch.Tensor:
        """Weight codes ``q'`` as int8 (N, K): packed int4 nibbles ``u`` unpacked to ``u - 8``."""
        if not self.packed_int4:
            return self.weight
        return unpack_int4(self.weight).to(torch.int8) - NIBBLE_OFFSET

    def _e4m3_weight(self) -> torch.Tensor:
        """Packed int4 weight codes as e4m3 (N, K): ``u - 8 - z`` (|v| <= 15, exact), for the
        ``fp8`` kind's int4 weights."""
        codes = self._float_codes()
        if self.w_zero is not None:
            codes = codes - self.w_zero.reshape(-1, 1)
        return codes.to(torch.float8_e4m3fn)

    def _forward_cuda(self, rows: torch.Tensor) -> torch.Tensor:
        if self.kind not in ("int", "fp8"):
            return self._forward_dequantized(rows)
        return self._quantized_cuda(rows)

    def _quantized_cuda(
        self,
        rows: torch.Tensor,
        residual: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The ``int`` and ``fp8`` paths: activation codes, then the GEMM (with the gated
        residual if given: :meth:`_gemm`)."""
        if not rows.is_contiguous():
            rows = rows.contiguous()
        return self._gemm(
            self._quantize_cuda(rows),
            self._lowrank_t(rows),
            rows.dtype,
            residual=_contiguous(residual),
            gate=_contiguous(gate),
        )

    def _gemm(
        self,
        activation: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
        lowrank_t: torch.Tensor | None,
        out_dtype: torch.dtype,
        residual: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This layer's GEMM on its quantized input ``(codes, scale, zero, sums)``; with
        ``residual`` and ``gate`` the epilogue adds the gated residual."""
        gemm = self._int_gemm if self.kind == "int" else self._fp8_gemm
        return gemm(activation, lowrank_t, out_dtype, residual=residual, gate=gate)[0]

    def _next_layer_codes(
        self,
        activation: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
        lowrank_t: torch.Tensor | None,
        out_dtype: torch.dtype,
        next_layer: RealQuantLinear,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This layer's GEMM whose epilogue writes ``next_layer``'s input codes from GELU(y)
        (a fused MLP's fc1, ``next_layer`` with a static input range), and the codes' row
        sums, added up in the same epilogue, where that layer's weights have zero points."""
        if self.kind == "int":
            summed = next_layer.needs_code_sums
            epilogue = next_layer._input_epilogue()
            codes, sums = self._int_gemm(
                activation, lowrank_t, out_dtype, next_sums=summed, **epilogue
            )
            return codes, sums if summed else None
        return self._fp8_gemm(
            activation, lowrank_t, out_dtype, next_scale=next_layer.static_qparams,
            next_input_scale=next_layer.input_scale,
        )  # fmt: skip

    def _input_epilogue(self) -> dict:
        """The ``int_gemm`` options with which the previous layer writes this layer's int8
        input codes (its static range, online input scale, code range)."""
        return dict(
            next_qparams=self.static_qparams,
            next_input_scale=self.input_scale,
            next_qmin=self.act.qmin,
            next_qmax=self.act.qmax,
            next_symmetric=self.act.symmetric,
        )

    @property
    def unpacks_in_kernel(self) -> bool:
        """Whether the GEMM reads the packed int4 bytes itself (``int4_in_kernel``): each K
        block's bytes unpacked and interleaved back into input-channel order in registers."""
        return self.int4_in_kernel and self.packed_int4

    def _int_gemm(
        self,
        activation: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
        lowrank_t: torch.Tensor | None,
        out_dtype: torch.dtype,
        **epilogue,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``triton_ops.int_gemm`` on input ``(codes, scale, zero, sums)`` with this layer's
        weight (packed int4 bytes or int8 codes) and ``epilogue`` options: its output and
        the next layer's code sums (empty unless ``next_sums``)."""
        from ditq.kernels import triton_ops

        packed = self.unpacks_in_kernel
        return triton_ops.int_gemm(
            *activation, self.weight if packed else self._int8_weight(), self.w_scale,
            self.w_zero, self.w_sum, self.bias, lowrank_t, self.lowrank_up, self.group_size,
            not self.act.symmetric, bool(self.act.group_size), out_dtype, packed_int4=packed,
            **epilogue,
        )  # fmt: skip

    def _fp8_gemm(
        self,
        activation: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
        lowrank_t: torch.Tensor | None,
        out_dtype: torch.dtype,
        **epilogue,
    ) -> tuple[torch.Tensor, None]:
        """``triton_ops.fp8_gemm`` on input ``(codes, scale, ...)`` with this layer's e4m3
        weight and ``epilogue`` options, shaped as :meth:`_int_gemm`'s result (no sums).
        int4 weights: unpacked to e4m3 per call, as the ``int`` kind's to int8, or read
        packed by the GEMM (:attr:`unpacks_in_kernel`)."""
        from ditq.kernels import triton_ops

        packed = self.unpacks_in_kernel
        weight = self._e4m3_weight() if self.packed_int4 and not packed else self.weight
        return triton_ops.fp8_gemm(
            *activation[:2], weight, self.w_scale, self.bias, lowrank_t, self.lowrank_up,
            out_dtype, **epilogue, w_zero=self.w_zero if packed else None, packed_int4=packed,
        ), None  # fmt: skip

    def _static_row_qparams(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row scale (fp32) and shifted zero point (int32) of the static input range, as
        ``quantize_activation`` returns them."""
        shift = 0 if self.act.symmetric else ASYM_SHIFT
        scale = self.static_qparams[0].expand(rows).contiguous()
        return scale, (self.static_qparams[1] - shift).to(torch.int32).expand(rows).contiguous()

    def _quantize_cuda(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Activation codes: the Triton kernel, or its torch twin while compiling (fused by
        Inductor into the preceding op), for FP8 and for dynamic per-tensor ranges' scale."""
        qp = self.static_qparams
        if torch.compiler.is_compiling() or self.act.fmt != "int":
            return quantize_activation(
                rows, self.act, self.input_scale, qp, code_sums=self.needs_code_sums
            )
        from ditq.kernels import triton_ops

        if self.act.group_size:
            codes, scale, zero = triton_ops.quantize_act_groups(
                rows, self.input_scale, self.act.group_size, self.act.qmin, self.act.qmax,
                self.act.symmetric,
            )  # fmt: skip
            return codes, scale, zero, None
        if qp is None and not self.act.per_token:
            qp = _dynamic_tensor_qparams(rows, self.act, self.input_scale)
        return triton_ops.quantize_act(
            rows, self.input_scale, qp, self.act.qmin, self.act.qmax, self.act.symmetric
        )

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must move, not cast, the codes and the fp32 scales of the kernels.
        kept = {name: getattr(self, name) for name in KEPT_DTYPE}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            if old is not None and getattr(self, name).dtype != old.dtype:
                setattr(self, name, old.to(getattr(self, name).device))
        return self

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, kind={self.kind}, "
            f"weight={self.weight_spec.describe()}"
        )


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.contiguous()


def _group_table(table: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """A per-tensor, per-channel or per-group (of a multiple of the new group size) weight
    table as (rows, groups)."""
    table = table.reshape(1, 1) if table.numel() == 1 else table.reshape(rows, -1)
    return table.expand(rows, -1).repeat_interleave(groups // table.shape[1], dim=1)


def _scale_index(
    granularity: object, shape: torch.Size, out_features: int, in_features: int
) -> tuple[int, int, int, int, int]:
    """``(GN, MN, GK, SR, SC)``: the scale of element (n, k) is at
    ``((n // GN) % MN) · SR + (k // GK) · SC`` of the flattened (contiguous) table."""
    big = out_features * in_features + 1
    if isinstance(granularity, PerTensor) and len(shape) != 1:
        return 1, 1, big, 0, 0
    if isinstance(granularity, PerGroup):
        groups = in_features // granularity.group_size
        return 1, big, granularity.group_size, groups, 1
    if isinstance(granularity, PerColumnGroup):
        count = out_features // granularity.group_size
        if granularity.strided:
            return 1, count, 1, in_features, 1
        return granularity.group_size, big, 1, in_features, 1
    return 1, big, big, 1, 0  # per channel, or any table expanded to (N,)


def _dynamic_tensor_qparams(
    rows: torch.Tensor, act: ActFormat, input_scale: torch.Tensor | None
) -> torch.Tensor:
    """[scale, zero point] of a dynamic per-tensor range, on the device (no host sync)."""
    x = rows if input_scale is None else rows / input_scale.to(rows.dtype)
    x_min, x_max = torch.aminmax(x.float())
    bits = (act.qmax - act.qmin + 1).bit_length() - 1
    spec = QuantSpec(bits=bits, symmetric=act.symmetric)
    scale, zero = qparams_from_range(x_min.reshape(1), x_max.reshape(1), spec)
    return torch.cat([scale, zero])


class FusedQuantMlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` of a DiT block whose fc1 epilogue writes fc2's int8 (or e4m3)
    input codes (``triton_ops.int_gemm`` with ``next_qparams``, ``triton_ops.fp8_gemm`` with
    ``next_scale``: GELU, fc2's online input scale and static quantization in the
    epilogue), so the 4×-wide hidden activation never goes through memory in 16 bits, nor
    through a separate quantization kernel. Same arithmetic as the
    unfused ``RealQuantLinear`` pair up to the hardware tanh and products by reciprocals
    (a hidden code may differ by one at a rounding tie); off CUDA it runs them unfused.
    Built by ``convert_model`` (``fuse_mlp``, the default) where :meth:`fusable`."""

    def __init__(self, fc1: RealQuantLinear, fc2: RealQuantLinear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.act = nn.GELU(approximate="tanh")

    @staticmethod
    def fusable(mlp: nn.Module) -> bool:
        """int (or fp8) kernels on both layers, GELU (tanh) between them, a static input
        range and no low-rank branch or rotation on fc2."""
        fc1, fc2, act = (getattr(mlp, name, None) for name in ("fc1", "fc2", "act"))
        return (
            isinstance(fc1, RealQuantLinear)
            and isinstance(fc2, RealQuantLinear)
            and fc1.kind == fc2.kind
            and fc1.kind in ("int", "fp8")
            and isinstance(act, nn.GELU)
            and act.approximate == "tanh"
            and fc2.static_qparams is not None
            and fc2.lowrank_down is None
            and fc2.rotation_signs is None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return self.fc2(self.act(self.fc1(x)))
        shape = x.shape
        y = self._forward_fused(x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], self.fc2.out_features)

    fuses_gated_residual = True
    """:meth:`gated_residual` adds the residual in fc2's epilogue."""

    def gated_residual(
        self, x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor
    ) -> torch.Tensor:
        """``residual + gate ⊙ self(x)``, added by fc2's epilogue on CUDA."""
        if x.device.type != "cuda":
            return residual + gate.unsqueeze(1) * self(x)
        rows = x.reshape(-1, x.shape[-1])
        y = self._forward_fused(rows, residual.reshape(-1, self.fc2.out_features), gate)
        return y.reshape(residual.shape)

    @property
    def quantizes_norm(self) -> bool:
        """Whether :meth:`norm_branch` quantizes fc1's input in the norm's kernel."""
        return self.fc1.quantizes_norm

    def norm_branch(
        self,
        x: torch.Tensor,
        eps: float,
        shift: torch.Tensor,
        scale: torch.Tensor,
        gate: torch.Tensor,
    ) -> torch.Tensor:
        """``x + gate ⊙ self(LayerNorm(x) ⊙ (1 + scale) + shift)`` on CUDA (a DiT block's
        MLP branch) in three kernels: the norm with fc1's input quantization, fc1 writing
        fc2's codes, fc2 adding the gated residual."""
        rows = x.reshape(-1, x.shape[-1])
        y = self._forward_fused(rows, rows, gate, norm=(eps, shift, scale))
        return y.reshape(x.shape)

    def _forward_fused(
        self,
        rows: torch.Tensor,
        residual: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
        norm: tuple[float, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """fc1 on ``rows`` (with ``norm`` = (eps, shift, scale): on the modulated LayerNorm
        of ``rows``, quantized in its kernel), then fc2, with the gated residual if given."""
        fc1, fc2 = self.fc1, self.fc2
        if norm is None:
            rows = rows.contiguous()
            activation, lowrank_t = fc1._quantize_cuda(rows), fc1._lowrank_t(rows)
        else:
            activation, lowrank_t = fc1._norm_activation(rows, *norm), None
        hidden, h_sums = fc1._next_layer_codes(activation, lowrank_t, rows.dtype, fc2)
        h_scale, h_zero = fc2._static_row_qparams(len(rows))
        return fc2._gemm(
            (hidden, h_scale, h_zero, h_sums),
            None,
            rows.dtype,
            residual=_contiguous(residual),
            gate=_contiguous(gate),
        )


def has_kernel(layer: QuantLinear) -> bool:
    """Whether a packed layer can run as a :class:`RealQuantLinear`: activations in float,
    quantized per tensor or per token, or dynamic per token and group."""
    act = layer.act_quantizer.spec
    dynamic_groups = isinstance(act.granularity, PerGroup) and act.dynamic
    return not act.enabled or isinstance(act.granularity, (PerTensor, PerToken)) or dynamic_groups


def convert_model(
    model: nn.Module, fuse_mlp: bool = True, int4_in_kernel: bool = False
) -> nn.Module:
    """Replace every packed ``QuantLinear`` of ``model`` (in place) by its
    ``RealQuantLinear``; returns ``model``. Layers whose weight is not quantized stay
    simulated, as do layers without a kernel (:func:`has_kernel`, named in a warning).
    Quantized attention matmuls run fused (:func:`ditq.kernels.attention.fuse_attention`;
    formats it does not take stay simulated, named in a warning). Warns when some layers have a
    format without a GPU kernel (``reference``: they dequantize, then matmul).
    ``fuse_mlp`` also replaces each fusable MLP by a :class:`FusedQuantMlp` (timed in
    RESULTS.md, "Speed and memory"). ``int4_in_kernel`` has the GEMM read packed int4
    weights itself (slower than unpacking first where timed, with a lower peak memory:
    ``benchmarks/RESULTS.md``)."""
    slow, simulated = [], []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear) and module.packed and module.weight_codes is not None:
            if not has_kernel(module):
                simulated.append(f"{name} ({module.act_quantizer.spec.describe()})")
                continue
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            real = RealQuantLinear.from_quant_linear(module)
            real.int4_in_kernel = int4_in_kernel
            setattr(owner, child, real)
            if real.kind == "reference":
                activations = real.act.spec.describe() if real.act.spec else "float"
                slow.append(f"{name} ({real.weight_spec.describe()} / {activations})")
    if slow:
        warnings.warn(
            f"{len(slow)} layers have a format without a fast kernel and run as dequantize + "
            f"matmul, e.g. {slow[0]}; the kernels take int weights per channel/tensor or in "
            f"groups of {'/'.join(map(str, INT_GROUP_SIZES))} with int activations, and FP8 "
            "weights per channel/tensor with FP8 activations (ditq.kernels.linear)",
            stacklevel=2,
        )
    if simulated:
        warnings.warn(
            f"{len(simulated)} layers stay simulated (no kernel quantizes their activations), "
            f"e.g. {simulated[0]}; real kernels take per-tensor, per-token or dynamic per-group "
            "activation ranges",
            stacklevel=2,
        )
    attention_left = fuse_attention(model)
    if attention_left:
        warnings.warn(
            f"{len(attention_left)} attentions keep simulated matmuls (the fused kernel takes "
            f"int q, k, v and P of one spec, per tensor, at most 8 bits), e.g. "
            f"{attention_left[0]}",
            stacklevel=2,
        )
    if fuse_mlp:
        for name, module in list(model.named_modules()):
            if name and FusedQuantMlp.fusable(module):
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                setattr(owner, child, FusedQuantMlp(module.fc1, module.fc2))
    return model
