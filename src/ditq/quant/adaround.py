"""AdaRound (Nagel et al., 2020): learned up/down rounding of a ``QuantLinear`` weight
(METHODS.md, PTQ4DiT, "Quantizers and reconstruction (official)").

With the weight quantizer's calibrated step Δ and zero point z (any granularity: they are
spread to every element through the ``to_range_groups`` view), each weight element is
rounded down or up by a continuous variable V through the rectified sigmoid
``h(V) = clamp(σ(V)(ζ - γ) + γ, 0, 1)``, ζ = 1.1, γ = -0.1:

    W̃ = Δ · (clamp(⌊W/Δ⌋ + h(V) + z, q_min, q_max) - z)          (soft, while learning)
    Ŵ = Δ · (clamp(⌊W/Δ⌋ + 1[h(V) ≥ 0.5] + z, q_min, q_max) - z)   (hard, at the end)

V starts where ``h(V)`` equals the fractional part ``W/Δ - ⌊W/Δ⌋``, so that W̃ = W (up to
clipping) before any step. The rounding regularizer ``Σ 1 - |2h(V) - 1|^β`` drives every
h(V) to 0 or 1 as β is annealed. ``h(V) ≥ 0.5`` is ``V ≥ 0``.

While a layer learns its rounding, an :class:`AdaRoundWeight` stands in for its weight
quantizer, so that ``QuantLinear.forward`` uses W̃ unchanged; :func:`adaround` installs it
and, on success, bakes Ŵ into the float weight as exact grid values, so that
``QuantLinear.pack()`` later stores exactly the learned codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ditq.errors import DitqError
from ditq.quant.layers import QuantLinear
from ditq.quant.quantizer import MIN_SCALE, Quantizer, to_range_groups
from ditq.quant.spec import Granularity, integer_range

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(σ(V)(ζ - γ) + γ, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(rest: torch.Tensor) -> torch.Tensor:
    """The V with ``h(V) = rest`` for ``rest`` in [0, 1): ``-log((ζ - γ) / (rest - γ) - 1)``."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ 1 - |2h - 1|^β``: 0 where every h is 0 or 1, one per element at h = 0.5."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def supports_adaround(layer: QuantLinear) -> bool:
    """True for an unpacked layer whose weight has a static integer quantizer (16-bit and
    FP8 weights have no rounding to learn)."""
    if isinstance(layer.weight_quantizer, AdaRoundWeight):
        raise DitqError("AdaRound is already installed on this layer")
    spec = layer.weight_quantizer.spec
    return not layer.packed and spec.needs_calibration and spec.fmt == "int"


def per_element(
    grouped: torch.Tensor, like: torch.Tensor, granularity: Granularity
) -> torch.Tensor:
    """Values given per range group (shaped as a quantizer's scale) broadcast to every element
    of ``like``, for any granularity: written through the ``to_range_groups`` view."""
    out = torch.empty_like(like, dtype=grouped.dtype)
    view = to_range_groups(out, granularity)
    view.copy_(grouped.expand_as(view))
    return out


class AdaRoundWeight(nn.Module):
    """Learned rounding of one weight: the stand-in for a ``QuantLinear``'s weight quantizer.

    ``forward`` ignores its argument (the float weight it was built from) and returns the
    soft weight W̃ while ``soft`` is set, else the hard weight Ŵ. ``quantizer`` is the
    calibrated weight quantizer; its Δ and z (not learned) are taken per element once, so
    that W̃ and Ŵ are element-wise in the weight's own layout.
    """

    def __init__(self, weight: torch.Tensor, quantizer: Quantizer) -> None:
        super().__init__()
        spec = quantizer.spec
        if spec.fmt != "int" or not spec.needs_calibration:
            raise DitqError(
                f"AdaRound learns the rounding of static integer weights; this weight is "
                f"{spec.describe()} (check supports_adaround(layer) first)"
            )
        if not quantizer.calibrated:
            raise DitqError(
                "AdaRound needs the weight quantizer's step sizes; call "
                "layer.calibrate_weight() (or calibrate_weights(model)) first"
            )
        self.quantizer = quantizer
        self.code_range = integer_range(spec.bits, spec.symmetric)
        self.soft = True
        weight = weight.detach().float()
        step = quantizer.scale.detach().clamp(min=MIN_SCALE)
        self.register_buffer("step", per_element(step, weight, spec.granularity))
        self.register_buffer("zero", per_element(quantizer.zero_point, weight, spec.granularity))
        scaled = weight / self.step
        self.register_buffer("floor_codes", torch.floor(scaled))
        rest = (scaled - self.floor_codes).double()  # exact: subtracting the integer part
        self.V = nn.Parameter(inverse_rectified_sigmoid(rest).float())

    def soft_rounding(self) -> torch.Tensor:
        """h(V) per element, in [0, 1]."""
        return rectified_sigmoid(self.V)

    def hard_rounding(self) -> torch.Tensor:
        """``1[h(V) ≥ 0.5]`` per element, i.e. ``V ≥ 0``."""
        return (self.V >= 0).to(self.floor_codes.dtype)

    def _from_rounding(self, rounding: torch.Tensor) -> torch.Tensor:
        codes = torch.clamp(self.floor_codes + rounding + self.zero, *self.code_range)
        return (codes - self.zero) * self.step

    def forward(self, _weight: torch.Tensor | None = None) -> torch.Tensor:
        """W̃ (soft) or Ŵ (hard), shaped like the weight."""
        return self._from_rounding(self.soft_rounding() if self.soft else self.hard_rounding())

    def hard_weight(self) -> torch.Tensor:
        """Ŵ: values of the quantization grid that the weight quantizer maps to themselves."""
        with torch.no_grad():
            return self._from_rounding(self.hard_rounding())

    def regularizer(self, beta: float) -> torch.Tensor:
        """The rounding regularizer ``Σ 1 - |2h(V) - 1|^β`` of this weight."""
        return rounding_regularizer(self.soft_rounding(), beta)

    def extra_repr(self) -> str:
        return f"{'soft' if self.soft else 'hard'} rounding, {self.quantizer.spec.describe()}"


def install_adaround(layer: QuantLinear) -> AdaRoundWeight:
    """Put an :class:`AdaRoundWeight` in place of ``layer.weight_quantizer`` (soft mode)."""
    if layer.packed:
        raise DitqError(
            "AdaRound needs the float weight, but the layer is packed; reconstruct before "
            "pack_model(model)"
        )
    if isinstance(layer.weight_quantizer, AdaRoundWeight):
        raise DitqError("AdaRound is already installed on this layer")
    rounder = AdaRoundWeight(layer.weight, layer.weight_quantizer)
    layer.weight_quantizer = rounder
    return rounder


def remove_adaround(layer: QuantLinear, harden: bool) -> None:
    """Give ``layer`` its weight quantizer back; with ``harden``, first replace the float
    weight by the hard-rounded Ŵ (exact grid values, so ``pack()`` stores these codes)."""
    rounder = layer.weight_quantizer
    if not isinstance(rounder, AdaRoundWeight):
        raise DitqError("AdaRound is not installed on this layer")
    if harden:
        layer.weight.data = rounder.hard_weight().to(layer.weight.dtype)
    layer.weight_quantizer = rounder.quantizer


@contextmanager
def adaround(layers: Iterable[QuantLinear]) -> Iterator[list[AdaRoundWeight]]:
    """Learn the rounding of ``layers`` inside the block: yields their
    :class:`AdaRoundWeight` (layers that cannot use AdaRound are left as they are, see
    :func:`supports_adaround`). A normal exit hardens the rounding into the weights; an
    exception restores the layers untouched."""
    installed: list[QuantLinear] = []
    try:
        rounders = []
        for layer in layers:
            if supports_adaround(layer):
                rounders.append(install_adaround(layer))
                installed.append(layer)
        yield rounders
        for layer in installed:
            remove_adaround(layer, harden=True)
    finally:
        for layer in installed:
            if isinstance(layer.weight_quantizer, AdaRoundWeight):
                remove_adaround(layer, harden=False)
