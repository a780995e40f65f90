"""What every method shares: calibration settings and the method registry entry."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditq.calib.dataset import CalibrationSet, build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings
from ditq.models.dit import DiT
from ditq.quant.checkpoint import save_quantized
from ditq.quant.config import QuantConfig
from ditq.quant.model import pack_model, quantized_layers

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
        self, model: DiT, *, batch_size: int = 32, device: str = "cpu", progress: bool = True
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


ApplyFn = Callable[..., dict[str, Any]]
"""``apply(model, config, calib, *, device, batch_size, progress) -> report``: quantizes
``model`` in place (simulated, unpacked) and returns the method's report."""


@dataclass(frozen=True)
class Method:
    """A registry entry: name, configuration class, apply function, default calibration,
    and the (wbits, abits) settings its paper measured (``None``: no paper, any setting)."""

    name: str
    config_class: type[QuantConfig]
    apply: ApplyFn
    default_calib: CalibSettings = field(default_factory=CalibSettings)
    needs_calibration: bool = True
    summary: str = ""
    published_bits: tuple[tuple[int, int], ...] | None = None

    def unpublished_setting(self, config: QuantConfig) -> str | None:
        """A sentence when ``config``'s bits lie outside the paper's settings, else None
        (W16A16, the float sanity check, is never flagged)."""
        bits = (config.wbits, config.abits)
        if self.published_bits is None or bits in self.published_bits or min(bits) >= 16:
            return None
        published = ", ".join(f"W{w}A{a}" for w, a in self.published_bits)
        return (
            f"W{bits[0]}A{bits[1]} is outside {self.name}'s published settings ({published}): "
            "allowed, but its paper did not measure it"
        )

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


def weight_sqnr_db(model: torch.nn.Module) -> dict[str, float]:
    """Per quantized layer still holding its float weight, 10 log10(‖W‖² / ‖W − Q(W)‖²).
    Layers whose float weight already lies on its grid (rounding hardened by block
    reconstruction) have no quantization error left to measure and are left out."""
    result = {}
    with torch.no_grad():
        for name, layer in quantized_layers(model).items():
            if layer.packed or not layer.weight_quantizer.spec.enabled:
                continue
            w = layer.weight.double()
            error = (w - layer.quantized_weight().double()).pow(2).sum()
            if error == 0:
                continue
            result[name] = float(10 * torch.log10(w.pow(2).sum() / error))
    return result


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak resident CPU memory of this process and peak GPU memory allocated, in MiB."""
    peak = {"cpu_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        peak["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def quantize_and_save(
    model: DiT,
    method: Method,
    config: QuantConfig,
    calib: CalibrationSet,
    out: str | Path,
    *,
    calib_meta: dict[str, Any],
    calib_seconds: float = 0.0,
    device: str = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    command: str = "",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Apply ``method`` to ``model`` in place, pack it and write the quantized directory
    ``out`` (``ditq.quant.checkpoint``; an existing one is replaced only with ``overwrite``);
    returns the calibration report written with it.
    ``calib_seconds`` (the time spent building ``calib``) counts in the total wall time."""
    start = time.perf_counter()
    method_report = method.run(
        model, config, calib, device=device, batch_size=batch_size, progress=progress
    )
    weight_sqnr = weight_sqnr_db(model)
    pack_model(model)
    total = calib_seconds + time.perf_counter() - start
    report = {
        "wall_time_s": {
            "total": total,
            "calibration_set": calib_seconds,
            "method": total - calib_seconds,
        },
        "peak_memory": peak_memory_mb(device),
        "device": str(device),
        "command": command,
        "calibration_entries": len(calib),
        "weight_sqnr_db": weight_sqnr,
        "method": method_report,
    }
    save_quantized(
        model, out, method.name, config.to_dict(), calib_meta, report, overwrite=overwrite
    )
    return report
