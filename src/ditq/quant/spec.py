"""What a quantizer does: granularity objects and ``QuantSpec`` (METHODS.md, "Uniform quantizers").

Granularity says which elements share one range (one step size Δ and zero point z):

- ``PerTensor()``: the whole tensor.
- ``PerChannel()``: each slice along dim 0, i.e. each output channel (row) of a weight W of
  shape (C_out, C_in).
- ``PerGroup(g)``: each run of g consecutive elements along the last dim, i.e. groups of g
  input channels of W; every row has C_in / g groups.
- ``PerColumnGroup(g)``: groups of g output channels within one input column, i.e. the
  elements ``W[g·k : g·k + g, j]``; with ``strided=True`` the rows ``r, r + C_out/g, ...,
  r + (g-1)·C_out/g`` of column j instead (the layout of DiTAS' official quantizer, which
  reshapes W to (g, -1) and takes min/max over dim 0). A column group lies in one input
  column, so scaling columns (smoothing) scales its range and commutes with quantization.
- ``PerToken()``: each row over the last dim of an activation (tokens, C); always dynamic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from ditq.errors import DitqError

FORMATS = ("int", "fp8_e4m3")
RANGE_METHODS = ("minmax", "percentile", "percentile_search", "mse")
SEARCHED_PERCENTILES = (99.9, 99.99, 99.999)
"""The candidates of ``percentile_search`` (PTQ4DiT's and Q-Diffusion's official "mse")."""
UNQUANTIZED_BITS = 16
PACKED_BITS = 4
"""Codes of at most this many bits are stored two per byte (``ditq.quant.packing``)."""


@dataclass(frozen=True)
class PerTensor:
    """One range for the whole tensor."""

    name: ClassVar[str] = "per_tensor"

    def describe(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    """One range per slice along dim 0 (per output channel of a weight)."""

    name: ClassVar[str] = "per_channel"

    def describe(self) -> str:
        return "per-channel"


@dataclass(frozen=True)
class _GroupSize:
    """Shared validation of grouped granularities: a positive int ``group_size`` that must
    divide the channels it groups (``grouped_axis``: "input" or "output")."""

    group_size: int
    grouped_axis: ClassVar[str] = "input"

    def __post_init__(self) -> None:
        kind = type(self).__name__
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise DitqError(
                f"{kind}: group_size must be an int, got {self.group_size!r}; pass e.g. {kind}(128)"
            )
        if self.group_size < 1:
            raise DitqError(
                f"{kind}: group_size={self.group_size} is not positive; pass a positive "
                f"divisor of the {self.grouped_axis} channels, e.g. {kind}(128)"
            )

    def check_divides(self, num_channels: int, layer: str = "", tensor: str = "weight") -> None:
        """Raise DitqError unless ``group_size`` divides ``num_channels`` (the grouped dim)
        of a ``tensor`` ("weight" or "activation"), naming the flags that fix it."""
        if num_channels % self.group_size == 0:
            return
        divisor = max(d for d in range(1, self.group_size + 1) if num_channels % d == 0)
        where = f"layer {layer!r} with " if layer else ""
        other = (
            "per-channel weights (--w-granularity channel)"
            if tensor == "weight"
            else "per-token activations (--a-granularity token)"
        )
        raise DitqError(
            f"{tensor} group size {self.group_size} (--{tensor[0]}-group-size) does not divide "
            f"{where}{num_channels} {self.grouped_axis} channels; use a divisor of "
            f"{num_channels} such as {divisor}, or {other}"
        )


@dataclass(frozen=True)
class PerGroup(_GroupSize):
    """One range per ``group_size`` consecutive elements of the last dim (input channels)."""

    name: ClassVar[str] = "per_group"

    def describe(self) -> str:
        return f"per-group({self.group_size})"


@dataclass(frozen=True)
class PerColumnGroup(_GroupSize):
    """One range per ``group_size`` output channels (rows) of one input column: rows
    ``g·k .. g·k + g - 1``, or with ``strided`` rows ``r + i·C_out/g`` (i < g)."""

    strided: bool = False
    name: ClassVar[str] = "per_column_group"
    grouped_axis: ClassVar[str] = "output"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.strided, bool):
            raise DitqError(f"PerColumnGroup: strided must be a bool, got {self.strided!r}")

    def describe(self) -> str:
        return f"per-column-group({self.group_size}{', strided' if self.strided else ''})"


@dataclass(frozen=True)
class PerToken:
    """One range per token: per row over the last dim, from the live tensor (dynamic)."""

    name: ClassVar[str] = "per_token"

    def describe(self) -> str:
        return "per-token"


Granularity = PerTensor | PerChannel | PerGroup | PerColumnGroup | PerToken
GRANULARITY_BY_NAME: dict[str, type[Granularity]] = {
    cls.name: cls for cls in (PerTensor, PerChannel, PerGroup, PerColumnGroup, PerToken)
}


def check_known_keys(cls: type, data: dict[str, Any]) -> None:
    """Raise DitqError when ``data`` (a saved ``to_dict``) has keys ``cls`` does not know,
    i.e. when it was written by another ditq version."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DitqError(
            f"{cls.__name__}.from_dict: unknown keys {unknown}; expected a subset of "
            f"{sorted(known)} (written by another ditq version?)"
        )


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range ``(q_min, q_max)``: symmetric ``[-2^(b-1), 2^(b-1)-1]`` (two's
    complement, the scale maps the absolute maximum to ``2^(b-1)-1``), asymmetric
    ``[0, 2^b-1]``."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized (METHODS.md, "Uniform quantizers").

    ``bits == 16`` means not quantized (``enabled`` is False), so W16A8 or W4A16 are
    plain specs. ``fmt="fp8_e4m3"`` is 8-bit floating point with one scale per range
    (amax / 448) and no zero point. ``range_method`` picks the clipping range of static
    specs: ``"minmax"``, ``"percentile"`` (``percentile`` and ``100 - percentile``),
    ``"percentile_search"`` (of the ranges [100 - p, p] for p in
    :data:`SEARCHED_PERCENTILES`, the one with the smallest L2 error: the official
    PTQ4DiT/Q-Diffusion "mse" mode) or ``"mse"`` (the ratio among ``mse_grid`` clipping
    ratios from 1.0 down to 0.2 of min/max that minimizes the L_``mse_norm`` error).
    Dynamic specs take min/max of the live tensor.
    """

    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    dynamic: bool = False
    fmt: str = "int"
    range_method: str = "minmax"
    percentile: float = 99.99
    mse_grid: int = 80
    mse_norm: float = 2.0

    def __post_init__(self) -> None:
        if self.bits != UNQUANTIZED_BITS and not 2 <= self.bits <= 8:
            raise DitqError(
                f"QuantSpec: bits={self.bits} is not supported; "
                "use 2..8 to quantize, or 16 to leave the tensor unquantized"
            )
        if self.fmt not in FORMATS:
            raise DitqError(f"QuantSpec: fmt={self.fmt!r} is unknown; use one of {FORMATS}")
        if self.fmt == "fp8_e4m3" and self.bits != 8:
            raise DitqError(
                f"QuantSpec: fmt='fp8_e4m3' has 8 bits, got bits={self.bits}; "
                "use bits=8 with fp8_e4m3, or fmt='int' for other bit widths"
            )
        if self.fmt == "fp8_e4m3" and not self.symmetric:
            raise DitqError(
                "QuantSpec: fmt='fp8_e4m3' has no zero point; pass symmetric=True with it"
            )
        if not isinstance(self.granularity, Granularity):
            raise DitqError(
                f"QuantSpec: granularity={self.granularity!r} is not a granularity; "
                "use PerTensor(), PerChannel(), PerGroup(g), PerColumnGroup(g) or PerToken()"
            )
        if isinstance(self.granularity, PerToken) and not self.dynamic:
            raise DitqError(
                "QuantSpec: PerToken ranges come from the live tensor; pass dynamic=True, "
                "or use PerTensor() for a static (calibrated) activation range"
            )
        if self.range_method not in RANGE_METHODS:
            raise DitqError(
                f"QuantSpec: range_method={self.range_method!r} is unknown; "
                f"use one of {RANGE_METHODS}"
            )
        if self.dynamic and self.range_method != "minmax":
            raise DitqError(
                f"QuantSpec: dynamic quantization takes min/max of the live tensor, so "
                f"range_method={self.range_method!r} cannot apply; use range_method='minmax' "
                "with dynamic=True, or dynamic=False to calibrate a static range"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise DitqError(
                f"QuantSpec: percentile={self.percentile} is outside (50, 100]; it is the upper "
                "percentile (the lower one is 100 - percentile), e.g. 99.99"
            )
        if self.mse_grid < 1:
            raise DitqError(
                f"QuantSpec: mse_grid={self.mse_grid} must be at least 1 (number of clipping "
                "ratios searched), e.g. 80"
            )
        if self.mse_norm <= 0:
            raise DitqError(
                f"QuantSpec: mse_norm={self.mse_norm} must be positive (the p of the L_p "
                "error), e.g. 2.0"
            )

    @property
    def enabled(self) -> bool:
        """False for ``bits == 16`` (the tensor passes through unchanged)."""
        return self.bits != UNQUANTIZED_BITS

    @property
    def needs_calibration(self) -> bool:
        """True for enabled static specs: their range must be found before use."""
        return self.enabled and not self.dynamic

    def check_divides(self, num_channels: int, layer: str = "", tensor: str = "weight") -> None:
        """Raise DitqError if a per-group spec's group size does not divide the channels."""
        if isinstance(self.granularity, PerGroup):
            self.granularity.check_divides(num_channels, layer, tensor)

    def check_weight_shape(self, out_features: int, in_features: int, layer: str = "") -> None:
        """Raise DitqError unless this spec fits a (``out_features``, ``in_features``) weight:
        group sizes divide the grouped channels (input for ``PerGroup``, output for
        ``PerColumnGroup``), and codes of at most 4 bits, stored two per byte along the
        input dim, need an even number of input channels."""
        self.check_divides(in_features, layer)
        if isinstance(self.granularity, PerColumnGroup):
            self.granularity.check_divides(out_features, layer)
        if self.enabled and self.fmt == "int" and self.bits <= PACKED_BITS and in_features % 2:
            where = f"layer {layer!r}" if layer else "a layer"
            raise DitqError(
                f"{self.bits}-bit weight codes are stored two per byte along the input dim, but "
                f"{where} has {in_features} input channels (odd); use 5..8 bits for it (an "
                "override) or keep it in float"
            )

    def describe(self) -> str:
        """Short summary, e.g. ``"int4 asym per-group(128) minmax"``."""
        if not self.enabled:
            return "16-bit (not quantized)"
        if self.fmt == "int":
            words = [f"int{self.bits}", "sym" if self.symmetric else "asym"]
        else:
            words = [self.fmt]
        words.append(self.granularity.describe())
        if self.dynamic:
            words.append("dynamic")
        elif self.range_method == "percentile":
            words.append(f"percentile({self.percentile:g})")
        elif self.range_method == "percentile_search":
            words.append("best-of-percentiles(" + "/".join(map(str, SEARCHED_PERCENTILES)) + ")")
        elif self.range_method == "mse":
            words.append(f"mse(p={self.mse_norm:g}, grid={self.mse_grid})")
        else:
            words.append("minmax")
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (used in saved checkpoints); inverse of ``from_dict``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["granularity"] = {"type": self.granularity.name, **asdict(self.granularity)}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Rebuild a spec from ``to_dict`` output; unknown keys raise DitqError."""
        check_known_keys(cls, data)
        kwargs = dict(data)
        if "granularity" in kwargs:
            kwargs["granularity"] = _granularity_from_dict(kwargs["granularity"])
        return cls(**kwargs)


def _granularity_from_dict(data: dict[str, Any]) -> Granularity:
    params = dict(data)
    kind = params.pop("type", None)
    if kind not in GRANULARITY_BY_NAME:
        raise DitqError(
            f"QuantSpec.from_dict: granularity type {kind!r} is unknown; "
            f"use one of {sorted(GRANULARITY_BY_NAME)}"
        )
    try:
        return GRANULARITY_BY_NAME[kind](**params)
    except TypeError as err:
        raise DitqError(f"QuantSpec.from_dict: bad parameters for {kind}: {err}") from err
