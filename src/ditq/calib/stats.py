"""Channel salience statistics (METHODS.md notation): ``s(X_j) = max |X_j|`` over tokens and
batch, per layer, optionally per timestep, and ``s(W_j) = max_i |W_ij|``."""

from __future__ import annotations

import torch
from torch import nn

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import collect_input_stats
from ditq.quant.observer import ChannelAbsMaxObserver


def activation_salience(
    model: nn.Module,
    calib: CalibrationSet,
    layer_names: list[str],
    per_timestep: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor] | dict[str, dict[int, torch.Tensor]]:
    """``s(X_j)`` of the input of each named layer over the calibration set, or
    ``s(X_j^(t))`` per model timestep ``t`` when ``per_timestep``."""
    observers = collect_input_stats(
        model,
        calib,
        lambda name, *_: ChannelAbsMaxObserver(),
        layer_names,
        per_timestep=per_timestep,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    if per_timestep:
        return {
            name: {t: obs.result().float().cpu() for t, obs in by_t.items()}
            for name, by_t in observers.items()
        }
    return {name: obs.result().float().cpu() for name, obs in observers.items()}


def weight_salience(weight: torch.Tensor) -> torch.Tensor:
    """``s(W_j) = max_i |W_ij|`` per input channel j of a (C_out, C_in) weight."""
    return weight.detach().abs().amax(dim=0).float()
