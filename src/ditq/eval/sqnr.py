"""The SQNR study behind single-step calibration (METHODS.md, "Single-step calibration";
Yang et al., 2024, Fig. 2): how well static activation ranges calibrated on the first
sampling step only, versus on all steps, serve every layer at every sampling step.

For a quantized linear layer with FP input X at one sampling step (the input of the FP
model, summed over that step's calibration entries and tokens)::

    SQNR_dB = 10 log10(‖Y‖² / ‖Y − Ŷ‖²),  Y = X Wᵀ + b,  Ŷ = Q_a(X) Q_w(W)ᵀ + b

with ``Q_w`` the calibrated weight quantizer and ``Q_a`` the static activation quantizer of
that calibration; the activation-only SQNR is ``10 log10(‖X‖² / ‖X − Q_a(X)‖²)``. Ranges
come from the core exactly as a method would set them: :func:`wrap_layers`,
:func:`calibrate_weights`, then :func:`calibrate_activations` on ``calib.subset([0])``
(first step) or on ``calib`` (all steps). Like the single-step method, these ranges are
observed on the inputs of the weight-quantized model, while the SQNR is measured on the FP
model's inputs (seen through :func:`collect_input_stats` hooks; observers keep running
energies only): beyond the first quantized layer the two inputs differ slightly.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import collect_input_stats
from ditq.errors import DitqError
from ditq.eval.plots import heatmap, line_plot
from ditq.io import OutputKind
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.steps import (
    calibrate_activations,
    calibrate_weights,
    quantized_layers,
    wrap_layers,
)
from ditq.quant.layers import QuantLinear
from ditq.quant.quantizer import Quantizer

CALIBRATIONS = ("first_step", "all_steps")
"""Static activation ranges calibrated on the first sampling step only, or on all steps."""
CALIBRATION_LABELS = {"first_step": "first step", "all_steps": "all steps"}
RANGES_CALIBRATED_ON = {
    "first_step": "ranges calibrated on the first step",
    "all_steps": "ranges calibrated on all steps",
}
REPORT_FILES = {
    "json": "sqnr.json",
    "by_step": "sqnr_by_step.png",
    "first_step": "sqnr_heatmap_first.png",
    "all_steps": "sqnr_heatmap_all.png",
}
"""The files :func:`save_study` writes."""
STUDY_DIR = OutputKind(
    "ditq SQNR study directory", True, lambda path: (path / REPORT_FILES["json"]).is_file()
)
"""``ditq analyze --out``: recognized by its ``sqnr.json``."""
FIRST_STEP = 0
INPUT, OUTPUT = 0, 1
MIN_ENERGY = 1e-30
"""Energies are floored here so that a noise-free result stays finite (about 300 dB)."""


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """``10 log10(signal / noise)`` with both energies floored at :data:`MIN_ENERGY`."""
    return 10 * math.log10(max(signal_energy, MIN_ENERGY) / max(noise_energy, MIN_ENERGY))


def _energy(x: torch.Tensor) -> torch.Tensor:
    """``‖x‖²`` of rows (n, C): row norms in x's dtype, their squares summed in float64."""
    return torch.linalg.vector_norm(x, dim=-1).double().square().sum()


class LayerSQNRObserver:
    """Running signal and noise energies of one quantized linear layer, for one or more
    static activation quantizers (``{calibration: Q_a}``), fed with FP layer inputs.

    ``update(x)`` takes input rows (tokens, C_in), computes ``Y`` from the layer's float
    weight and bias and ``Ŷ`` from its quantized weight and each ``Q_a(x)``, in float32,
    and adds ‖Y‖², ‖Y − Ŷ‖², ‖X‖² and ‖X − Q_a(X)‖² in float64. The layer must be plain
    (no online input scale, no low-rank branch), as :func:`wrap_layers` leaves it.
    """

    def __init__(self, layer: QuantLinear, act_quantizers: Mapping[str, Quantizer]) -> None:
        if layer.packed or layer.input_scale is not None or layer.lowrank_rank:
            raise DitqError(
                "the SQNR observer needs a plain, unpacked QuantLinear (float weight, no input "
                "scale or low-rank branch), as wrap_layers leaves it"
            )
        self.layer = layer
        self.act_quantizers = dict(act_quantizers)
        # Running sums [input | output] x [signal, noise of each calibration], allocated once
        # and updated in place: small tensors created between the large temporaries of every
        # update would pin heap pages (glibc) and grow the process by an activation per batch.
        self._energies = torch.zeros(
            2, 1 + len(self.act_quantizers), dtype=torch.float64, device=layer.weight.device
        )

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.float()
        bias = self.layer.bias
        y = F.linear(x, self.layer.weight, bias)
        weight_q = self.layer.quantized_weight()
        energies = self._energies
        energies[INPUT, 0] += _energy(x)
        energies[OUTPUT, 0] += _energy(y)
        for k, quantizer in enumerate(self.act_quantizers.values(), start=1):
            x_q = quantizer(x)
            energies[INPUT, k] += _energy(x_q - x)
            energies[OUTPUT, k] += _energy(F.linear(x_q, weight_q, bias).sub_(y))

    def _sqnr_db(self, which: int) -> dict[str, float]:
        signal, *noise = self._energies[which].tolist()
        return {
            name: sqnr_db(signal, n) for name, n in zip(self.act_quantizers, noise, strict=True)
        }

    def output_sqnr_db(self) -> dict[str, float]:
        """``{calibration: 10 log10(‖Y‖² / ‖Y − Ŷ‖²)}`` over everything seen."""
        return self._sqnr_db(OUTPUT)

    def input_sqnr_db(self) -> dict[str, float]:
        """``{calibration: 10 log10(‖X‖² / ‖X − Q_a(X)‖²)}`` over everything seen."""
        return self._sqnr_db(INPUT)


def _step_of_timestep(calib: CalibrationSet) -> dict[int, int]:
    """The sampling-step index of each model timestep; one trajectory's steps map one to one."""
    mapping: dict[int, int] = {}
    for t in calib.timesteps():
        steps = torch.unique(calib.step[calib.t == t]).tolist()
        if len(steps) != 1:
            raise DitqError(
                f"timestep {t} was recorded at sampling steps {steps}; the SQNR study needs "
                "a calibration set from one sampling schedule (build_calibration_set)"
            )
        mapping[t] = steps[0]
    return mapping


def check_study_config(model: nn.Module, config: QuantConfig) -> None:
    """Raise :class:`DitqError` unless ``model`` is full precision and ``config`` quantizes
    at least one selected layer's input with a static range (what the study compares).
    Cheap: callers run it before sampling a calibration set."""
    if quantized_layers(model):
        raise DitqError(
            "the SQNR study quantizes the model itself: pass the full-precision model, "
            "not a quantized one"
        )
    names = [name for name in config.layers.names(model) if not config.keeps_float(name)]
    if not any(config.act_spec(name).needs_calibration for name in names):
        raise DitqError(
            "the SQNR study compares static activation ranges: quantize the inputs of the "
            "selected layers with static ranges (abits below 16, a_dynamic off)"
        )


def _check_calibration_set(calib: CalibrationSet) -> None:
    if len(calib) == 0 or FIRST_STEP not in calib.step.tolist():
        raise DitqError(
            "the SQNR study compares ranges calibrated on the first sampling step with "
            "ranges calibrated on all steps: the calibration set must hold step 0 (build it "
            "with steps='all' or a step count)"
        )


def _summary(matrix: dict[str, list[float]], input_matrix: dict[str, list[float]]) -> dict:
    values = np.array(list(matrix.values()))
    by_layer = dict(zip(matrix, values.mean(axis=1).tolist(), strict=True))
    worst = min(by_layer, key=by_layer.get)
    return {
        "mean_by_step": values.mean(axis=0).tolist(),
        "mean_by_layer": by_layer,
        "activation_mean_by_step": np.array(list(input_matrix.values())).mean(axis=0).tolist(),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "worst_layer": worst,
        "worst_layer_mean": by_layer[worst],
    }


def sqnr_study(
    model: nn.Module,
    calib: CalibrationSet,
    config: QuantConfig | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Per quantized layer and per sampling step of ``calib``, the output SQNR (and the
    activation-only SQNR) for static activation ranges calibrated on the first step only
    and on all steps (module docstring; METHODS.md, "Single-step calibration").

    ``model`` is the FP model and is left unchanged (a copy is quantized). ``config``
    defaults to W8A8 with per-channel weights and per-tensor static activations. Returns
    a JSON-able dict: ``steps`` (``{"index", "timestep"}`` in sampling order, noisiest
    first), ``layers``, ``sqnr_db[calibration][layer][step]``,
    ``activation_sqnr_db[calibration][layer][step]``, ``summary[calibration]`` (mean over
    layers per step, mean over steps per layer, overall mean and min, worst layer),
    ``activation_ranges[calibration]`` and ``settings``.
    """
    config = QuantConfig() if config is None else config
    check_study_config(model, config)
    _check_calibration_set(calib)
    step_of = _step_of_timestep(calib)
    quantized = copy.deepcopy(model)
    layers = wrap_layers(quantized, config)
    calibrate_weights(quantized)
    calibration_sets = {"first_step": calib.subset([FIRST_STEP]), "all_steps": calib}
    act_quantizers: dict[str, dict[str, Quantizer]] = {name: {} for name in layers}
    ranges = {}
    for calibration, subset in calibration_sets.items():
        ranges[calibration] = calibrate_activations(quantized, subset, batch_size, device, progress)
        for name, layer in layers.items():
            act_quantizers[name][calibration] = copy.deepcopy(layer.act_quantizer)

    observers = collect_input_stats(
        model,
        calib,
        lambda name: LayerSQNRObserver(layers[name], act_quantizers[name]),
        list(layers),
        per_timestep=True,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    timesteps = calib.timesteps()
    output_sqnr = {c: {} for c in CALIBRATIONS}
    input_sqnr = {c: {} for c in CALIBRATIONS}
    for name, per_timestep in observers.items():
        per_step_output = [per_timestep[t].output_sqnr_db() for t in timesteps]
        per_step_input = [per_timestep[t].input_sqnr_db() for t in timesteps]
        for calibration in CALIBRATIONS:
            output_sqnr[calibration][name] = [s[calibration] for s in per_step_output]
            input_sqnr[calibration][name] = [s[calibration] for s in per_step_input]
    return {
        "steps": [{"index": step_of[t], "timestep": t} for t in timesteps],
        "layers": list(layers),
        "sqnr_db": output_sqnr,
        "activation_sqnr_db": input_sqnr,
        "summary": {c: _summary(output_sqnr[c], input_sqnr[c]) for c in CALIBRATIONS},
        "activation_ranges": ranges,
        "settings": {
            "quant_config": config.to_dict(),
            "calibration_steps": {
                c: sorted(set(s.step.tolist())) for c, s in calibration_sets.items()
            },
            "entries": len(calib),
            "calibration_set": calib.meta,
        },
    }


def _bits_label(settings: dict) -> str:
    config = settings["quant_config"]
    return f"W{config['wbits']}A{config['abits']}"


def save_study(result: dict[str, Any], directory: str | Path) -> None:
    """Write :data:`REPORT_FILES` into ``directory``: the study as JSON, the mean SQNR per
    step for both calibrations (x: sampling step, 0 = first, noisiest) and one layers ×
    steps heatmap per calibration, both on the same color scale."""
    directory = Path(directory)
    (directory / REPORT_FILES["json"]).write_text(json.dumps(result, indent=2) + "\n")
    step_indices = [step["index"] for step in result["steps"]]
    bits = _bits_label(result["settings"])
    xlabel = "sampling step (0 = first, noisiest)"
    line_plot(
        {
            RANGES_CALIBRATED_ON[c]: (
                step_indices,
                result["summary"][c]["mean_by_step"],
            )
            for c in CALIBRATIONS
        },
        f"{bits}: output SQNR per sampling step, mean over {len(result['layers'])} layers",
        xlabel,
        "SQNR (dB)",
        directory / REPORT_FILES["by_step"],
    )
    matrices = {c: np.array(list(result["sqnr_db"][c].values())) for c in CALIBRATIONS}
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices.values()])
    for calibration, matrix in matrices.items():
        heatmap(
            matrix,
            result["layers"],
            [str(i) for i in step_indices],
            f"{bits}: output SQNR, activation {RANGES_CALIBRATED_ON[calibration]}",
            directory / REPORT_FILES[calibration],
            xlabel=xlabel,
            ylabel="layer",
            colorbar_label="SQNR (dB)",
            vmin=float(finite.min()) if finite.size else None,
            vmax=float(finite.max()) if finite.size else None,
        )


def format_summary(result: dict[str, Any]) -> str:
    """A short table: per calibration, mean and min output SQNR and the worst layer."""
    lines = [
        f"{_bits_label(result['settings'])} output SQNR over {len(result['layers'])} layers x "
        f"{len(result['steps'])} sampling steps",
        f"{'ranges from':<12} {'mean dB':>8} {'min dB':>8}  worst layer (mean dB)",
    ]
    for calibration in CALIBRATIONS:
        summary = result["summary"][calibration]
        lines.append(
            f"{CALIBRATION_LABELS[calibration]:<12} {summary['mean']:>8.2f} {summary['min']:>8.2f}"
            f"  {summary['worst_layer']} ({summary['worst_layer_mean']:.2f})"
        )
    return "\n".join(lines)


def model_output_sqnr_db(
    reference: nn.Module,
    model: nn.Module,
    calib: CalibrationSet,
    batch_size: int = 64,
    device: str = "cpu",
) -> float:
    """SQNR of a quantized denoiser's whole output against the FP model's on the same
    inputs: ``10 log10(Σ‖ε_FP‖² / Σ‖ε_FP − ε_Q‖²)`` over every entry of ``calib``."""
    signal = noise = 0.0
    with torch.no_grad():
        for x, t, y in calib.batches(batch_size, by_timestep=False):
            x, t, y = x.to(device), t.to(device), y.to(device)
            expected = reference(x, t, y).double()
            signal += float(expected.pow(2).sum())
            noise += float((expected - model(x, t, y).double()).pow(2).sum())
    return sqnr_db(signal, noise)
