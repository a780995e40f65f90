"""The sequential driver: calibration unit by unit (block by block), with input capture,
propagation and resume, around a solver (:class:`ditq.pipeline.adaround_solver.AdaRoundSolver`,
:class:`ditq.pipeline.gptq_solver.GPTQSolver`).

The model adapter lists the units in forward order (``ModelAdapter.sequential_units``: each
block with the quantized layers inside it; with ``layerwise_extra`` also every quantized
linear outside the blocks). For each unit the solver has work on:

1. its inputs are captured from the quantized model as it is so far (earlier units
   already solved, so their quantization error propagates) and its targets from the
   full-precision model (:func:`ditq.calib.hooks.capture_block_io`,
   :func:`ditq.calib.hooks.capture_inputs`), kept on the device, in host memory or on disk
   (:class:`UnitData`);
2. the solver changes the unit in place (``solver.solve``) and returns its report entry;
3. where the next unit is the next block and the family's blocks are chained
   (``ModelAdapter.chained_blocks``), the solved block runs on its cached inputs to give
   the next block's, and the next FP block on the FP inputs to give its targets (as the
   reference GPTQ propagates), instead of running both models up to that block: the
   driver's forwards grow with the depth, not with its square.

With a ``cache_dir`` every finished unit is saved there (``{unit name}.pt``) and skipped
by a rerun on the same model, solver settings and calibration set, so an interrupted run
resumes after its last finished unit; the unit's state before solving must be the saved
one's up to float rounding (:class:`UnitFingerprint`), so another GPU may resume it (a
CPU may not resume a GPU's unit, nor the reverse: the activation ranges' random samples of
the calibration data differ between the two).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import BlockIO, capture_block_io, capture_inputs, get_layer
from ditq.errors import DitqError
from ditq.io import atomic_path
from ditq.models.adapter import adapter_for
from ditq.pipeline.steps import activation_quantizers, quantized_layers

GIB = 2**30
KWARG = "kwarg:"
"""Prefix of a unit's cached keyword inputs (positional ones are ``arg0``, ``arg1``, ...)."""
TARGET_CHUNK_ROWS = 2**16
RESUME_RTOL = 1e-4
"""How far a saved unit's state before solving may be from this run's to be resumed (the
largest relative difference of a tensor's sums, :class:`UnitFingerprint`): the float
rounding of another GPU or library (about 1e-7), not another model or other settings."""


@dataclass
class SequentialSettings:
    """What the driver runs and where it keeps data: ``layerwise_extra``, also the quantized
    linears outside the blocks as units of their own; ``device_cache_gb``, a unit's cached
    inputs and targets up to this size stay on an accelerator (no per-step copies);
    ``host_cache_gb``, larger ones go to ``cache_dir`` on disk when one is given, else stay
    in host memory."""

    layerwise_extra: bool = True
    device_cache_gb: float = 4.0
    host_cache_gb: float = 16.0

    def __post_init__(self) -> None:
        if self.device_cache_gb < 0 or self.host_cache_gb < 0:
            raise DitqError("device_cache_gb / host_cache_gb must be at least 0")


@dataclass
class UnitCall:
    """One unit: a block, called on the positional inputs it receives in the model's
    forward, or a single linear."""

    name: str
    module: nn.Module
    is_block: bool

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return call_unit(self.module, batch)

    def checkpoint_name(self) -> str:
        return f"{self.name}.pt"


def call_unit(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``module`` called on a batch of its cached inputs (``arg0``, ``arg1``, ... and the
    ``kwarg:`` entries; other keys such as ``target`` are not inputs)."""
    count = sum(key.startswith("arg") for key in batch)
    kwargs = {k.removeprefix(KWARG): v for k, v in batch.items() if k.startswith(KWARG)}
    return module(*(batch[f"arg{i}"] for i in range(count)), **kwargs)


class Solver(Protocol):
    """What the driver asks of a solver."""

    name: str
    needs_targets: bool
    """Whether ``solve`` reads the FP model's outputs (``data``'s ``target``)."""

    def result_fields(self) -> dict[str, Any]:
        """The settings that change the result (they key the resume checkpoints)."""
        ...

    def has_work(self, module: nn.Module) -> bool:
        """Whether the solver would change anything in this unit."""
        ...

    def solve(
        self, unit: UnitCall, data: UnitData, position: int, progress: bool
    ) -> dict[str, Any]:
        """Change ``unit`` in place from its cached inputs and targets (``data``); the
        ``position``-th unit of the run. Returns the unit's report entry."""
        ...


class UnitData:
    """A unit's cached inputs and FP targets, indexed by calibration entry, kept on the
    device, in host memory or in ``.npy`` files read through memory maps; ``batch_size``:
    entries per forward of the unit (the driver's calibration batch)."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        device: torch.device,
        settings: SequentialSettings,
        spill_dir: Path | None,
        batch_size: int = 64,
    ) -> None:
        self.device = device
        self.batch_size = batch_size
        self.spill_dir = None
        self.arrays: dict[str, np.ndarray] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.length = len(next(iter(tensors.values())))
        if device.type != "cpu" and nbytes <= settings.device_cache_gb * GIB:
            self.place = "device"
            self.tensors = {k: t.to(device) for k, t in tensors.items()}
        elif nbytes > settings.host_cache_gb * GIB and spill_dir is not None:
            self.place = "disk"
            self.spill_dir = spill_dir
            spill_dir.mkdir(parents=True, exist_ok=True)
            for key, tensor in tensors.items():
                path = spill_dir / f"{key}.npy"
                np.save(path, tensor.cpu().numpy())
                self.arrays[key] = np.load(path, mmap_mode="r")
        else:
            self.place = "host"
            self.tensors = {k: t.cpu() for k, t in tensors.items()}

    def __len__(self) -> int:
        return self.length

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The entries ``index`` (sorted, for memory-mapped reads) on the device."""
        if self.place == "disk":
            rows = index.numpy()
            return {
                k: torch.from_numpy(np.ascontiguousarray(a[rows])).to(self.device)
                for k, a in self.arrays.items()
            }
        if self.place == "device":
            index = index.to(self.device)
        return {k: t[index].to(self.device) for k, t in self.tensors.items()}

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every entry in order, ``batch_size`` at a time, on the device."""
        for index in torch.arange(self.length).split(self.batch_size):
            yield self.batch(index)

    def close(self) -> None:
        self.arrays, self.tensors = {}, {}
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def run_sequential(
    qmodel: nn.Module,
    fp_model: nn.Module | None,
    calib: CalibrationSet,
    solver: Solver,
    settings: SequentialSettings | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``solver`` over ``qmodel``'s units in forward order (in place), with targets
    from the full-precision ``fp_model``.

    ``qmodel``: the wrapped model on ``device`` (unpacked ``QuantLinear`` layers with
    calibrated weight quantizers, calibrated static activation quantizers); ``fp_model``:
    the original FP model (not wrapped; any device), whose block outputs ``qmodel``'s
    blocks must match (a re-parameterized ``qmodel`` computes the same function in float);
    None for a solver that needs no targets.
    ``batch_size``: calibration batch of the capture forwards. ``cache_dir``: where
    finished units are saved for resuming, and large cached activations spill to.

    Returns ``{"solver", "settings", "seconds", "units": {name: {..., "seconds",
    "cache", "resumed"}}}``, each unit's entry holding what the solver returned.
    """
    start = time.perf_counter()
    settings = SequentialSettings() if settings is None else settings
    report: dict[str, Any] = {
        "solver": solver.name,
        "settings": {**solver.result_fields(), **asdict(settings)},
        "units": {},
    }
    device = torch.device(device)
    _check_models(qmodel, fp_model, calib, solver, device)
    units = _units(qmodel, solver, settings)
    if units:
        cache = Path(cache_dir) if cache_dir is not None else None
        context = _run_digest(solver, settings, calib) if cache is not None else ""
        chained = _chained_pairs(qmodel, units)
        carried = None
        for position, unit in enumerate(
            tqdm(units, desc=solver.name, unit="unit", disable=not progress)
        ):
            report["units"][unit.name], carried = _solve_unit(
                unit,
                qmodel,
                fp_model,
                calib,
                solver,
                settings,
                position=position,
                device=device,
                batch_size=batch_size,
                progress=progress,
                cache_dir=cache,
                context=context,
                carried=carried,
                next_block=chained.get(unit.name),
            )
    report["seconds"] = time.perf_counter() - start
    return report


def _units(qmodel: nn.Module, solver: Solver, settings: SequentialSettings) -> list[UnitCall]:
    """The adapter's units that the solver has work in, in forward order: blocks and, with
    ``layerwise_extra``, the quantized linears outside them."""
    quantized = quantized_layers(qmodel)
    units = []
    for unit in adapter_for(qmodel).sequential_units(list(quantized)):
        if not unit.is_block and not settings.layerwise_extra:
            continue
        module = get_layer(qmodel, unit.name)
        if solver.has_work(module):
            units.append(UnitCall(unit.name, module, unit.is_block))
    return units


def _chained_pairs(qmodel: nn.Module, units: list[UnitCall]) -> dict[str, UnitCall]:
    """Block unit name to the unit of the next block, where the next unit is the next
    block of a model whose blocks are chained (``ModelAdapter.chained_blocks``)."""
    adapter = adapter_for(qmodel)
    if not adapter.chained_blocks:
        return {}
    index = {adapter.block_name(i): i for i in range(adapter.num_blocks())}
    return {
        unit.name: following
        for unit, following in zip(units, units[1:], strict=False)
        if unit.is_block and following.is_block and index[following.name] == index[unit.name] + 1
    }


@dataclass
class Carried:
    """The next block's inputs (and, with targets, its FP inputs), computed from the block
    just solved, per entry: on the device where the solved block's cache was kept there
    (no copy through the host; the device then holds a block's inputs twice while the
    outputs are computed), else on the CPU."""

    unit: str
    inputs: dict[str, torch.Tensor]
    fp_inputs: dict[str, torch.Tensor] | None


def _solve_unit(
    unit: UnitCall,
    qmodel: nn.Module,
    fp_model: nn.Module | None,
    calib: CalibrationSet,
    solver: Solver,
    settings: SequentialSettings,
    *,
    position: int,
    device: torch.device,
    batch_size: int,
    progress: bool,
    cache_dir: Path | None,
    context: str,
    carried: Carried | None,
    next_block: UnitCall | None,
) -> tuple[dict[str, Any], Carried | None]:
    """Solve ``unit`` from inputs ``carried`` from the block before it, or else captured;
    returns its report entry and, with a ``next_block``, that block's inputs."""
    start = time.perf_counter()
    checkpoint = cache_dir / unit.checkpoint_name() if cache_dir is not None else None
    fingerprint = UnitFingerprint.of(unit, context) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_file():
        return _resume(unit, checkpoint, fingerprint), None
    if carried is not None and carried.unit == unit.name:
        tensors, fp_inputs = dict(carried.inputs), carried.fp_inputs
        if fp_inputs is not None:
            fp_block = get_layer(fp_model, unit.name)
            tensors["target"] = _outputs(UnitCall(unit.name, fp_block, True), fp_inputs, batch_size)
    else:
        tensors, fp_inputs = _capture(unit, qmodel, fp_model, calib, batch_size, device)
    del carried
    spill_dir = cache_dir / f"tmp_{unit.name}" if cache_dir is not None else None
    data = UnitData(tensors, device, settings, spill_dir, batch_size)
    kept = data.tensors if data.place == "device" else tensors
    unchanged = {k: v for k, v in kept.items() if k not in ("arg0", "target")}
    target = tensors.get("target")
    del tensors
    try:
        solved = solver.solve(unit, data, position, progress)
        following = None
        if next_block is not None:
            outputs = _outputs(unit, data, batch_size)
            following = Carried(
                next_block.name,
                {**unchanged, "arg0": outputs},
                None if fp_inputs is None else {**fp_inputs, "arg0": target},
            )
    finally:
        data.close()
        if device.type == "cuda":  # the next unit's cache, not a split of this one's
            torch.cuda.empty_cache()
    entry = {
        **solved,
        "seconds": time.perf_counter() - start,
        "cache": data.place,
        "resumed": False,
    }
    if checkpoint is not None:
        state = {k: v.detach().cpu() for k, v in unit.module.state_dict().items()}
        with atomic_path(checkpoint) as tmp:
            torch.save({**fingerprint.saved(), "state": state, "report": entry}, tmp)
    return entry, following


@torch.no_grad()
def _outputs(
    unit: UnitCall, data: UnitData | dict[str, torch.Tensor], batch_size: int
) -> torch.Tensor:
    """The unit's outputs on every entry of ``data`` (cached data or CPU tensors): on the
    device for cached data kept there, else on the CPU."""
    if isinstance(data, UnitData):
        length, batches, keep = len(data), data.batches(), data.place == "device"
    else:
        device = next(unit.module.parameters()).device
        length, keep = len(data["arg0"]), False
        batches = (
            {k: v[index].to(device) for k, v in data.items()}
            for index in torch.arange(length).split(batch_size)
        )
    result, start = None, 0
    for batch in batches:
        out = unit.forward(batch)
        out = out if keep else out.cpu()
        if result is None:  # filled in place: no second copy of every output
            result = out.new_empty((length, *out.shape[1:]))
        result[start : start + len(out)] = out
        start += len(out)
    return result


def _check_models(
    qmodel: nn.Module,
    fp_model: nn.Module | None,
    calib: CalibrationSet,
    solver: Solver,
    device: torch.device,
) -> None:
    if fp_model is None:
        if solver.needs_targets:
            raise DitqError(f"the {solver.name} solver needs the FP model's outputs: pass fp_model")
    elif fp_model is qmodel or quantized_layers(fp_model):
        raise DitqError(
            "reconstruction targets come from the full-precision model: pass the original, "
            "unwrapped FP model as fp_model (e.g. a copy.deepcopy taken before wrap_layers)"
        )
    q_blocks = adapter_for(qmodel).num_blocks()
    fp_blocks = q_blocks if fp_model is None else adapter_for(fp_model).num_blocks()
    if fp_blocks != q_blocks:
        raise DitqError(
            f"fp_model has {fp_blocks} blocks but the quantized model {q_blocks}; pass the FP "
            "model the quantized one was made from"
        )
    if len(calib) == 0:
        raise DitqError("the calibration set is empty; reconstruction needs its entries")
    parameter_device = next(qmodel.parameters()).device
    if parameter_device.type != device.type or device.index not in (None, parameter_device.index):
        raise DitqError(
            f"the quantized model is on {parameter_device} but device={device}; move it "
            "there first (model.to(device))"
        )
    for name, layer in quantized_layers(qmodel).items():
        if layer.packed:
            raise DitqError(
                f"{name} is packed; reconstruction learns float weights, so run it before "
                "pack_model(model)"
            )
        if layer.weight_quantizer.spec.needs_calibration and not layer.weight_quantizer.calibrated:
            raise DitqError(f"{name}: weight quantizer not calibrated; call calibrate_weights")
    for name, quantizer in activation_quantizers(qmodel).items():
        if quantizer.spec.needs_calibration and not quantizer.calibrated:
            raise DitqError(
                f"{name} is not calibrated; call calibrate_activations(model, calib) before "
                "reconstruction"
            )


def _capture(
    unit: UnitCall,
    qmodel: nn.Module,
    fp_model: nn.Module | None,
    calib: CalibrationSet,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Inputs from the quantized model and, with an ``fp_model``, targets from it, on the
    CPU, per entry; and a block's inputs in the FP model (None for a single linear or
    without an ``fp_model``)."""
    if unit.is_block:
        inputs = _block_inputs(
            capture_block_io(qmodel, calib, unit.name, batch_size, device, False)
        )
        if fp_model is None:
            return inputs, None
        fp = capture_block_io(fp_model, calib, unit.name, batch_size, None, False)
        return {**inputs, "target": fp.out}, _block_inputs(fp)
    rows = capture_inputs(qmodel, calib, unit.name, batch_size, device, progress=False)
    if fp_model is None:
        return {"arg0": _per_entry(rows, len(calib))}, None
    fp_layer = get_layer(fp_model, unit.name)
    fp_rows = capture_inputs(fp_model, calib, unit.name, batch_size, progress=False)
    fp_device = next(fp_layer.parameters()).device
    with torch.no_grad():
        target = torch.cat(
            [fp_layer(chunk.to(fp_device)).cpu() for chunk in fp_rows.split(TARGET_CHUNK_ROWS)]
        )
    inputs = {"arg0": _per_entry(rows, len(calib)), "target": _per_entry(target, len(calib))}
    return inputs, None


def _block_inputs(captured: BlockIO) -> dict[str, torch.Tensor]:
    inputs = {f"arg{i}": arg for i, arg in enumerate(captured.args)}
    return {**inputs, **{KWARG + key: value for key, value in captured.kwargs.items()}}


def _per_entry(rows: torch.Tensor, entries: int) -> torch.Tensor:
    """(entries · k, C) rows back to (entries, C) for k = 1, else (entries, k, C)."""
    per_entry = rows.reshape(entries, -1, rows.shape[-1])
    return per_entry.squeeze(1) if per_entry.shape[1] == 1 else per_entry


def _run_digest(solver: Solver, settings: SequentialSettings, calib: CalibrationSet) -> str:
    """What every unit checkpoint of a run depends on besides the unit's own state."""
    fields = {"solver": solver.name, **solver.result_fields()}
    fields["layerwise_extra"] = settings.layerwise_extra
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for tensor in (calib.x, calib.t, calib.y):
        _update_digest(digest, tensor)
    return digest.hexdigest()


@dataclass
class UnitFingerprint:
    """A unit's state before solving, in a run: ``exact``, a digest of the run context, the
    unit's name and its tensors' names, shapes, dtypes and bytes; ``layout``, the same
    without the bytes; ``sums``, each tensor's Σx, Σ|x| and Σx² in float64 (its values, up
    to float rounding); ``device_type``, where the run computes (``cpu``, ``cuda``)."""

    exact: str
    layout: str
    sums: torch.Tensor
    device_type: str = "cpu"

    @classmethod
    def of(cls, unit: UnitCall, context: str) -> UnitFingerprint:
        exact = hashlib.sha256(f"{context}/{unit.name}".encode())
        layout = exact.copy()
        sums = []
        state = unit.module.state_dict()
        for key, tensor in state.items():
            described = f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode()
            exact.update(described)
            layout.update(described)
            _update_digest(exact, tensor)
            values = tensor.detach().double()
            sums.append(torch.stack([values.sum(), values.abs().sum(), values.square().sum()]))
        sums = torch.stack(sums).cpu() if sums else torch.zeros(0, 3, dtype=torch.float64)
        device_type = next((tensor.device.type for tensor in state.values()), "cpu")
        return cls(exact.hexdigest(), layout.hexdigest(), sums, device_type)

    def saved(self) -> dict[str, Any]:
        """What a unit checkpoint keeps of it."""
        return {
            "fingerprint": self.exact,
            "layout": self.layout,
            "sums": self.sums,
            "device_type": self.device_type,
        }

    def difference(self, saved: dict[str, Any]) -> float | None:
        """How far a checkpoint's fingerprint (:meth:`saved`) is from this one: 0 for the
        same bytes; for the same layout, the largest relative difference of a tensor's sums
        (Σx relative to Σ|x|); None for another layout, or a checkpoint of an earlier ditq
        (bytes only) whose bytes differ."""
        if saved.get("fingerprint") == self.exact:
            return 0.0
        if saved.get("layout") != self.layout:
            return None
        other = saved["sums"].double()
        delta = (other - self.sums).abs()
        scale = torch.maximum(other.abs(), self.sums.abs())
        scale[:, 0] = scale[:, 1]
        ratio = torch.where(delta == 0, torch.zeros_like(delta), delta / scale)
        return float(ratio.max()) if ratio.numel() else 0.0


def _update_digest(digest: Any, tensor: torch.Tensor) -> None:
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _resume(unit: UnitCall, checkpoint: Path, fingerprint: UnitFingerprint) -> dict[str, Any]:
    """The unit's state from ``checkpoint`` when it was saved from the same state before
    solving, up to :data:`RESUME_RTOL`; its report entry gets ``resume_difference``."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    difference = fingerprint.difference(saved)
    if difference is None or difference > RESUME_RTOL:
        how_far = (
            ""
            if difference is None
            else f" (its state before solving differs by {difference:.1e}, relative; float "
            f"rounding of another machine stays below {RESUME_RTOL:g})"
        )
        fresh = "delete it (or use another cache directory) to reconstruct afresh"
        written_on = saved.get("device_type", fingerprint.device_type)
        if written_on != fingerprint.device_type:
            raise DitqError(
                f"{checkpoint} was written by a run on {written_on} and this one is on "
                f"{fingerprint.device_type}: their random samples of the calibration data for "
                f"activation ranges differ{how_far}; resume it on {written_on} (--device), "
                f"or {fresh}"
            )
        raise DitqError(
            f"{checkpoint} was written for another model, calibration set or reconstruction "
            f"settings{how_far}; {fresh}"
        )
    unit.module.load_state_dict(saved["state"])
    return {**saved["report"], "resumed": True, "resume_difference": difference}
