"""The one quantization sequence. Every method, the CLI, the demo, the benchmarks and the
tests run it (through :func:`ditq.quantize`); its order is the rule every method obeys:

1. check that the selected layers can take the configured formats (before any work);
2. copy the FP model when the method's solver learns from FP targets (reconstruction);
3. ``method.analyze``: statistics of the FP model;
4. wrap the selected layers (:func:`ditq.pipeline.steps.wrap_layers`);
5. ``method.transform``: changes of the float weights (smoothing folds, low-rank branches),
   then, with ``config.rotate``, the Hadamard rotations (:mod:`ditq.pipeline.rotation`);
6. weight ranges, then static activation ranges on the calibration set (with the weights
   quantized): weights are calibrated before the solver runs, never after it, since a
   solver (AdaRound) hardens the rounding into the weights;
7. the method's solver, unit by unit (:func:`ditq.pipeline.sequential.run_sequential`);
8. weight SQNR for the report, then packing: only integer codes are kept.

The model leaves with a :class:`QuantizationRecord` (``model.ditq_record``) that
:func:`ditq.pipeline.checkpoint.save_quantized` writes beside the weights.
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ditq.calib.dataset import CalibrationSet
from ditq.errors import DitqError
from ditq.pipeline.method import Method, RunContext
from ditq.pipeline.rotation import rotate_layers
from ditq.pipeline.sequential import run_sequential
from ditq.pipeline.steps import (
    calibrate_activations,
    calibrate_weights,
    layers_to_wrap,
    pack_model,
    quantized_layers,
    wrap_layers,
)

RECORD_ATTRIBUTE = "ditq_record"


@dataclass
class QuantizationRecord:
    """What made a quantized model: the method, its full configuration, the calibration
    set's description and the calibration report (wall times, memory, per-layer details)."""

    method: str
    config: dict[str, Any]
    calibration: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def record_of(model: nn.Module) -> QuantizationRecord:
    """The record :func:`run_method` left on ``model``."""
    record = getattr(model, RECORD_ATTRIBUTE, None)
    if record is None:
        raise DitqError("this model was not quantized by ditq.quantize: nothing to save")
    return record


def run_method(
    model: nn.Module,
    method: Method,
    config: Any,
    calib: CalibrationSet | None,
    ctx: RunContext,
) -> dict[str, Any]:
    """Quantize ``model`` in place with ``method`` (module docstring); returns the
    method's report (``transform``'s, with ``calibrated_timesteps``, ``activation_ranges``
    and, with a solver, ``reconstruction``)."""
    if not isinstance(config, method.config_class):
        raise TypeError(f"{method.name} takes a {method.config_class.__name__}")
    if calib is None and method.needs_calibration(config):
        raise DitqError(
            f"{method.name} with these settings calibrates on the FP model's samples: pass a "
            "calibration set (static activation ranges can be avoided with --a-dynamic)"
        )
    layers_to_wrap(model, config)
    solver = method.solver(config)
    fp_model = copy.deepcopy(model) if solver is not None and solver.needs_targets else None
    analysis = method.analyze(model, config, calib, ctx)
    wrap_layers(model, config)
    report = dict(method.transform(model, config, analysis, ctx))
    if config.rotate:
        report["rotation"] = rotate_layers(model, config.rotate_seed)
    report["calibrated_timesteps"] = calib.timesteps() if calib is not None else []
    calibrate_weights(model, ctx.progress)
    report["activation_ranges"] = (
        calibrate_activations(model, calib, ctx.batch_size, ctx.device, ctx.progress)
        if calib is not None
        else {}
    )
    if solver is not None:
        report["reconstruction"] = run_sequential(
            model,
            fp_model,
            calib,
            solver,
            device=ctx.device,
            batch_size=ctx.batch_size,
            progress=ctx.progress,
            cache_dir=ctx.resume_dir,
        )
    return report


def weight_sqnr_db(model: nn.Module) -> dict[str, float]:
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


def quantize_with(
    model: nn.Module,
    method: Method,
    config: Any,
    calib: CalibrationSet | None,
    ctx: RunContext,
    *,
    calibration: dict[str, Any] | None = None,
    calib_seconds: float = 0.0,
    command: str = "",
) -> nn.Module:
    """:func:`run_method`, weight SQNR, packing, and the record (with wall times: the
    ``calib_seconds`` spent building ``calib`` count in the total)."""
    start = time.perf_counter()
    method_report = run_method(model, method, config, calib, ctx)
    weight_sqnr = weight_sqnr_db(model)
    pack_model(model)
    total = calib_seconds + time.perf_counter() - start
    report = {
        "wall_time_s": {
            "total": total,
            "calibration_set": calib_seconds,
            "method": total - calib_seconds,
        },
        "peak_memory": peak_memory_mb(ctx.device),
        "device": str(ctx.device),
        "command": command,
        "calibration_entries": len(calib) if calib is not None else 0,
        "weight_sqnr_db": weight_sqnr,
        "method": method_report,
    }
    meta = calibration if calibration is not None else (calib.meta if calib is not None else {})
    setattr(
        model, RECORD_ATTRIBUTE, QuantizationRecord(method.name, config.to_dict(), meta, report)
    )
    return model
