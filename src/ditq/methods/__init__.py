"""PTQ methods: one module each (a configuration dataclass and an apply function)."""

from ditq.methods.base import PAIRED_CLASSES, CalibSettings, Method
from ditq.methods.ditas import DiTASConfig, apply_ditas
from ditq.methods.ptq4dit import PTQ4DiTConfig, apply_ptq4dit
from ditq.methods.rtn import RTNConfig, apply_rtn
from ditq.methods.single_step import SingleStepConfig
from ditq.methods.smoothquant import SmoothQuantConfig, apply_smoothquant

METHODS: dict[str, Method] = {
    "rtn": Method("rtn", RTNConfig, apply_rtn, summary="round to nearest, min/max ranges"),
    "smoothquant": Method(
        "smoothquant",
        SmoothQuantConfig,
        apply_smoothquant,
        summary="SmoothQuant channel smoothing folded into adaLN / V rows",
        published_bits=((8, 8),),
    ),
    "single-step": Method(
        "single-step",
        SingleStepConfig,
        apply_rtn,
        default_calib=CalibSettings(steps="first"),
        summary="Yang et al.: activation ranges from the first sampling step, group-wise weights",
        published_bits=((8, 8), (4, 8)),  # "8A8W" and "8A4W"
    ),
    "ptq4dit": Method(
        "ptq4dit",
        PTQ4DiTConfig,
        apply_ptq4dit,
        # 32 samples of DDPM 250 with cfg 1.5, recorded at steps 0, 10, ..., 240 (the
        # official 25), two samples per class for classes 0..15, cond and uncond entries.
        default_calib=CalibSettings(
            num_samples=32,
            steps=list(range(0, 250, 10)),
            sampler="ddpm",
            num_steps=250,
            cfg_scale=1.5,
            classes=PAIRED_CLASSES,
        ),
        summary="Wu et al.: Spearman-guided channel salience balancing folded offline, "
        "static W/A quantization, block reconstruction",
        published_bits=((8, 8), (4, 8)),
    ),
    "ditas": Method(
        "ditas",
        DiTASConfig,
        apply_ditas,
        # 16 trajectories (32 guided entries per step, as the official 16 labels with cfg),
        # every step of a 100-step DDPM run for TAS; the α search takes the first 50.
        default_calib=CalibSettings(
            num_samples=16, steps="all", sampler="ddpm", num_steps=100, cfg_scale=1.5
        ),
        summary="Dong & Zhang: temporal-aggregated smoothing with per-layer α search and a "
        "training-free low-rank weight branch, W4A8 dynamic activations",
        published_bits=((8, 8), (4, 8)),
    ),
}

__all__ = [
    "METHODS",
    "CalibSettings",
    "DiTASConfig",
    "Method",
    "PTQ4DiTConfig",
    "RTNConfig",
    "SingleStepConfig",
    "SmoothQuantConfig",
    "apply_ditas",
    "apply_ptq4dit",
    "apply_rtn",
    "apply_smoothquant",
]
