"""Block-wise reconstruction with AdaRound and learned activation step sizes
(Q-Diffusion / BRECQ; METHODS.md, PTQ4DiT, "Quantizers and reconstruction (official)").

Each unit (every DiT block; with ``layerwise_extra`` also every quantized linear outside
the blocks: timestep embedder, final layer) is reconstructed in forward order:

1. its inputs are captured from the quantized model as it is so far (earlier units already
   reconstructed) and its targets from the full-precision model (``capture_block_io``,
   ``capture_inputs``);
2. the AdaRound variables V of its quantized weights (Adam, ``weight_lr``) and the step
   sizes of its static activation quantizers, attention matmul inputs included (Adam,
   ``act_lr`` with cosine decay, LSQ gradients) are learned jointly on minibatches of the
   cached entries, minimizing

       L = ‖ŷ - y‖_p^p + λ Σ_layers Σ 1 - |2h(V) - 1|^β

   where the first term is BRECQ's L_p loss (``|ŷ - y|^p`` summed over axis 1, the tokens
   of a block output, and averaged over the rest, as in the official code, against which
   λ = ``round_reg`` = 0.01 is set), the regularizer is off for the first ``warmup``
   fraction of the iterations and β then decays linearly from ``beta_start`` to
   ``beta_end`` (:func:`rounding_beta`);
3. the rounding is hardened into the float weights (grid values, see
   :mod:`ditq.quant.adaround`) and the learned step sizes are frozen into buffers.

With a ``cache_dir`` every finished unit is saved there (``block_{i}.pt``,
``layer_{name}.pt``) and skipped by a rerun on the same model, settings and calibration
set, so an interrupted run resumes after its last finished unit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import capture_block_io, capture_inputs, get_layer
from ditq.errors import DitqError
from ditq.io import atomic_path
from ditq.quant.adaround import adaround, supports_adaround
from ditq.quant.model import activation_quantizers, quantized_layers
from ditq.quant.quantizer import Quantizer

GIB = 2**30
FORWARD_ORDER = (
    "x_embedder",
    "t_embedder",
    "y_embedder",
    "blocks",
    "final_layer.adaLN_modulation",
    "final_layer",
)
"""Prefixes of DiT submodules in the order the forward pass runs them."""
LOG_EVERY = 200
"""Iterations between loss updates of the progress bar (each one syncs the device)."""
TARGET_CHUNK_ROWS = 2**16


@dataclass
class ReconSettings:
    """Reconstruction hyper-parameters (defaults: the official PTQ4DiT / Q-Diffusion ones).

    ``iters``: optimization steps per unit (0 skips reconstruction); ``batch_size``:
    calibration entries per step; ``weight_lr``/``act_lr``: Adam learning rates of the
    AdaRound variables and of the activation step sizes; ``round_reg``: λ of the rounding
    regularizer; ``beta_start``/``beta_end``/``warmup``: its annealing; ``loss_p``: p of
    the L_p reconstruction loss; ``learn_act_scales``: learn static activation step sizes;
    ``layerwise_extra``: also reconstruct quantized linears outside the blocks; ``chunks``:
    the data schedule of the official code (the calibration entries shuffled once and
    split in ``chunks`` parts, ``iters / chunks`` steps drawing minibatches from each part
    in turn; 1: every step draws from all entries); ``seed``: shuffling and minibatches.
    ``device_cache_gb``: a unit's cached inputs and targets up to this size stay on an
    accelerator (no per-step copies); ``host_cache_gb``: larger ones go to ``cache_dir`` on
    disk when one is given, else stay in host memory.
    """

    iters: int = 20000
    batch_size: int = 32
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    round_reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    loss_p: float = 2.0
    learn_act_scales: bool = True
    layerwise_extra: bool = True
    chunks: int = 1
    seed: int = 0
    device_cache_gb: float = 4.0
    host_cache_gb: float = 16.0

    def __post_init__(self) -> None:
        problems = []
        if self.iters < 0:
            problems.append(f"iters={self.iters} (use 0 to skip reconstruction, e.g. 20000)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} (at least 1, e.g. 32)")
        if self.chunks < 1:
            problems.append(f"chunks={self.chunks} (at least 1; the official code uses 10)")
        for name in ("weight_lr", "act_lr", "loss_p"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} (must be positive)")
        if self.round_reg < 0:
            problems.append(f"round_reg={self.round_reg} (must be at least 0, e.g. 0.01)")
        if not 0 < self.beta_end <= self.beta_start:
            problems.append(
                f"beta_start={self.beta_start}, beta_end={self.beta_end} "
                "(need 0 < beta_end <= beta_start, e.g. 20 -> 2)"
            )
        if not 0 <= self.warmup < 1:
            problems.append(f"warmup={self.warmup} (a fraction in [0, 1), e.g. 0.2)")
        if self.device_cache_gb < 0 or self.host_cache_gb < 0:
            problems.append("device_cache_gb / host_cache_gb (must be at least 0)")
        if problems:
            raise DitqError("bad reconstruction settings: " + "; ".join(problems))

    def result_fields(self) -> dict[str, Any]:
        """The settings that change the result (not where data is cached)."""
        data = asdict(self)
        del data["device_cache_gb"], data["host_cache_gb"]
        return data


def rounding_beta(iteration: int, settings: ReconSettings) -> float | None:
    """β of the rounding regularizer at 0-based ``iteration``: ``None`` (regularizer off)
    while ``iteration + 1 < warmup · iters``, then linear from ``beta_start`` (at the end of
    the warm-up) to ``beta_end`` (at the last iteration), as BRECQ's ``LinearTempDecay``."""
    step = iteration + 1
    start = settings.warmup * settings.iters
    if step < start:
        return None
    remaining = max(0.0, 1.0 - (step - start) / (settings.iters - start))
    return settings.beta_end + (settings.beta_start - settings.beta_end) * remaining


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's L_p loss: ``|output - target|^p`` summed over axis 1 (a block output's
    tokens, a 2-D output's features) and averaged over the other axes."""
    return (output - target).abs().pow(p).sum(1).mean()


@dataclass
class _Unit:
    """One reconstruction unit: a DiT block, or a quantized linear outside the blocks."""

    name: str
    module: nn.Module
    block_index: int | None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.block_index is None:
            return self.module(batch["x"])
        return self.module(batch["x"], batch["c"])

    def checkpoint_name(self) -> str:
        if self.block_index is None:
            return f"layer_{self.name}.pt"
        return f"block_{self.block_index}.pt"


class _UnitData:
    """A unit's cached inputs and FP targets, indexed by calibration entry, kept on the
    device, in host memory or in ``.npy`` files read through memory maps."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        device: torch.device,
        settings: ReconSettings,
        spill_dir: Path | None,
    ) -> None:
        self.device = device
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
                np.save(path, tensor.numpy())
                self.arrays[key] = np.load(path, mmap_mode="r")
        else:
            self.place = "host"
            self.tensors = tensors

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

    def close(self) -> None:
        self.arrays, self.tensors = {}, {}
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def reconstruct_model(
    qmodel: nn.Module,
    fp_model: nn.Module,
    calib: CalibrationSet,
    settings: ReconSettings | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Reconstruct ``qmodel`` (in place) towards the full-precision ``fp_model``.

    ``qmodel``: the wrapped model on ``device`` (unpacked ``QuantLinear`` layers with
    calibrated weight quantizers, calibrated static activation quantizers); ``fp_model``:
    the original FP model (not wrapped; any device), whose block outputs ``qmodel``'s
    blocks must match (a re-parameterized ``qmodel`` computes the same function in float).
    ``batch_size``: calibration batch of the capture forwards. ``cache_dir``: where
    finished units are saved for resuming, and large cached activations spill to.

    Returns ``{"settings", "seconds", "units": {name: {"initial_loss", "final_loss",
    "iterations", "seconds", "rounding_layers", "act_scales", "cache", "resumed"}}}``,
    losses being :func:`reconstruction_loss` over all calibration entries before (round
    to nearest, calibrated step sizes) and after reconstruction.
    """
    start = time.perf_counter()
    settings = ReconSettings() if settings is None else settings
    report: dict[str, Any] = {"settings": asdict(settings), "units": {}}
    if settings.iters > 0:
        device = torch.device(device)
        _check_models(qmodel, fp_model, calib, device)
        units = _units(qmodel, settings)
        cache = Path(cache_dir) if cache_dir is not None else None
        context = _run_digest(settings, calib) if cache is not None else ""
        for position, unit in enumerate(
            tqdm(units, desc="reconstruction", unit="unit", disable=not progress)
        ):
            report["units"][unit.name] = _reconstruct_unit(
                unit,
                qmodel,
                fp_model,
                calib,
                settings,
                device=device,
                batch_size=batch_size,
                progress=progress,
                cache_dir=cache,
                context=context,
                seed=settings.seed + position,
            )
    report["seconds"] = time.perf_counter() - start
    return report


def _check_models(
    qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, device: torch.device
) -> None:
    if fp_model is qmodel or quantized_layers(fp_model):
        raise DitqError(
            "reconstruction targets come from the full-precision model: pass the original, "
            "unwrapped FP model as fp_model (e.g. a copy.deepcopy taken before wrap_layers)"
        )
    if len(fp_model.blocks) != len(qmodel.blocks):
        raise DitqError(
            f"fp_model has {len(fp_model.blocks)} blocks but the quantized model "
            f"{len(qmodel.blocks)}; pass the FP model the quantized one was made from"
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


def _static_act_quantizers(module: nn.Module) -> list[Quantizer]:
    return [q for q in activation_quantizers(module).values() if q.spec.needs_calibration]


def _has_work(module: nn.Module, settings: ReconSettings) -> bool:
    learns_rounding = any(supports_adaround(layer) for layer in quantized_layers(module).values())
    return learns_rounding or (settings.learn_act_scales and bool(_static_act_quantizers(module)))


def _forward_rank(name: str) -> int:
    for rank, prefix in enumerate(FORWARD_ORDER):
        if name == prefix or name.startswith(prefix + "."):
            return rank
    return len(FORWARD_ORDER)


def _units(qmodel: nn.Module, settings: ReconSettings) -> list[_Unit]:
    """Blocks with something to learn and, with ``layerwise_extra``, the quantized linears
    outside the blocks, in forward order."""
    units = [
        _Unit(f"blocks.{i}", block, i)
        for i, block in enumerate(qmodel.blocks)
        if _has_work(block, settings)
    ]
    if settings.layerwise_extra:
        units += [
            _Unit(name, layer, None)
            for name, layer in quantized_layers(qmodel).items()
            if not name.startswith("blocks.") and _has_work(layer, settings)
        ]
    return sorted(units, key=lambda unit: _forward_rank(unit.name))


def _reconstruct_unit(
    unit: _Unit,
    qmodel: nn.Module,
    fp_model: nn.Module,
    calib: CalibrationSet,
    settings: ReconSettings,
    *,
    device: torch.device,
    batch_size: int,
    progress: bool,
    cache_dir: Path | None,
    context: str,
    seed: int,
) -> dict[str, Any]:
    start = time.perf_counter()
    checkpoint = cache_dir / unit.checkpoint_name() if cache_dir is not None else None
    fingerprint = _fingerprint(unit, context) if checkpoint is not None else ""
    if checkpoint is not None and checkpoint.is_file():
        return _resume(unit, checkpoint, fingerprint)
    tensors = _capture(unit, qmodel, fp_model, calib, batch_size, device)
    spill_dir = cache_dir / f"tmp_{unit.name}" if cache_dir is not None else None
    data = _UnitData(tensors, device, settings, spill_dir)
    del tensors
    try:
        initial = _evaluate(unit, data, settings)
        learned = _optimize(unit, data, settings, seed, progress)
        final = _evaluate(unit, data, settings)
    finally:
        data.close()
    entry = {
        "initial_loss": initial,
        "final_loss": final,
        "iterations": settings.iters,
        "seconds": time.perf_counter() - start,
        **learned,
        "cache": data.place,
        "resumed": False,
    }
    if checkpoint is not None:
        state = {k: v.detach().cpu() for k, v in unit.module.state_dict().items()}
        with atomic_path(checkpoint) as tmp:
            torch.save({"fingerprint": fingerprint, "state": state, "report": entry}, tmp)
    return entry


def _capture(
    unit: _Unit,
    qmodel: nn.Module,
    fp_model: nn.Module,
    calib: CalibrationSet,
    batch_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Inputs from the quantized model, targets from the FP model, on the CPU, per entry."""
    if unit.block_index is not None:
        quantized = capture_block_io(qmodel, calib, unit.block_index, batch_size, device, False)
        inputs = {"x": quantized.x, "c": quantized.c}
        del quantized
        target = capture_block_io(fp_model, calib, unit.block_index, batch_size, None, False).out
        return {**inputs, "target": target}
    rows = capture_inputs(qmodel, calib, unit.name, batch_size, device, progress=False)
    fp_layer = get_layer(fp_model, unit.name)
    fp_rows = capture_inputs(fp_model, calib, unit.name, batch_size, progress=False)
    fp_device = next(fp_layer.parameters()).device
    with torch.no_grad():
        target = torch.cat(
            [fp_layer(chunk.to(fp_device)).cpu() for chunk in fp_rows.split(TARGET_CHUNK_ROWS)]
        )
    return {"x": _per_entry(rows, len(calib)), "target": _per_entry(target, len(calib))}


def _per_entry(rows: torch.Tensor, entries: int) -> torch.Tensor:
    """(entries · k, C) rows back to (entries, C) for k = 1, else (entries, k, C)."""
    per_entry = rows.reshape(entries, -1, rows.shape[-1])
    return per_entry.squeeze(1) if per_entry.shape[1] == 1 else per_entry


@torch.no_grad()
def _evaluate(unit: _Unit, data: _UnitData, settings: ReconSettings) -> float:
    """:func:`reconstruction_loss` over all cached entries."""
    total = 0.0
    for index in torch.arange(len(data)).split(settings.batch_size):
        batch = data.batch(index)
        loss = reconstruction_loss(unit.forward(batch), batch["target"], settings.loss_p)
        total += float(loss) * len(index)
    return total / len(data)


def minibatch_pools(entries: int, chunks: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The entries each part of the reconstruction draws its minibatches from: all of them
    for one chunk, else a seeded shuffle split in ``chunks`` near-equal parts (the official
    schedule: ``iters / chunks`` steps on each part in turn)."""
    if chunks == 1:
        return [torch.arange(entries)]
    if chunks > entries:
        raise DitqError(
            f"cannot split {entries} calibration entries into {chunks} reconstruction chunks; "
            f"use at most {entries} (--recon-chunks)"
        )
    return list(torch.randperm(entries, generator=generator).tensor_split(chunks))


def pool_of_iteration(iteration: int, iters: int, pools: int) -> int:
    """Which of ``pools`` minibatch pools step ``iteration`` of ``iters`` draws from: the
    first ``iters / pools`` steps the first pool, and so on in turn."""
    return min(iteration * pools // iters, pools - 1)


def _optimize(
    unit: _Unit, data: _UnitData, settings: ReconSettings, seed: int, progress: bool
) -> dict[str, int]:
    """Learn the unit's rounding and activation step sizes; harden and freeze them."""
    act_quantizers = _static_act_quantizers(unit.module) if settings.learn_act_scales else []
    layers = quantized_layers(unit.module).values()
    generator = torch.Generator().manual_seed(seed)
    with (
        torch.enable_grad(),
        _frozen(unit.module),
        adaround(layers) as rounders,
        _learned_scales(act_quantizers) as scales,
    ):
        steps: list[Callable[[], None]] = []
        optimizers: list[torch.optim.Optimizer] = []
        if rounders:
            optimizers.append(torch.optim.Adam([r.V for r in rounders], lr=settings.weight_lr))
            steps.append(optimizers[-1].step)
        if scales:
            act_optimizer = torch.optim.Adam(scales, lr=settings.act_lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(act_optimizer, settings.iters)
            optimizers.append(act_optimizer)
            steps += [act_optimizer.step, schedule.step]
        parts = minibatch_pools(len(data), settings.chunks, generator)
        bar = tqdm(range(settings.iters), desc=unit.name, leave=False, disable=not progress)
        for iteration in bar:
            pool = parts[pool_of_iteration(iteration, settings.iters, len(parts))]
            index = pool[torch.randperm(len(pool), generator=generator)[: settings.batch_size]]
            batch = data.batch(index.sort().values)
            loss = reconstruction_loss(unit.forward(batch), batch["target"], settings.loss_p)
            beta = rounding_beta(iteration, settings)
            if beta is not None and rounders and settings.round_reg > 0:
                loss = loss + settings.round_reg * sum(r.regularizer(beta) for r in rounders)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for step in steps:
                step()
            if progress and iteration % LOG_EVERY == 0:
                bar.set_postfix(loss=f"{float(loss):.4g}")
    return {"rounding_layers": len(rounders), "act_scales": len(scales)}


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradients for the module's own parameters (weights, biases) inside the block."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


@contextmanager
def _learned_scales(quantizers: list[Quantizer]) -> Iterator[list[nn.Parameter]]:
    """Learnable step sizes inside the block, frozen back into buffers on a normal exit;
    an exception restores the calibrated ones."""
    calibrated = [q.scale.detach().clone() for q in quantizers]
    try:
        yield [q.enable_learning() for q in quantizers]
    except BaseException:
        for quantizer, scale in zip(quantizers, calibrated, strict=True):
            quantizer.scale.data = scale
        raise
    finally:
        for quantizer in quantizers:
            quantizer.disable_learning()


def _run_digest(settings: ReconSettings, calib: CalibrationSet) -> str:
    """What every unit checkpoint of a run depends on besides the unit's own state."""
    digest = hashlib.sha256(json.dumps(settings.result_fields(), sort_keys=True).encode())
    for tensor in (calib.x, calib.t, calib.y):
        _update_digest(digest, tensor)
    return digest.hexdigest()


def _fingerprint(unit: _Unit, context: str) -> str:
    """Digest of the run context and the unit's state before reconstruction."""
    digest = hashlib.sha256(f"{context}/{unit.name}".encode())
    for key, tensor in unit.module.state_dict().items():
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        _update_digest(digest, tensor)
    return digest.hexdigest()


def _update_digest(digest: Any, tensor: torch.Tensor) -> None:
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _resume(unit: _Unit, checkpoint: Path, fingerprint: str) -> dict[str, Any]:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if saved.get("fingerprint") != fingerprint:
        raise DitqError(
            f"{checkpoint} was written for another model, calibration set or reconstruction "
            "settings; delete it (or use another cache directory) to reconstruct afresh"
        )
    unit.module.load_state_dict(saved["state"])
    return {**saved["report"], "resumed": True}
