"""Model adapters: what the quantization pipeline may know about a model family.

Methods, calibration hooks and the sequential driver never parse module names: they ask
the model's adapter (:func:`adapter_for`). One adapter module per family answers

- which linears can be quantized, in forward order, and the group each belongs to
  (``LAYER_GROUPS``: the selection ``--layers`` picks from);
- the transformer blocks, and each block's linears by *role* (``BLOCK_ROLES``; a role holds
  the linears that read one input: a fused qkv, or separate q, k and v projections);
- where a linear's input can absorb a per-channel factor offline (:class:`AdaLNFold`,
  :class:`ValueRowsFold`) or not at all (``None``: the factor is applied online);
- the attention modules whose matmul inputs can be quantized (each exposes the hook
  points ``MATMUL_POINTS`` and an ``explicit_matmuls`` switch);
- the units of sequential (block-by-block) calibration, in forward order;
- how to call the denoiser on ``(x, t, condition)`` and how many tokens an entry has.

A new family subclasses :class:`ModelAdapter` (its ``model_class`` and answers) and
registers with :func:`register_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditq.errors import DitqError

LAYER_GROUPS = ("blocks", "embedders", "adaln", "final_layer")
"""Layer groups: the linears inside the transformer blocks' attention and MLP; the input
embedders (patch, timestep); the adaLN modulation linears; the final projection."""
BLOCK_ROLES = ("qkv", "proj", "fc1", "fc2")
"""Roles of a block's linears: the attention's input projection(s) and output projection,
the MLP's first and second linear. The linears of one role read the same input, so one
per-channel factor on that input serves them all."""
MATMUL_POINTS = ("q_act", "k_act", "v_act", "attn_act")
"""Hook points of a quantizable attention module on the inputs of Q·Kᵀ (q, k) and P·V
(softmax output, v); they run when its ``explicit_matmuls`` is set."""


def explicit_attention(
    attn: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attn_act(softmax((q_act(q) · scale) k_act(k)ᵀ + mask)) · v_act(v)`` for q, k, v of
    shape (B, H, N, D): the explicit matmuls of a quantizable attention module, or its
    ``fused_matmuls`` (a kernel that quantizes and multiplies in one, set by the ``cuda``
    backend) when it has one that runs on q's device."""
    fused = getattr(attn, "fused_matmuls", None)
    if fused is not None and fused.runs_on(q.device):
        return fused(q, k, v, scale, mask)
    q, k, v = attn.q_act(q), attn.k_act(k), attn.v_act(v)
    scores = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    return attn.attn_act(scores.softmax(dim=-1)) @ v


@dataclass(frozen=True)
class AdaLNFold:
    """The input is ``modulate(norm(x), shift, scale)`` with shift and scale chunks
    ``shift_chunk`` and ``scale_chunk`` (of ``width`` rows each) of the output of the
    linear ``producer``: a per-channel factor folds into those rows."""

    producer: str
    shift_chunk: int
    scale_chunk: int


@dataclass(frozen=True)
class ValueRowsFold:
    """The input is the attention output ``P·V``: a per-channel factor folds into the V
    rows of the linear ``producer``: the last third (head-major) of a ``fused`` qkv, or
    every row of a separate v projection."""

    producer: str
    fused: bool = True


InputFold = AdaLNFold | ValueRowsFold


@dataclass(frozen=True)
class Unit:
    """A unit of sequential calibration: a block (called on the inputs it receives in the
    model's forward) or a single linear, by module name."""

    name: str
    is_block: bool


class ModelAdapter:
    """Structural questions about one model, answered for its family (module docstring)."""

    family = ""
    """The family's name, recorded in quantized directories."""
    model_class: type[nn.Module] = nn.Module
    """The model class this adapter answers for."""

    chained_blocks = False
    """Whether block ``i + 1`` is called on block ``i``'s output as its first positional
    input and on the same other inputs (then the sequential driver computes a block's
    inputs from the block before it instead of running the model up to it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_class)

    @classmethod
    def build(cls, architecture: dict) -> nn.Module:
        """An (uninitialized) model of the family from :meth:`architecture`'s dict."""
        raise NotImplementedError

    def architecture(self) -> dict:
        """The JSON-serializable configuration :meth:`build` takes."""
        raise NotImplementedError

    def quantizable_layers(self) -> list[tuple[str, str]]:
        """``(name, group)`` of every quantizable linear, in forward order."""
        raise NotImplementedError

    def num_blocks(self) -> int:
        raise NotImplementedError

    def block_name(self, index: int) -> str:
        raise NotImplementedError

    def block_layers(self, index: int) -> dict[str, tuple[str, ...]]:
        """Role (``BLOCK_ROLES``) to the module names of block ``index``'s linears of that
        role (one name, or several reading the same input)."""
        raise NotImplementedError

    def input_fold(self, layer: str) -> InputFold | None:
        """Where ``layer``'s input can absorb a per-channel factor; None: nowhere."""
        raise NotImplementedError

    def attention_modules(self) -> dict[str, nn.Module]:
        """Name to module of every attention whose matmuls can be quantized."""
        raise NotImplementedError

    def sequential_units(self, quantized: list[str]) -> list[Unit]:
        """The units of block-by-block calibration for the quantized layers ``quantized``,
        in forward order."""
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for inputs ``x`` at timesteps ``t`` with ``condition``
        (every family's model takes the official DiT's ``(x, t, y)``)."""
        return self.model(x, t, condition)

    def tokens_per_entry(self) -> int:
        """Tokens per calibration entry in a block's input (from the model's DiTConfig)."""
        config = self.model.config
        return (config.input_size // config.patch_size) ** 2

    # Derived answers, the same for every family.

    def layer_names(self, groups: tuple[str, ...] | list[str] = LAYER_GROUPS) -> list[str]:
        """The quantizable linears of ``groups``, in forward order."""
        unknown = set(groups) - set(LAYER_GROUPS)
        if unknown:
            raise DitqError(f"unknown layer groups {sorted(unknown)}; choose from {LAYER_GROUPS}")
        return [name for name, group in self.quantizable_layers() if group in groups]

    def role_groups(self, roles: tuple[str, ...] | list[str]) -> list[tuple[str, ...]]:
        """The linears of each given role (each group reads one input), block by block, in
        the order ``roles`` lists."""
        groups = []
        for index in range(self.num_blocks()):
            layers = self.block_layers(index)
            groups += [layers[role] for role in roles if role in layers]
        return groups

    def role_of(self, layer: str) -> tuple[int, str] | None:
        """``(block index, role)`` of a block linear, None for other layers."""
        for index in range(self.num_blocks()):
            for role, names in self.block_layers(index).items():
                if layer in names:
                    return index, role
        return None

    def attention_points(self) -> list[str]:
        """Module names of every attention matmul hook point."""
        return [f"{name}.{point}" for name in self.attention_modules() for point in MATMUL_POINTS]


_FAMILIES: list[type[ModelAdapter]] = []


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Make ``adapter`` answer for the models its ``matches`` accepts (a class decorator)."""
    _FAMILIES.append(adapter)
    return adapter


def _families() -> list[type[ModelAdapter]]:
    import ditq.models  # noqa: F401  (registers the bundled families)

    return _FAMILIES


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family, or one error naming the families ditq knows."""
    for family in _families():
        if family.matches(model):
            return family(model)
    known = ", ".join(family.family for family in _families())
    raise DitqError(f"ditq has no adapter for a {type(model).__name__} (families: {known})")


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter registered as ``family``."""
    for adapter in _families():
        if adapter.family == family:
            return adapter
    known = ", ".join(adapter.family for adapter in _families())
    raise DitqError(f"model family {family!r} is not known to this ditq (families: {known})")
