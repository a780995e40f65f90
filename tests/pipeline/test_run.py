"""The pipeline's one sequence: the order every method's contributions run in, the record
it leaves, the API around it (ditq.quantize / save / load_model), per-layer weight SQNR."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import ditq
from ditq.calib.dataset import build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings
from ditq.errors import DitqError
from ditq.methods import METHODS, RTNConfig, SingleStepConfig
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.method import Method, RunContext
from ditq.pipeline.run import QuantizationRecord, run_method, weight_sqnr_db
from ditq.pipeline.steps import (
    activation_quantizers,
    calibrate_weights,
    quantized_layers,
    wrap_layers,
)

from conftest import tiny_dit


@pytest.fixture(scope="module")
def calib():
    settings = SamplingSettings(sampler="ddim", steps=4, cfg_scale=1.5, seed=2)
    return build_calibration_set(tiny_dit(), 2, settings, steps="all", progress=False)


class RecordingSolver:
    """A solver that records what it finds: calibrated quantizers, the FP copy untouched."""

    name = "recording"
    needs_targets = True

    def __init__(self, log):
        self.log = log

    def result_fields(self):
        return {}

    def has_work(self, module):
        return bool(quantized_layers(module))

    def solve(self, unit, data, position, progress):
        layers = quantized_layers(unit.module).values()
        self.log.append(
            ("solve", unit.name, all(layer.weight_quantizer.calibrated for layer in layers))
        )
        return {}


@dataclass(frozen=True)
class RecordingMethod(Method):
    """Logs when each contribution runs and what state the model is in."""

    log: list = None

    def analyze(self, model, config, calib, ctx):
        self.log.append(("analyze", len(quantized_layers(model))))
        return "statistics"

    def transform(self, model, config, analysis, ctx):
        layers = quantized_layers(model).values()
        calibrated = any(layer.weight_quantizer.calibrated for layer in layers)
        self.log.append(("transform", analysis, len(layers), calibrated))
        return {"transformed": True}

    def solver(self, config):
        return RecordingSolver(self.log)


def test_the_pipeline_orders_every_contribution(calib):
    log = []
    method = RecordingMethod("recording", RTNConfig, log=log)
    model = tiny_dit()
    report = run_method(
        model, method, RTNConfig(wbits=8, abits=8), calib, RunContext(progress=False)
    )
    # statistics on the FP model; transforms on wrapped, uncalibrated weights; the solver
    # after weight and activation ranges, unit by unit in forward order
    assert log[0] == ("analyze", 0)
    assert log[1] == ("transform", "statistics", 8, False)
    assert log[2:] == [("solve", "blocks.0", True), ("solve", "blocks.1", True)]
    assert report["transformed"] and report["reconstruction"]["solver"] == "recording"
    assert all(q.calibrated for q in activation_quantizers(model).values())
    assert report["calibrated_timesteps"] == calib.timesteps()


def test_quantize_save_load_and_the_default_calibration_set(tmp_path):
    model = ditq.quantize(tiny_dit(), SingleStepConfig(w_group_size=16), progress=False)
    record = model.ditq_record
    assert isinstance(record, QuantizationRecord) and record.method == "single-step"
    # no calibration set given: the method's published one was recorded from the model
    assert record.calibration["settings"] == METHODS["single-step"].default_calib.to_dict()
    assert record.report["calibration_entries"] == 2 * 32  # 32 samples, first step, cfg
    assert all(layer.packed for layer in quantized_layers(model).values())
    ditq.save(model, tmp_path / "q")
    loaded = ditq.load_model(tmp_path / "q")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
    with pytest.raises(DitqError, match="not quantized by ditq.quantize"):
        ditq.save(tiny_dit(), tmp_path / "r")
    with pytest.raises(DitqError, match="QuantConfig is no method's configuration"):
        ditq.quantize(tiny_dit(), QuantConfig())
    with pytest.raises(DitqError, match="pass a calibration set"):
        run_method(tiny_dit(), METHODS["rtn"], RTNConfig(), None, RunContext(progress=False))


def test_weight_sqnr_matches_float64_and_skips_weights_on_their_grid():
    model = tiny_dit()
    layers = wrap_layers(model, QuantConfig(wbits=4, abits=8))
    calibrate_weights(model)
    name, layer = next(iter(layers.items()))
    w = layer.weight.detach().double()
    expected = 10 * math.log10(
        float(w.pow(2).sum() / (w - layer.quantized_weight().detach().double()).pow(2).sum())
    )
    sqnr = weight_sqnr_db(model)
    assert set(sqnr) == set(layers) and abs(sqnr[name] - expected) < 1e-9
    with torch.no_grad():  # what reconstruction leaves behind: the weight on its grid
        layer.weight.copy_(layer.quantized_weight())
    assert name not in weight_sqnr_db(model) and len(weight_sqnr_db(model)) == len(layers) - 1
