"""Quantized layers with simulated (fake) quantization.

``QuantLinear`` computes ``Y = Q_a(X̃) · Q_w(W)ᵀ + b [+ X̃ Rᵀ Lᵀ]`` with ``X̃ = (X / s) H``:

- ``Q_w``: ``weight_quantizer`` (any :class:`~ditq.quant.QuantSpec`),
- ``Q_a``: ``act_quantizer`` on the layer input (static or dynamic),
- ``s``: an optional per-input-channel ``input_scale`` applied online (smoothing whose
  divisor cannot be folded into a preceding op, e.g. fc2 after GELU; METHODS.md DiTAS),
- ``H``: an optional randomized Hadamard rotation applied online (``rotation_signs``;
  :mod:`ditq.quant.hadamard`), the weight and the branch's R rotated offline to match,
- ``L R``: an optional 16-bit low-rank branch (DiTAS' training-free low-rank module,
  SVDQuant's branch).

The weight lives in one of two forms. While a method works on it, ``weight`` is a float
``Parameter`` and is fake-quantized on every call (differentiable, for reconstruction).
After :meth:`QuantLinear.pack` only the integer codes remain (``weight_codes``: int8/uint8,
two 4-bit codes per byte) with the quantizer's scales: this is the one quantized-weight
format that checkpoints store and that simulated and real execution both read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import DitqError
from ditq.quant.hadamard import rotate
from ditq.quant.quantizer import Quantizer
from ditq.quant.spec import QuantSpec


class QuantLinear(nn.Module):
    """A linear layer with quantized weight and input activation (simulated)."""

    weight_codes: torch.Tensor | None
    input_scale: torch.Tensor | None
    rotation_signs: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        weight_spec.check_weight_shape(out_features, in_features)
        self.weight_quantizer = Quantizer(weight_spec)
        self.act_quantizer = Quantizer(act_spec)
        self.register_buffer("weight_codes", None)
        self.register_buffer("input_scale", None)
        self.register_buffer("rotation_signs", None)
        self.lowrank_down: nn.Parameter | None = None  # R: (rank, in_features)
        self.lowrank_up: nn.Parameter | None = None  # L: (out_features, rank)
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec
    ) -> QuantLinear:
        """Wrap ``linear`` (weights copied, not yet calibrated)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            weight_spec,
            act_spec,
        )
        layer.weight.data = linear.weight.data.detach().clone().float()
        if linear.bias is not None:
            layer.bias.data = linear.bias.data.detach().clone().float()
        return layer.to(linear.weight.device)

    @property
    def packed(self) -> bool:
        return self.weight is None

    @property
    def lowrank_rank(self) -> int:
        return 0 if self.lowrank_up is None else self.lowrank_up.shape[1]

    def calibrate_weight(self) -> None:
        """Weight range search (the spec's min/max, percentile or MSE) on the float weight."""
        if self.weight_quantizer.spec.needs_calibration:
            self.weight_quantizer.find_params(self.weight.detach())

    def set_lowrank(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Install the 16-bit branch ``L (R x)`` with ``L = up`` (out, r), ``R = down`` (r, in),
        stored contiguous as a loaded checkpoint has them (the same matmuls, bit for bit)."""
        for name, factor in (("lowrank_up", up), ("lowrank_down", down)):
            stored = factor.detach().float().clone(memory_format=torch.contiguous_format)
            setattr(self, name, nn.Parameter(stored, requires_grad=False))

    @torch.no_grad()
    def set_rotation(self, signs: torch.Tensor) -> None:
        """Rotate the input online by ``H = diag(signs) · blockdiag(Hadamard) / √b`` and the
        float weight (and the low-rank branch's R) offline by the same H: the output is
        unchanged in float (``X Wᵀ = (X H)(W H)ᵀ``). Before ranges are searched."""
        if self.packed:
            raise DitqError("rotate a layer before its weight is packed")
        if self.rotation_signs is not None:
            raise DitqError("this layer is already rotated")
        signs = signs.detach().float().to(self.weight.device)
        self.weight.data = rotate(self.weight.data, signs)
        if self.lowrank_down is not None:
            self.lowrank_down.data = rotate(self.lowrank_down.data, signs)
        self.rotation_signs = signs

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        """``X̃ = (X / s) H``: what the weight multiplies (module docstring)."""
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.rotation_signs is not None:
            x = rotate(x, self.rotation_signs)
        return x

    def pack(self) -> None:
        """Replace the float weight by its integer codes; the layer's output is unchanged."""
        if self.packed or not self.weight_quantizer.spec.needs_calibration:
            return
        self.weight_codes = self.weight_quantizer.quantize_codes(self.weight.detach())
        self.weight = None
        self._dequantized = None

    def quantized_weight(self) -> torch.Tensor:
        """``Q_w(W)`` as a float tensor (cached once packed, in eager calls only: a cache
        written inside a compiled graph would hold the graph's output buffer, which CUDA
        graphs overwrite at the next replay)."""
        if not self.packed:
            return self.weight_quantizer(self.weight)
        if torch.compiler.is_compiling():
            return self.weight_quantizer.dequantize_codes(self.weight_codes).float()
        if self._dequantized is None or self._dequantized.device != self.weight_codes.device:
            self._dequantized = self.weight_quantizer.dequantize_codes(self.weight_codes).float()
        return self._dequantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformed_input(x)
        weight = self.quantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(self.act_quantizer(x), weight, bias)
        if self.lowrank_up is not None:
            y = y + F.linear(
                F.linear(x, self.lowrank_down.to(x.dtype)), self.lowrank_up.to(x.dtype)
            )
        return y

    def _apply(self, fn, recurse=True):
        self._dequantized = None  # device or dtype moves invalidate the cache
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}, out={self.out_features}"]
        if self.input_scale is not None:
            parts.append("online input scale")
        if self.rotation_signs is not None:
            parts.append("online Hadamard rotation")
        if self.lowrank_rank:
            parts.append(f"low-rank r={self.lowrank_rank}")
        if self.packed:
            parts.append("packed")
        return ", ".join(parts)
