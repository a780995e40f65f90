"""Calibration sets: model inputs recorded along full-precision sampling trajectories.

Every PTQ method in METHODS.md calibrates on inputs of the FP model taken from its own
sampling trajectories, seeds fixed: PTQ4DiT on 25 evenly spaced steps with the conditional
and unconditional halves of the guided batch, DiTAS on the noisiest half of a run, the
single-step method on the first (noisiest) step. A :class:`CalibrationSet` holds those
entries ``(x_t, t, y, step)`` and :func:`build_calibration_set` records them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import torch
from safetensors.torch import save_file
from torch import nn

from ditq.diffusion.pipeline import SamplingSettings, trajectories
from ditq.diffusion.respace import create_diffusion, respacing_for
from ditq.errors import DitqError
from ditq.io import OutputKind, write_output
from ditq.version import __version__

METADATA_KEY = "ditq.calibration"
"""The safetensors metadata entry that holds a set's JSON metadata."""
TENSOR_NAMES = ("x", "t", "y", "step")
MATCHED_CONFIG_FIELDS = ("in_channels", "input_size", "num_classes")


def is_calibration_set(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file written by :meth:`CalibrationSet.save`."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except (OSError, safetensors.SafetensorError):
        return False


CALIBRATION_SET_FILE = OutputKind("ditq calibration set", False, is_calibration_set)


@dataclass
class CalibrationSet:
    """Model inputs at chosen sampling steps: ``model(x[i], t[i], y[i])`` is what the FP
    model evaluated at step ``step[i]`` (0 = first, noisiest) of a seeded trajectory.

    ``y`` equals ``num_classes`` (the null class) for the unconditional half of a guided
    evaluation. ``meta`` is JSON-serialisable: ``model`` (config dict), ``sampling``
    (:class:`SamplingSettings` dict), ``num_steps``, ``steps`` (recorded step indices),
    ``num_samples``, ``classes`` and ``ditq_version``.
    """

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    step: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)

    def timesteps(self) -> list[int]:
        """The distinct model timesteps, in sampling order (noisiest, i.e. largest, first)."""
        return torch.unique(self.t).flip(0).tolist()

    def subset(self, steps: Sequence[int] | None = None) -> CalibrationSet:
        """The entries recorded at the given step indices (all of them for ``None``)."""
        if steps is None:
            return self
        recorded = torch.unique(self.step).tolist()
        missing = sorted(set(steps) - set(recorded))
        if missing:
            raise DitqError(
                f"calibration set has no entries at steps {missing}; it holds steps {recorded}"
            )
        keep = torch.isin(self.step, torch.tensor(list(steps), dtype=torch.long))
        meta = {**self.meta, "steps": sorted(set(steps))}
        return CalibrationSet(self.x[keep], self.t[keep], self.y[keep], self.step[keep], meta)

    def index_batches(self, batch_size: int, by_timestep: bool = True) -> Iterator[torch.Tensor]:
        """Entry indices in batches of at most ``batch_size``; with ``by_timestep`` each batch
        holds a single timestep, timesteps in sampling order (what per-timestep statistics
        need), otherwise batches run over the entries in stored order."""
        if batch_size < 1:
            raise DitqError(f"batch size must be at least 1, got {batch_size}")
        if by_timestep:
            groups = [torch.nonzero(self.t == t).flatten() for t in self.timesteps()]
        else:
            groups = [torch.arange(len(self))]
        for group in groups:
            yield from torch.split(group, batch_size)

    def num_batches(self, batch_size: int, by_timestep: bool = True) -> int:
        """How many batches :meth:`index_batches` yields (for progress bars)."""
        return sum(1 for _ in self.index_batches(batch_size, by_timestep))

    def batches(
        self, batch_size: int, by_timestep: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(x, t, y)`` batches in the order of :meth:`index_batches`."""
        for index in self.index_batches(batch_size, by_timestep):
            yield self.x[index], self.t[index], self.y[index]

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write a safetensors file (metadata as JSON in its header), atomically; an existing
        calibration set is replaced only with ``overwrite`` (:func:`ditq.io.check_output`)."""
        tensors = {name: getattr(self, name).contiguous() for name in TENSOR_NAMES}
        with write_output(path, CALIBRATION_SET_FILE, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        """Read a set written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise DitqError(f"calibration set {path} does not exist")
        not_a_set = DitqError(
            f"{path} is not a ditq calibration set; create one with "
            "build_calibration_set(...).save(path)"
        )
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if METADATA_KEY not in metadata or set(f.keys()) != set(TENSOR_NAMES):
                    raise not_a_set
                tensors = {name: f.get_tensor(name) for name in TENSOR_NAMES}
        except safetensors.SafetensorError as err:
            raise not_a_set from err
        return cls(**tensors, meta=json.loads(metadata[METADATA_KEY]))

    def check_matches(self, model: nn.Module) -> None:
        """Raise :class:`DitqError` unless the set was made for a model with the same input
        channels, input size and class count as ``model``."""
        made_for = self.meta.get("model", {})
        model_config = model.config.to_dict()
        differing = [k for k in MATCHED_CONFIG_FIELDS if made_for.get(k) != model_config[k]]
        if differing:
            ours = ", ".join(f"{k}={made_for.get(k)}" for k in differing)
            theirs = ", ".join(f"{k}={model_config[k]}" for k in differing)
            raise DitqError(
                f"calibration set was made for a model with {ours} but this model has "
                f"{theirs}; regenerate the calibration set for this model"
            )


def select_steps(num_steps: int, which: str | int | Sequence[int]) -> list[int]:
    """Sampling-step indices to record out of ``num_steps`` (0 = first, noisiest step).

    ``"first"``: [0] (single-step calibration); ``"all"``: every step; an int K: K evenly
    spaced steps including the first and last (PTQ4DiT's 25 of 250); a sequence: those
    steps, each checked to lie in 0..num_steps-1. Returned sorted and without duplicates.
    """
    if num_steps < 1:
        raise DitqError(f"number of sampling steps must be at least 1, got {num_steps}")
    if isinstance(which, str):
        if which == "first":
            return [0]
        if which == "all":
            return list(range(num_steps))
        raise DitqError(
            f"calibration steps {which!r} not understood; use 'first', 'all', a count or a "
            "list of step indices"
        )
    if _is_index(which):
        if not 1 <= which <= num_steps:
            raise DitqError(
                f"cannot take {which} calibration steps out of {num_steps} sampling steps; "
                f"choose a count between 1 and {num_steps}"
            )
        return sorted({round(float(s)) for s in np.linspace(0, num_steps - 1, int(which))})
    steps = list(which)
    bad = [s for s in steps if not _is_index(s) or not 0 <= s < num_steps]
    if bad or not steps:
        raise DitqError(
            f"calibration steps {bad or steps} are not valid: step indices must be integers "
            f"in 0..{num_steps - 1} (0 = first, noisiest step)"
        )
    return sorted({int(s) for s in steps})


def _is_index(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def num_sampling_steps(settings: SamplingSettings) -> int:
    """How many model evaluations a run with ``settings`` makes (after respacing)."""
    respacing = respacing_for(settings.sampler, settings.steps, settings.respacing)
    return create_diffusion(respacing).num_timesteps


def build_calibration_set(
    model: nn.Module,
    num_samples: int,
    settings: SamplingSettings,
    steps: str | int | Sequence[int] = "all",
    classes: Sequence[int] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> CalibrationSet:
    """Sample the FP ``model`` along seeded trajectories and record ``x_t``, ``t`` and
    labels at the steps chosen by :func:`select_steps`; sampling stops after the last
    selected step (the first step alone costs one model call per batch).

    With guidance (``cfg_scale > 1``) each recorded step yields two entries per sample, the
    conditional one (label y) and the unconditional one (null label), as the guided forward
    evaluates both halves (PTQ4DiT, METHODS.md); without guidance only the conditional one.
    Entries are sorted by step, then conditional before unconditional, then sample index;
    they are float32 on the CPU. ``device`` (where sampling runs) defaults to the model's.
    """
    if num_samples < 1:
        raise DitqError(f"number of calibration samples must be at least 1, got {num_samples}")
    num_steps = num_sampling_steps(settings)
    selected = select_steps(num_steps, steps)
    selected_set = set(selected)
    guided = settings.cfg_scale > 1.0
    null_class = model.config.num_classes
    records: list[tuple[torch.Tensor, ...]] = []

    def record(sample_indices, step_index, t_model, x_t, labels) -> None:
        if step_index not in selected_set:
            return
        halves = [(labels, 0)]
        if guided:
            halves.append((torch.full_like(labels, null_class), 1))
        for half_labels, half in halves:
            order_key = (step_index * 2 + half) * num_samples + torch.as_tensor(sample_indices)
            records.append(
                (
                    x_t.detach().float().cpu(),
                    t_model.cpu(),
                    half_labels.cpu(),
                    torch.full((len(x_t),), step_index),
                    order_key.long(),
                )
            )

    for _ in trajectories(
        model,
        num_samples,
        settings,
        classes=classes,
        batch_size=batch_size,
        device=next(model.parameters()).device if device is None else device,
        progress=progress,
        step_callback=record,
        stop_after_step=max(selected),
    ):
        pass
    x, t, y, step, order_key = (torch.cat(parts) for parts in zip(*records, strict=True))
    order = torch.argsort(order_key)
    meta = {
        "model": model.config.to_dict(),
        "sampling": settings.to_dict(),
        "num_steps": num_steps,
        "steps": selected,
        "num_samples": num_samples,
        "classes": None if classes is None else [int(c) for c in classes],
        "ditq_version": __version__,
    }
    return CalibrationSet(x[order], t[order].long(), y[order].long(), step[order].long(), meta)
