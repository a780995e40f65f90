"""Smoothing factors shared by SmoothQuant, PTQ4DiT (CSB) and DiTAS (TAS).

A factor ``s`` divides the activation and multiplies the weight column-wise
(:func:`ditq.pipeline.folding.smooth_layers`).
"""

from __future__ import annotations

import torch


def smoothing_factor(
    act_salience: torch.Tensor,
    weight_salience: torch.Tensor,
    alpha: float,
    floor: float = 1e-5,
) -> torch.Tensor:
    """``s_j = max(s(X_j)^α / s(W_j)^(1-α), floor)`` (SmoothQuant; DiTAS with floor 1e-4).

    With α = 1/2 this is PTQ4DiT's CSB: ``X / s = X B^X`` with
    ``B^X = diag(sqrt(s(W_j) / s(X_j)))`` and ``W s = W B^W``, ``B^W = (B^X)^-1``, so that
    both channel maxima become ``sqrt(s(X_j) s(W_j))``. Channels that never activate
    (``s(X_j) = 0``) or have an all-zero weight column get ``s_j = 1``.
    """
    a = act_salience.double()
    w = weight_salience.double().to(a.device)
    s = a.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(min=floor).float()
