"""SmoothQuant (Xiao et al., 2023) on DiT blocks: migrate activation outliers into the
weights with ``s_j = s(X_j)^α / s(W_j)^(1-α)``, folded into the preceding op
(:func:`ditq.pipeline.folding.smooth_layers`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ditq.calib.dataset import CalibrationSet
from ditq.calib.stats import activation_salience, weight_salience
from ditq.errors import DitqError
from ditq.models.adapter import BLOCK_ROLES
from ditq.pipeline.config import QuantConfig
from ditq.pipeline.folding import smooth_layers
from ditq.pipeline.method import Method, RunContext
from ditq.pipeline.steps import quantized_role_groups
from ditq.quant.smoothing import smoothing_factor


@dataclass
class SmoothQuantConfig(QuantConfig):
    """``alpha``: migration strength; ``smooth``: block layers to smooth (fc2 online)."""

    alpha: float = field(
        default=0.5, metadata={"help": "migration strength α of s = s(X)^α / s(W)^(1-α)"}
    )
    smooth: tuple[str, ...] = field(
        default=("qkv", "proj", "fc1"),
        metadata={
            "help": f"block layers to smooth, comma-separated, of {', '.join(BLOCK_ROLES)} "
            "(fc2: applied online)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise DitqError(f"--alpha must lie in [0, 1], got {self.alpha}")
        bad = [layer for layer in self.smooth if layer not in BLOCK_ROLES]
        if bad:
            raise DitqError(f"cannot smooth {bad}; choose from {', '.join(BLOCK_ROLES)}")
        self.smooth = tuple(self.smooth)


@dataclass(frozen=True)
class SmoothQuant(Method):
    """Salience of the FP model's inputs, then the smoothing factors folded."""

    def needs_calibration(self, config: QuantConfig) -> bool:
        return True

    def analyze(
        self, model: nn.Module, config: QuantConfig, calib: CalibrationSet | None, ctx: RunContext
    ) -> dict[tuple[str, ...], torch.Tensor]:
        groups = quantized_role_groups(model, config, config.smooth)
        salience = activation_salience(
            model,
            calib,
            [group[0] for group in groups],  # one input per group
            batch_size=ctx.batch_size,
            device=ctx.device,
            progress=ctx.progress,
        )
        return {group: salience[group[0]] for group in groups}

    def transform(
        self, model: nn.Module, config: QuantConfig, analysis: Any, ctx: RunContext
    ) -> dict[str, Any]:
        factors = {}
        for group, salience in analysis.items():
            weights = [model.get_submodule(name).weight for name in group]
            s = smoothing_factor(salience, weight_salience(*weights), config.alpha)
            smooth_layers(model, group, s)
            factors[",".join(group)] = {"min": float(s.min()), "max": float(s.max())}
        return {"smoothing_factors": factors}


SMOOTHQUANT = SmoothQuant(
    "smoothquant",
    SmoothQuantConfig,
    summary="SmoothQuant channel smoothing folded into adaLN / V rows",
    published_bits=((8, 8),),
)
