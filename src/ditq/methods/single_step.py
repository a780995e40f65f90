"""Single-step calibration (Yang et al., 2024, "An Analysis on Quantizing Diffusion
Transformers"): static activation ranges from the first sampling step only (the noisiest,
most robust one; or the steps given), and weights quantized in groups of g input channels.

The method is a configuration (group-wise weights) and a calibration set (the first step,
``Method.default_calib``) on the shared round-to-nearest path (:func:`ditq.methods.rtn.apply_rtn`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ditq.quant.config import QuantConfig


@dataclass
class SingleStepConfig(QuantConfig):
    """Group-wise weights (g = 128 by default); the calibration set holds the first step."""

    w_granularity: str = "group"
    w_group_size: int = 128
