"""Single-step calibration (Yang et al., 2024, "An Analysis on Quantizing Diffusion
Transformers"): static activation ranges from the first sampling step only (the noisiest,
most robust one; or the steps given), and weights quantized in groups of g input channels.

The method is a configuration (group-wise weights) and a calibration set (the first step,
``Method.default_calib``) on the pipeline's round-to-nearest steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditq.calib.settings import CalibSettings
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.method import Method


@dataclass
class SingleStepConfig(QuantConfig):
    """Group-wise weights (g = 128 by default); the calibration set holds the first step."""

    w_granularity: str = "group"
    w_group_size: int = 128


SINGLE_STEP = Method(
    "single-step",
    SingleStepConfig,
    default_calib=CalibSettings(steps="first"),
    summary="Yang et al.: activation ranges from the first sampling step, group-wise weights",
    published_bits=((8, 8), (4, 8)),  # "8A8W" and "8A4W"
)
