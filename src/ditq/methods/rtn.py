"""Round-to-nearest (RTN): min/max ranges, no transformation. The baseline of every table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ditq.calib.dataset import CalibrationSet
from ditq.models.dit import DiT
from ditq.quant.config import QuantConfig
from ditq.quant.model import quantize_model


@dataclass
class RTNConfig(QuantConfig):
    """Round to nearest with min/max weight and activation ranges."""


def apply_rtn(
    model: DiT,
    config: RTNConfig,
    calib: CalibrationSet | None,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Wrap, calibrate weights (min/max unless configured otherwise) and static activation
    ranges on every entry of ``calib``; also the apply function of single-step, whose
    difference lies in its configuration and calibration set."""
    ranges = quantize_model(model, config, calib, batch_size, device, progress)
    timesteps = calib.timesteps() if calib is not None else []
    return {"calibrated_timesteps": timesteps, "activation_ranges": ranges}
