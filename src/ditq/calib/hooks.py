"""Forward hooks over a calibration set: input statistics, captured layer inputs and block
inputs/outputs. This is the only module in ditq that registers hooks for statistics.

Every method in METHODS.md works on the input activation X of a layer (``s(X_j)`` for
PTQ4DiT's CSB and DiTAS' TAS, static activation ranges for all of them), so statistics are
taken with forward pre-hooks. Hooks are removed however the run ends. Observers are any
object with an ``update(tensor)`` method (e.g. those of :mod:`ditq.quant`); nothing else is
kept, so memory does not grow with the calibration set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from ditq.calib.dataset import CalibrationSet
from ditq.errors import DitqError
from ditq.models.adapter import adapter_for


class Observer(Protocol):
    """Anything that folds activation batches into running statistics."""

    def update(self, x: torch.Tensor) -> None: ...


ObserverFactory = Callable[[str], Observer]
"""``factory(layer_name)``: a fresh observer for that layer."""


def attention_point_names(model: nn.Module) -> list[str]:
    """Names of the attention-matmul hook points (q, k, v, softmax output) of every
    quantizable attention (the model's adapter lists them)."""
    return adapter_for(model).attention_points()


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``, or a :class:`DitqError` saying it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise DitqError(f"the model has no layer named {name!r}") from err


@contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run every attention of ``model`` through its explicit matmuls (so that the ``q_act``,
    ``k_act``, ``v_act`` and ``attn_act`` hook points run); restores the flags on exit."""
    attentions = [m for m in model.modules() if hasattr(m, "explicit_matmuls")]
    previous = [m.explicit_matmuls for m in attentions]
    try:
        for attention in attentions:
            attention.explicit_matmuls = True
        yield model
    finally:
        for attention, flag in zip(attentions, previous, strict=True):
            attention.explicit_matmuls = flag


def collect_input_stats(
    model: nn.Module,
    calib: CalibrationSet,
    observer_factory: ObserverFactory,
    layer_names: Sequence[str],
    per_timestep: bool = False,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Feed the input of each named layer, over the whole calibration set, to observers.

    Inputs reach the observer as rows (tokens, C_in) (``reshape(-1, C_in)``; the softmax
    output becomes (rows, keys)). Returns
    ``{name: observer}``, or with ``per_timestep`` ``{name: {t: observer}}`` over
    ``calib.timesteps()`` (PTQ4DiT's SSC and DiTAS' TAS need per-timestep ``s(X^(t))``).
    Observers get the live activation on ``device`` (the model's by default) and must copy
    what they keep. Names ending in ``_act`` switch on :func:`explicit_attention`.
    """
    layers = {name: get_layer(model, name) for name in layer_names}
    if not layers:
        raise DitqError("no layers to collect statistics for")
    if per_timestep:
        stats = {name: {t: observer_factory(name) for t in calib.timesteps()} for name in layers}
        active: dict[str, Observer] = {}

        def select_timestep(index: torch.Tensor) -> None:
            timestep = int(calib.t[index[0]])
            active.update({name: per_t[timestep] for name, per_t in stats.items()})

    else:
        stats = {name: observer_factory(name) for name in layers}
        active = stats
        select_timestep = None

    def observe(name: str, layer: nn.Module) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            active[name].update(_as_rows(layer, args[0]))

        return hook

    _run_with_input_hooks(
        model,
        calib,
        {name: (layer, observe(name, layer)) for name, layer in layers.items()},
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="collecting statistics",
        by_timestep=True,
        before_forward=select_timestep,
    )
    return stats


def capture_inputs(
    model: nn.Module,
    calib: CalibrationSet,
    layer: str | nn.Module,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_tokens: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The input of one layer over the calibration set, on the CPU, as rows (tokens, C_in)
    in the set's entry order.

    ``max_tokens`` keeps at most that many rows, drawn uniformly (seeded) from every batch
    so that all timesteps stay represented (e.g. DiTAS' α search, METHODS.md). The forward
    stops right after the layer's input is seen.
    """
    name, _ = _resolve_layer(model, layer)
    return capture_layer_inputs(
        model, calib, [name], batch_size, device, progress, max_tokens, seed
    )[name]


def capture_layer_inputs(
    model: nn.Module,
    calib: CalibrationSet,
    layers: Sequence[str],
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_tokens: int | None = None,
    seed: int = 0,
    observers: dict[str, Observer] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`capture_inputs` for several layers in one pass over the set (e.g. the four
    linears of a block): each forward stops once every layer's input has been seen.
    ``observers`` (by layer name) also see each layer's every input row, before
    ``max_tokens`` subsampling (e.g. the salience of the same pass)."""
    resolved = [_resolve_layer(model, layer) for layer in layers]
    if max_tokens is not None and max_tokens < 1:
        raise DitqError(f"max_tokens must be at least 1, got {max_tokens}")
    generator = torch.Generator().manual_seed(seed)
    batch_entries: list[int] = []
    rows: dict[str, list[torch.Tensor]] = {name: [] for name, _ in resolved}
    seen: set[str] = set()

    def hook_for(name: str, module: nn.Module) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            live = _as_rows(module, args[0])
            if observers is not None and name in observers:
                observers[name].update(live)
            x = live.detach().cpu()
            if max_tokens is not None:
                rows_per_entry = len(x) // batch_entries[-1]
                fraction = min(1.0, max_tokens / (rows_per_entry * len(calib)))
                keep = torch.randperm(len(x), generator=generator)[: round(len(x) * fraction)]
                x = x[keep.sort().values]
            rows[name].append(x)
            seen.add(name)
            if len(seen) == len(rows):
                raise _StopForward

        return hook

    def before_forward(index: torch.Tensor) -> None:
        batch_entries.append(len(index))
        seen.clear()

    _run_with_input_hooks(
        model,
        calib,
        {name: (module, hook_for(name, module)) for name, module in resolved},
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc=f"capturing inputs of {', '.join(rows)}",
        by_timestep=False,
        before_forward=before_forward,
    )
    return {name: torch.cat(parts)[:max_tokens] for name, parts in rows.items()}


@dataclass
class BlockIO:
    """The positional tensor arguments ``args`` and tensor keyword arguments ``kwargs``
    (each (N, ...)) and the output ``out`` of one block for every calibration entry, in the
    set's entry order, on the CPU (a DiT block: ``args = (x, c)``; a diffusers block:
    ``args = (x,)``, ``kwargs = {"timestep": t, "class_labels": y}``)."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]
    out: torch.Tensor


def capture_block_io(
    model: nn.Module,
    calib: CalibrationSet,
    block: str,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> BlockIO:
    """Inputs and outputs of the block ``block`` (a module name) over the calibration set.

    Captured once and reused by sequential calibration (METHODS.md). The forward stops
    after the block. Memory: the block's inputs and output per entry (a DiT-XL/2 block at
    256 px: about 2.4 MB per entry in float32).
    """
    module = get_layer(model, block)
    args_seen: list[tuple[torch.Tensor, ...]] = []
    kwargs_seen: list[dict[str, torch.Tensor]] = []
    outs: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        args_seen.append(tuple(a.detach().cpu() for a in args))
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        kwargs_seen.append({k: v.detach().cpu() for k, v in tensors.items()})
        outs.append(output.detach().cpu())
        raise _StopForward

    with _hook_session(model, []) as handles:
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
        _run_batches(
            model,
            calib,
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc=f"capturing {block}",
            by_timestep=False,
        )
    args = tuple(torch.cat(parts) for parts in zip(*args_seen, strict=True))
    kwargs = {key: torch.cat([seen[key] for seen in kwargs_seen]) for key in kwargs_seen[0]}
    return BlockIO(args, kwargs, torch.cat(outs))


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of the forward."""


def _as_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    if isinstance(layer, str):
        return layer, get_layer(model, layer)
    for name, module in model.named_modules():
        if module is layer:
            return name, module
    raise DitqError(f"the given {type(layer).__name__} is not a submodule of the model")


@contextmanager
def _hook_session(model: nn.Module, names: Sequence[str]) -> Iterator[list[RemovableHandle]]:
    """Yield a list to append hook handles to; they are removed however the block exits.
    Attention hook points (names ending in ``_act``) run under :func:`explicit_attention`."""
    handles: list[RemovableHandle] = []
    needs_explicit = any(name.endswith("_act") for name in names)
    try:
        with explicit_attention(model) if needs_explicit else nullcontext():
            yield handles
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _run_with_input_hooks(
    model: nn.Module,
    calib: CalibrationSet,
    hooks: dict[str, tuple[nn.Module, Callable[[nn.Module, tuple], None]]],
    **run_options,
) -> None:
    """:func:`_run_batches` with a forward pre-hook on each named layer, removed afterwards."""
    with _hook_session(model, list(hooks)) as handles:
        for module, hook in hooks.values():
            handles.append(module.register_forward_pre_hook(hook))
        _run_batches(model, calib, **run_options)


def _run_batches(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    batch_size: int,
    device: str | torch.device | None,
    progress: bool,
    desc: str,
    by_timestep: bool,
    before_forward: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Run the denoiser (``adapter.denoise(x, t, y)``) over the set;
    ``before_forward(entry_indices)`` sees each batch first. A hook raising
    :class:`_StopForward` ends that batch's forward."""
    adapter = adapter_for(model)
    parameter = next(model.parameters())
    device = parameter.device if device is None else device
    batches = calib.index_batches(batch_size, by_timestep)
    total = calib.num_batches(batch_size, by_timestep)
    for index in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress):
        if before_forward is not None:
            before_forward(index)
        x = calib.x[index].to(device, parameter.dtype)
        with suppress(_StopForward):
            adapter.denoise(x, calib.t[index].to(device), calib.y[index].to(device))
