"""What every method shares: calibration settings and the method registry entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ditq.calib.dataset import CalibrationSet, build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings
from ditq.models.dit import DiT
from ditq.quant.config import QuantConfig


@dataclass
class CalibSettings:
    """How the calibration set is generated from the FP model's own sampling.

    ``steps``: ``"first"``, ``"all"``, an int K (K evenly spaced of the ``num_steps``
    sampling steps) or an explicit list of step indices (0 = first, noisiest step).
    """

    num_samples: int = 32
    steps: str | int | list[int] = 25
    sampler: str = "ddpm"
    num_steps: int = 250
    cfg_scale: float = 1.5
    seed: int = 1_000_003
    classes: list[int] | None = None

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            sampler=self.sampler, steps=self.num_steps, cfg_scale=self.cfg_scale, seed=self.seed
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(
        self, model: DiT, *, batch_size: int = 32, device: str = "cpu", progress: bool = True
    ) -> CalibrationSet:
        """Record this calibration set from ``model``'s own seeded trajectories."""
        return build_calibration_set(
            model,
            self.num_samples,
            self.sampling(),
            steps=self.steps,
            classes=self.classes,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )


ApplyFn = Callable[..., dict[str, Any]]
"""``apply(model, config, calib, *, device, batch_size, progress) -> report``: quantizes
``model`` in place (simulated, unpacked) and returns the method's report."""


@dataclass(frozen=True)
class Method:
    """A registry entry: name, configuration class, apply function, default calibration."""

    name: str
    config_class: type[QuantConfig]
    apply: ApplyFn
    default_calib: CalibSettings = field(default_factory=CalibSettings)
    needs_calibration: bool = True
    summary: str = ""

    def run(
        self,
        model: DiT,
        config: QuantConfig,
        calib: CalibrationSet | None,
        device: str = "cpu",
        batch_size: int = 64,
        progress: bool = True,
    ) -> dict[str, Any]:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} takes a {self.config_class.__name__}")
        return self.apply(
            model, config, calib, device=device, batch_size=batch_size, progress=progress
        )
