"""The DiT/ADM training objective: ``L = L_simple + L_vb`` (the "hybrid" loss).

``L_simple`` is the mean squared error of the predicted noise; ``L_vb`` is the variational
bound term of the step (KL of the true posterior ``q(x_{t-1} | x_t, x_0)`` to the model's
``p(x_{t-1} | x_t)`` in bits per dimension, and the discretized Gaussian negative
log-likelihood of ``x_0`` at ``t = 0``), computed with the predicted mean frozen so that it
trains only the learned variance (Nichol & Dhariwal 2021, as the official DiT trains:
``LossType.MSE`` with ``LEARNED_RANGE`` variance, no rescaling).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ditq.diffusion.gaussian import GaussianDiffusion, _gather

PIXEL_BIN_HALF_WIDTH = 1.0 / 255.0
"""Half the width of one 8-bit pixel bin on the [-1, 1] data scale."""


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element for data in [-1, 1] quantized to 256 bins, under N(mean, e^2log_scale):
    the Gaussian mass of x's bin, the outer bins extended to ±infinity."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + PIXEL_BIN_HALF_WIDTH))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - PIXEL_BIN_HALF_WIDTH))
    tiny = 1e-12
    return torch.where(
        x < -0.999,
        torch.log(cdf_plus.clamp(min=tiny)),
        torch.where(
            x > 0.999,
            torch.log((1.0 - cdf_min).clamp(min=tiny)),
            torch.log((cdf_plus - cdf_min).clamp(min=tiny)),
        ),
    )


def _mean_over_pixels(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


def variational_bound_bpd(
    diffusion: GaussianDiffusion, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor
) -> Tensor:
    """The per-sample VB term of step ``t`` in bits per dimension (decoder NLL where t = 0)."""
    true_mean = (
        _gather(diffusion.posterior_mean_coef1, t, x_t) * x0
        + _gather(diffusion.posterior_mean_coef2, t, x_t) * x_t
    )
    true_log_variance = _gather(diffusion.posterior_log_variance_clipped, t, x_t)
    out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised=False)
    kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    return torch.where(t == 0, _mean_over_pixels(nll), _mean_over_pixels(kl)) / math.log(2.0)


def training_losses(
    diffusion: GaussianDiffusion,
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
) -> dict[str, Tensor]:
    """Per-sample ``mse``, ``vb`` and ``loss = mse + vb`` for ``model_output`` at
    ``x_t = q_sample(x0, t, noise)``; ``vb`` is zero without a learned variance."""
    channels = x0.shape[1]
    eps = model_output[:, :channels]
    mse = _mean_over_pixels((noise - eps) ** 2)
    if not diffusion.learn_sigma:
        vb = torch.zeros_like(mse)
    else:
        frozen = torch.cat([eps.detach(), model_output[:, channels:]], dim=1)
        vb = variational_bound_bpd(diffusion, frozen, x0, x_t, t)
    return {"mse": mse, "vb": vb, "loss": mse + vb}
