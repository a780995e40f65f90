"""Single-step calibration (Yang et al., 2024, "An Analysis on Quantizing Diffusion
Transformers"): static activation ranges from the first sampling step only (the noisiest,
most robust one; or the steps given), and weights quantized in groups of g input channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ditq.calib.dataset import CalibrationSet
from ditq.models.dit import DiT
from ditq.quant.config import QuantConfig
from ditq.quant.model import quantize_model


@dataclass
class SingleStepConfig(QuantConfig):
    """Group-wise weights (g = 128 by default); the calibration set holds the first step."""

    w_granularity: str = "group"
    w_group_size: int = 128


def apply_single_step(
    model: DiT,
    config: SingleStepConfig,
    calib: CalibrationSet | None,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    ranges = quantize_model(model, config, calib, batch_size, device, progress)
    return {"calibrated_timesteps": calib.timesteps() if calib else [], "activation_ranges": ranges}
