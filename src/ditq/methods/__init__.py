"""PTQ methods: one module each (a configuration dataclass and an apply function)."""

from ditq.methods.base import CalibSettings, Method
from ditq.methods.rtn import RTNConfig, apply_rtn
from ditq.methods.single_step import SingleStepConfig, apply_single_step
from ditq.methods.smoothquant import SmoothQuantConfig, apply_smoothquant

METHODS: dict[str, Method] = {
    "rtn": Method("rtn", RTNConfig, apply_rtn, summary="round to nearest, min/max ranges"),
    "smoothquant": Method(
        "smoothquant",
        SmoothQuantConfig,
        apply_smoothquant,
        summary="SmoothQuant channel smoothing folded into adaLN / V rows",
    ),
    "single-step": Method(
        "single-step",
        SingleStepConfig,
        apply_single_step,
        default_calib=CalibSettings(steps="first"),
        summary="Yang et al.: activation ranges from the first sampling step, group-wise weights",
    ),
}

__all__ = [
    "METHODS",
    "CalibSettings",
    "Method",
    "RTNConfig",
    "SingleStepConfig",
    "SmoothQuantConfig",
    "apply_rtn",
    "apply_single_step",
    "apply_smoothquant",
]
