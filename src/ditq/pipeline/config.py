"""What to quantize and how: the settings every method shares.

A method's configuration dataclass subclasses :class:`QuantConfig` and adds its own
hyper-parameters; the pipeline's steps (:mod:`ditq.pipeline.steps`) read only the fields
here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ditq.errors import DitqError
from ditq.models.adapter import LAYER_GROUPS, adapter_for
from ditq.quant.gptq import GPTQSettings
from ditq.quant.spec import (
    UNQUANTIZED_BITS,
    Granularity,
    PerChannel,
    PerColumnGroup,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    check_known_keys,
)

WEIGHT_GRANULARITIES: dict[str, Callable[[int], Granularity]] = {
    "tensor": lambda _: PerTensor(),
    "channel": lambda _: PerChannel(),
    "group": PerGroup,
    "column_group": PerColumnGroup,
    "column_group_strided": lambda size: PerColumnGroup(size, strided=True),
}
"""``w_granularity`` names and their granularity for a group size ``w_group_size``: groups
of g input channels (``group``), of g output channels per input column (``column_group``;
``column_group_strided``: rows strided by C_out / g, DiTAS' official layout)."""
W_GRANULARITIES = tuple(WEIGHT_GRANULARITIES)
WEIGHT_SOLVERS = ("rtn", "gptq")
"""How weights are rounded after their ranges are set: to nearest, or by GPTQ (block by
block, :mod:`ditq.pipeline.gptq_solver`)."""
A_GRANULARITIES = ("tensor", "token", "group")
"""``a_granularity`` names: one range per tensor (static or dynamic), per token (dynamic),
or per group of ``a_group_size`` input channels (dynamic: per token and group, SVDQuant's
W4A4 activations; static: per channel group over all tokens, min/max ranges)."""


@dataclass(frozen=True)
class LayerSelection:
    """Which layer groups a method quantizes (``ditq.models.adapter.LAYER_GROUPS``; each
    method's published default): ``blocks``, the linears of the blocks' attention and MLP;
    ``embedders``, the patch embedding and timestep MLP; ``adaln``, every adaLN modulation
    linear; ``final_layer``, the final projection."""

    blocks: bool = True
    embedders: bool = False
    adaln: bool = False
    final_layer: bool = False

    @classmethod
    def everything(cls) -> LayerSelection:
        """Every linear of the model: PTQ4DiT's official coverage (its ``QuantModel`` wraps
        every ``nn.Linear`` and ``nn.Conv2d``)."""
        return cls(blocks=True, embedders=True, adaln=True, final_layer=True)

    def groups(self) -> tuple[str, ...]:
        return tuple(group for group in LAYER_GROUPS if getattr(self, group))

    def names(self, model: nn.Module) -> list[str]:
        """Module names of the selected layers, in forward order."""
        return adapter_for(model).layer_names(self.groups())


@dataclass
class LayerOverride:
    """Per-layer exception: other bits, or ``keep=True`` to leave the layer in float."""

    wbits: int | None = None
    abits: int | None = None
    keep: bool = False


@dataclass
class QuantConfig:
    """Bits, granularities and layer selection (METHODS.md, "Uniform quantizers").

    ``wbits``/``abits`` of 16 leave weights/activations unquantized (W16A8, W4A16, W16A16
    are valid). ``w_group_size`` is the g of the grouped ``w_granularity`` values (see
    ``WEIGHT_GRANULARITIES``); it must divide the grouped channels of every quantized layer,
    and 2..4-bit codes, stored two per byte, need an even number of input channels (both
    checked when the layers are wrapped); ``a_group_size`` is the g of
    ``a_granularity="group"`` (it must divide every quantized layer's input channels).
    ``attn_bits`` quantizes the inputs of the two attention matmuls (q, k, v, softmax
    output) when below 16. ``weight_solver`` rounds weights to nearest (``rtn``) or with
    GPTQ (``gptq``; ``gptq_*``: its damping, lazy-batch columns and act-order, see
    :class:`ditq.quant.gptq.GPTQSettings`). ``rotate`` rotates every quantized linear's
    input by a randomized Hadamard matrix (online) and its weight offline (seeded by
    ``rotate_seed``; :mod:`ditq.pipeline.rotation`). ``overrides`` maps a layer name or
    glob pattern (``blocks.0.*``, ``*.fc2``) to a :class:`LayerOverride`.
    """

    wbits: int = 8
    abits: int = 8
    w_granularity: str = "channel"
    w_group_size: int = 128
    w_symmetric: bool = False
    w_range: str = "minmax"
    w_fmt: str = "int"
    a_granularity: str = "tensor"
    a_group_size: int = 64
    a_dynamic: bool = False
    a_symmetric: bool = False
    a_range: str = "minmax"
    a_fmt: str = "int"
    attn_bits: int = UNQUANTIZED_BITS
    weight_solver: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = True
    rotate: bool = False
    rotate_seed: int = 0
    layers: LayerSelection = field(default_factory=LayerSelection)
    overrides: dict[str, LayerOverride] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.w_granularity not in W_GRANULARITIES:
            raise DitqError(
                f"weight granularity {self.w_granularity!r} is not supported; choose one of "
                f"{', '.join(W_GRANULARITIES)}"
            )
        if self.a_granularity not in A_GRANULARITIES:
            raise DitqError(
                f"activation granularity {self.a_granularity!r} is not supported; choose one "
                f"of {', '.join(A_GRANULARITIES)}"
            )
        if self.a_granularity == "token" and not self.a_dynamic:
            raise DitqError(
                "per-token activation ranges are computed from each live tensor: add "
                "--a-dynamic, or use --a-granularity tensor for static ranges"
            )
        if self.weight_solver not in WEIGHT_SOLVERS:
            raise DitqError(
                f"weight solver {self.weight_solver!r} is unknown; choose one of "
                f"{', '.join(WEIGHT_SOLVERS)}"
            )
        self.gptq_settings()  # validates
        if self.a_granularity == "group" and not self.a_dynamic and self.a_range != "minmax":
            raise DitqError(
                f"static per-group activation ranges are min/max ranges; --a-range "
                f"{self.a_range} needs --a-granularity tensor (or add --a-dynamic)"
            )
        self.overrides = {
            k: v if isinstance(v, LayerOverride) else LayerOverride(**v)
            for k, v in self.overrides.items()
        }
        # Build every spec once so that bad combinations fail here, not mid-calibration.
        self.weight_spec()
        self.act_spec()
        self.attention_spec()

    def _override(self, layer: str | None) -> LayerOverride | None:
        if layer is None:
            return None
        matches = [v for k, v in self.overrides.items() if fnmatch.fnmatchcase(layer, k)]
        if not matches:
            return None
        # Later patterns win for bits; "keep in float" from any pattern wins over bits.
        wbits = [m.wbits for m in matches if m.wbits is not None]
        abits = [m.abits for m in matches if m.abits is not None]
        return LayerOverride(
            wbits=wbits[-1] if wbits else None,
            abits=abits[-1] if abits else None,
            keep=any(m.keep for m in matches),
        )

    def keeps_float(self, layer: str) -> bool:
        override = self._override(layer)
        return override is not None and override.keep

    def weight_spec(self, layer: str | None = None) -> QuantSpec:
        override = self._override(layer)
        bits = override.wbits if override and override.wbits is not None else self.wbits
        granularity = WEIGHT_GRANULARITIES[self.w_granularity](self.w_group_size)
        return QuantSpec(
            bits=bits,
            symmetric=self.w_symmetric or self.w_fmt == "fp8_e4m3",
            granularity=granularity,
            fmt=self.w_fmt,
            range_method=self.w_range,
        )

    def act_spec(self, layer: str | None = None) -> QuantSpec:
        override = self._override(layer)
        bits = override.abits if override and override.abits is not None else self.abits
        return QuantSpec(
            bits=bits,
            symmetric=self.a_symmetric or self.a_fmt == "fp8_e4m3",
            granularity=self._act_granularity(),
            dynamic=self.a_dynamic,
            fmt=self.a_fmt,
            range_method="minmax" if self.a_dynamic else self.a_range,
        )

    def _act_granularity(self) -> Granularity:
        if self.a_granularity == "token":
            return PerToken()
        if self.a_granularity == "group":
            return PerGroup(self.a_group_size)
        return PerTensor()

    def attention_spec(self) -> QuantSpec:
        """Spec of the attention matmul inputs (static per tensor unless ``a_dynamic``)."""
        return QuantSpec(
            bits=self.attn_bits,
            symmetric=self.a_symmetric,
            granularity=PerTensor(),
            dynamic=self.a_dynamic,
            range_method="minmax" if self.a_dynamic else self.a_range,
        )

    def gptq_settings(self) -> GPTQSettings:
        return GPTQSettings(self.gptq_damp, self.gptq_block_size, self.gptq_act_order)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = asdict(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        check_known_keys(cls, data)
        data = dict(data)
        if "layers" in data:
            data["layers"] = LayerSelection(**data["layers"])
        return cls(**data)
