"""Gaussian diffusion in the conventions of OpenAI ADM (``gaussian_diffusion.py``) and official DiT.

The model predicts eps; with ``learn_sigma`` it also predicts the variance as ADM's
LEARNED_RANGE (an interpolation in log space between the posterior variance and beta_t),
otherwise the variance is fixed: ADM's FIXED_LARGE (beta_t, with the posterior variance at
t = 0), official DiT's default, or FIXED_SMALL (the posterior variance) with
``sigma_small``. All schedule arithmetic is float64 numpy, as in ADM; values are indexed and
cast to the tensor's dtype at use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ditq.errors import DitqError

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """ADM's named beta schedules, float64 of length ``num_diffusion_timesteps``.

    "linear" is Ho et al.'s schedule rescaled by 1000/T; "squaredcos_cap_v2" is the cosine
    schedule of Nichol & Dhariwal with betas capped at 0.999.
    """
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_diffusion_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.array(betas, dtype=np.float64)
    raise DitqError(f"unknown noise schedule {name!r}; choose one of: {', '.join(BETA_SCHEDULES)}")


def _gather(values: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` in ``like``'s dtype and device, shaped (B, 1, ..., 1) to broadcast."""
    picked = torch.as_tensor(values, dtype=like.dtype, device=like.device)[t]
    return picked.view(-1, *([1] * (like.ndim - 1)))


def _nonzero_mask(t: Tensor, like: Tensor) -> Tensor:
    """1 where t != 0 and 0 where t == 0: no noise is added on the last step (ADM)."""
    return (t != 0).to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion:
    """A discrete Gaussian diffusion with ``len(betas)`` steps, indexed 0 (cleanest) .. T-1.

    Every ``t`` argument is a LongTensor (B,) of indices into this diffusion's own schedule.
    ``timestep_map[t]`` gives the timestep the model is conditioned on; it is the identity
    here and the kept original timesteps in :class:`~ditq.diffusion.respace.SpacedDiffusion`.
    """

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        learn_sigma: bool = True,
        sigma_small: bool = False,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D array with values in (0, 1]")
        self.betas = betas
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(self.num_timesteps, dtype=torch.long)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so ADM clips the log by
        # reusing the value at t = 1 (beta_0 stands in for a single-step diffusion).
        one_minus_ac = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_ac
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_ac
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_ac
        )
        self.log_betas = np.log(betas)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (
            _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool
    ) -> dict[str, Tensor]:
        """The model's p(x_{t-1} | x_t), as ADM's ``p_mean_variance`` (eps prediction).

        ``model_output`` has 2C channels with ``learn_sigma`` (eps, then the LEARNED_RANGE
        value v in [-1, 1]) and C channels otherwise. Returns ``mean``, ``variance``,
        ``log_variance``, ``pred_x0`` (clamped to [-1, 1] when ``clip_denoised``) and ``eps``
        (the model's own eps, before any clipping).
        """
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels, expected {expected} "
                f"for {channels}-channel input with learn_sigma={self.learn_sigma}"
            )
        if self.learn_sigma:
            eps, v = model_output.split(channels, dim=1)
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = _gather(self.log_betas, t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output
            if self.sigma_small:
                fixed, fixed_log = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                fixed = np.append(self.posterior_variance[1:2], self.betas[1:])
                fixed_log = np.log(fixed)
            variance = _gather(fixed, t, x_t).expand_as(x_t)
            log_variance = _gather(fixed_log, t, x_t).expand_as(x_t)

        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean = (
            _gather(self.posterior_mean_coef1, t, x_t) * pred_x0
            + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "eps": eps,
        }

    def ddpm_step(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, noise: Tensor, clip_denoised: bool
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1} (ADM's ``p_sample``); no noise where t == 0."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        return out["mean"] + _nonzero_mask(t, x_t) * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_step(
        self,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        noise: Tensor,
        clip_denoised: bool,
        eta: float,
    ) -> Tensor:
        """One DDIM step x_t -> x_{t-1} (ADM's ``ddim_sample``; eta = 0 is deterministic).

        eps is re-derived from the (possibly clipped) pred_x0, and
        sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev).
        """
        pred_x0 = self.p_mean_variance(model_output, x_t, t, clip_denoised)["pred_x0"]
        eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        alpha_bar = _gather(self.alphas_cumprod, t, x_t)
        alpha_bar_prev = _gather(self.alphas_cumprod_prev, t, x_t)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean = (
            pred_x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        return mean + _nonzero_mask(t, x_t) * sigma * noise
