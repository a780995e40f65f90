"""The SQNR study against closed forms and float64 references computed here."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ditq.calib.dataset import build_calibration_set
from ditq.calib.hooks import capture_inputs
from ditq.diffusion.pipeline import SamplingSettings
from ditq.errors import DitqError
from ditq.eval.sqnr import CALIBRATIONS, LayerSQNRObserver, sqnr_db, sqnr_study
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.steps import quantized_layers, wrap_layers
from ditq.quant.layers import QuantLinear

from conftest import tiny_dit

FIRST_LAYER = "blocks.0.attn.qkv"  # its input does not depend on any quantized layer


def _reference_fake_quant(x: torch.Tensor, low, high, bits: int) -> torch.Tensor:
    """Asymmetric uniform quantization (METHODS.md), float64, range widened to contain 0."""
    low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    scale = (high - low) / (2**bits - 1)
    zero = np.round(-low / scale)
    scale, zero = torch.as_tensor(scale), torch.as_tensor(zero)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (codes - zero) * scale


def _db(signal: torch.Tensor, error: torch.Tensor) -> float:
    return 10 * math.log10(float(signal.pow(2).sum()) / float(error.pow(2).sum()))


def test_sqnr_db_closed_form_and_floor():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == pytest.approx(300.0)  # noise floored at 1e-30
    assert sqnr_db(0.0, 0.0) == 0.0


def _identity_layer(channels: int, act_spec) -> QuantLinear:
    linear = nn.Linear(channels, channels, bias=False)
    linear.weight.data = torch.eye(channels)
    layer = QuantLinear.from_linear(linear, QuantConfig().weight_spec(), act_spec)
    layer.calibrate_weight()
    return layer


def test_observer_known_noise_closed_form():
    """Identity weight (0 and 1 per row: exact at 8 bits), activation grid Δ = 1 on [0, 255],
    inputs k + 1/4: every element errs by exactly 1/4, so both SQNRs are
    10 log10(Σ x² / (n / 16))."""
    layer = _identity_layer(16, QuantConfig().act_spec())
    layer.act_quantizer.set_range(0.0, 255.0)
    observer = LayerSQNRObserver(layer, {"grid": layer.act_quantizer})
    x = (torch.arange(16 * 40) % 255).float().reshape(40, 16) + 0.25
    observer.update(x[:25])
    observer.update(x[25:])
    expected = 10 * math.log10(float((x.double() ** 2).sum()) / (x.numel() / 16))
    assert observer.input_sqnr_db()["grid"] == pytest.approx(expected, abs=1e-6)
    assert observer.output_sqnr_db()["grid"] == pytest.approx(expected, abs=1e-6)


def test_observer_weight_only_matches_float64():
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    config = QuantConfig(wbits=4, abits=16)
    layer = QuantLinear.from_linear(linear, config.weight_spec(), config.act_spec())
    layer.calibrate_weight()
    observer = LayerSQNRObserver(layer, {"weights only": layer.act_quantizer})
    batches = [torch.randn(50, 32), 3 * torch.randn(70, 32)]
    for batch in batches:
        observer.update(batch)

    w = linear.weight.detach().double()
    w_hat = torch.cat(
        [_reference_fake_quant(row, row.min().item(), row.max().item(), 4)[None] for row in w]
    )
    x = torch.cat(batches).double()
    b = linear.bias.detach().double()
    y, y_hat = x @ w.T + b, x @ w_hat.T + b
    assert observer.output_sqnr_db()["weights only"] == pytest.approx(_db(y, y - y_hat), abs=1e-3)
    assert observer.input_sqnr_db()["weights only"] > 250  # unquantized input: floored noise


@pytest.fixture(scope="module")
def study_inputs():
    model = tiny_dit()
    settings = SamplingSettings(sampler="ddim", steps=4, cfg_scale=1.5, seed=3)
    calib = build_calibration_set(model, 2, settings, steps="all", progress=False)
    return model, calib


@pytest.fixture(scope="module")
def study(study_inputs):
    model, calib = study_inputs
    before = copy.deepcopy(model.state_dict())
    result = sqnr_study(model, calib, QuantConfig(wbits=8, abits=6), progress=False)
    assert not quantized_layers(model)  # the FP model is left as it was
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    return result


def test_study_shapes_and_summaries(study, study_inputs):
    _, calib = study_inputs
    assert [s["index"] for s in study["steps"]] == [0, 1, 2, 3]
    assert [s["timestep"] for s in study["steps"]] == calib.timesteps()
    assert len(study["layers"]) == 8 and study["layers"][0] == FIRST_LAYER
    for key in ("sqnr_db", "activation_sqnr_db"):
        for calibration in CALIBRATIONS:
            matrix = np.array([study[key][calibration][name] for name in study["layers"]])
            assert matrix.shape == (8, 4) and np.isfinite(matrix).all()
            assert (matrix > 5).all() and (matrix < 100).all()  # 6-8 bits: tens of dB
    for calibration in CALIBRATIONS:
        matrix = np.array(list(study["sqnr_db"][calibration].values()))
        summary = study["summary"][calibration]
        np.testing.assert_allclose(summary["mean_by_step"], matrix.mean(axis=0))
        assert summary["min"] == matrix.min()
        assert summary["worst_layer"] == study["layers"][int(matrix.mean(axis=1).argmin())]
    assert study["settings"]["calibration_steps"] == {
        "first_step": [0],
        "all_steps": [0, 1, 2, 3],
    }
    json.dumps(study)


def test_study_matches_float64_reference_on_first_layer(study, study_inputs):
    """First-step ranges are exactly step 0's min/max of the layer input, all-step ranges
    those over every step; the SQNRs at every step follow in float64."""
    model, calib = study_inputs
    inputs = {
        step: capture_inputs(model, calib.subset([step]), FIRST_LAYER, progress=False).double()
        for step in range(4)
    }
    ranges = {
        "first_step": (inputs[0].min().item(), inputs[0].max().item()),
        "all_steps": (
            min(x.min().item() for x in inputs.values()),
            max(x.max().item() for x in inputs.values()),
        ),
    }
    layer = model.get_submodule(FIRST_LAYER)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    w_hat = torch.cat(
        [_reference_fake_quant(row, row.min().item(), row.max().item(), 8)[None] for row in w]
    )
    for calibration, (low, high) in ranges.items():
        for step, x in inputs.items():
            x_hat = _reference_fake_quant(x, low, high, 6)
            y, y_hat = x @ w.T + b, x_hat @ w_hat.T + b
            act = study["activation_sqnr_db"][calibration][FIRST_LAYER][step]
            out = study["sqnr_db"][calibration][FIRST_LAYER][step]
            assert act == pytest.approx(_db(x, x - x_hat), abs=1e-3)
            assert out == pytest.approx(_db(y, y - y_hat), abs=1e-3)
    assert (
        study["activation_sqnr_db"]["first_step"][FIRST_LAYER]
        != study["activation_sqnr_db"]["all_steps"][FIRST_LAYER]
    )


def test_study_rejects_bad_input(study_inputs):
    model, calib = study_inputs
    with pytest.raises(DitqError, match="step 0"):
        sqnr_study(model, calib.subset([1, 2]), progress=False)
    with pytest.raises(DitqError, match="static"):
        sqnr_study(model, calib, QuantConfig(a_dynamic=True), progress=False)
    quantized = copy.deepcopy(model)
    wrap_layers(quantized, QuantConfig())
    with pytest.raises(DitqError, match="full-precision"):
        sqnr_study(quantized, calib, progress=False)
