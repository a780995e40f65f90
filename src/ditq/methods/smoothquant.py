"""SmoothQuant (Xiao et al., 2023) on DiT blocks: migrate activation outliers into the
weights with ``s_j = s(X_j)^α / s(W_j)^(1-α)``, folded into the preceding op."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ditq.calib.dataset import CalibrationSet
from ditq.calib.stats import activation_salience, weight_salience
from ditq.errors import DitqError
from ditq.models.dit import DiT
from ditq.quant.config import QuantConfig
from ditq.quant.folding import LAYERS_IN_BLOCK, smooth_layer
from ditq.quant.model import (
    calibrate_activations,
    calibrate_weights,
    layers_to_wrap,
    wrap_layers,
)
from ditq.quant.smoothing import smoothing_factor


@dataclass
class SmoothQuantConfig(QuantConfig):
    """``alpha``: migration strength; ``smooth``: block layers to smooth (fc2 online)."""

    alpha: float = field(
        default=0.5, metadata={"help": "migration strength α of s = s(X)^α / s(W)^(1-α)"}
    )
    smooth: tuple[str, ...] = field(
        default=("attn.qkv", "attn.proj", "mlp.fc1"),
        metadata={"help": "block layers to smooth, comma-separated (mlp.fc2: applied online)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise DitqError(f"--alpha must lie in [0, 1], got {self.alpha}")
        bad = [layer for layer in self.smooth if layer not in LAYERS_IN_BLOCK]
        if bad:
            raise DitqError(f"cannot smooth {bad}; choose from {', '.join(LAYERS_IN_BLOCK)}")
        self.smooth = tuple(self.smooth)


def smoothed_layer_names(model: DiT, config: SmoothQuantConfig) -> list[str]:
    """The ``config.smooth`` linears of every block that ``config`` quantizes (a layer kept
    in float, or left out of the layer selection, is not smoothed)."""
    quantized = layers_to_wrap(model, config)
    names = [f"blocks.{i}.{layer}" for i in range(len(model.blocks)) for layer in config.smooth]
    return [name for name in names if name in quantized]


def apply_smoothquant(
    model: DiT,
    config: SmoothQuantConfig,
    calib: CalibrationSet | None,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    names = smoothed_layer_names(model, config)
    salience = activation_salience(
        model, calib, names, batch_size=batch_size, device=device, progress=progress
    )
    wrap_layers(model, config)
    factors = {}
    for name in names:
        block_index, layer = int(name.split(".")[1]), name.split(".", 2)[2]
        target = model.get_submodule(name)
        s = smoothing_factor(salience[name], weight_salience(target.weight), config.alpha)
        smooth_layer(model.blocks[block_index], layer, s)
        factors[name] = {"min": float(s.min()), "max": float(s.max())}
    calibrate_weights(model, progress)
    ranges = calibrate_activations(model, calib, batch_size, device, progress)
    return {"smoothing_factors": factors, "activation_ranges": ranges}
