"""Shared method helpers: per-layer weight SQNR."""

from __future__ import annotations

import math

import torch

from ditq.pipeline.config import QuantConfig
from ditq.pipeline.run import weight_sqnr_db
from ditq.pipeline.steps import calibrate_weights, wrap_layers

from conftest import tiny_dit


def test_weight_sqnr_matches_float64_and_skips_weights_on_their_grid():
    model = tiny_dit()
    layers = wrap_layers(model, QuantConfig(wbits=4, abits=8))
    calibrate_weights(model)
    name, layer = next(iter(layers.items()))
    w = layer.weight.detach().double()
    expected = 10 * math.log10(
        float(w.pow(2).sum() / (w - layer.quantized_weight().double()).pow(2).sum())
    )
    sqnr = weight_sqnr_db(model)
    assert set(sqnr) == set(layers) and abs(sqnr[name] - expected) < 1e-9
    with torch.no_grad():  # what reconstruction leaves behind: the weight on its grid
        layer.weight.copy_(layer.quantized_weight())
    assert name not in weight_sqnr_db(model) and len(weight_sqnr_db(model)) == len(layers) - 1
