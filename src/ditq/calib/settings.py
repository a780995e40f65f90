"""Calibration settings: how a calibration set is generated from the FP model's own
sampling (each method's published set is one of these, ``Method.default_calib``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ditq.calib.dataset import CalibrationSet, build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings

PAIRED_CLASSES = "pairs"
PAIRED_CLASS_COUNT = 16


@dataclass
class CalibSettings:
    """How the calibration set is generated from the FP model's own sampling.

    ``steps``: ``"first"``, ``"all"``, an int K (K evenly spaced of the ``num_steps``
    sampling steps) or an explicit list of step indices (0 = first, noisiest step).
    ``classes``: labels cycled over the samples, ``None`` for seeded random labels, or
    ``"pairs"``: two consecutive samples per class, classes 0..15 (fewer when the model has
    fewer), cycled (PTQ4DiT's official calibration set).
    """

    num_samples: int = 32
    steps: str | int | list[int] = 25
    sampler: str = "ddpm"
    num_steps: int = 250
    cfg_scale: float = 1.5
    seed: int = 1_000_003
    classes: list[int] | str | None = None

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            sampler=self.sampler, steps=self.num_steps, cfg_scale=self.cfg_scale, seed=self.seed
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve_classes(self, num_classes: int) -> list[int] | None:
        """The label list of ``classes`` for a model with ``num_classes`` classes."""
        if self.classes != PAIRED_CLASSES:
            return self.classes
        return [c for c in range(min(PAIRED_CLASS_COUNT, num_classes)) for _ in range(2)]

    def build(
        self, model: nn.Module, *, batch_size: int = 32, device: str = "cpu", progress: bool = True
    ) -> CalibrationSet:
        """Record this calibration set from ``model``'s own seeded trajectories."""
        return build_calibration_set(
            model,
            self.num_samples,
            self.sampling(),
            steps=self.steps,
            classes=self.resolve_classes(model.num_classes),
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
