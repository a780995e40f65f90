"""Channel salience statistics (METHODS.md notation): ``s(X_j) = max |X_j|`` over tokens and
batch, per layer, optionally per timestep, and ``s(W_j) = max_i |W_ij|``; Spearman's rank
correlation between two salience vectors (PTQ4DiT's SSC)."""

from __future__ import annotations

import torch
from torch import nn

from ditq.calib.dataset import CalibrationSet
from ditq.calib.hooks import collect_input_stats
from ditq.errors import DitqError
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


def weight_salience(*weights: torch.Tensor) -> torch.Tensor:
    """``s(W_j) = max_i |W_ij|`` per input channel j of (C_out, C_in) weights, over the rows
    of all of them (linears that read one input, e.g. separate q, k and v projections)."""
    rows = weights[0] if len(weights) == 1 else torch.cat(weights)
    return rows.detach().abs().amax(dim=0).float()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks (float64)."""
    sorted_values, order = torch.sort(values.detach().double().flatten())
    _, group, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    first_rank = torch.cumsum(counts, 0) - counts + 1
    group_rank = first_rank.double() + (counts.double() - 1) / 2
    ranks = torch.empty_like(sorted_values)
    ranks[order] = group_rank[group]
    return ranks


def spearman_rho(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long 1-D tensors: the Pearson correlation
    of their average ranks (ties share their mean rank, as ``scipy.stats.spearmanr``).

    PTQ4DiT's SSC (METHODS.md) correlates ``s(X^(t))`` with ``s(W)`` over channels. Returns
    ``nan`` when either input is constant (no rank order to correlate), like scipy.
    """
    if a.numel() != b.numel() or a.numel() < 2:
        raise DitqError(
            f"spearman_rho needs two tensors of the same length >= 2, got {a.numel()} and "
            f"{b.numel()} values"
        )
    rank_a = average_ranks(a) - (a.numel() + 1) / 2
    rank_b = average_ranks(b) - (b.numel() + 1) / 2
    norm = rank_a.norm() * rank_b.norm()
    if norm == 0:
        return float("nan")
    return float((rank_a @ rank_b) / norm)
