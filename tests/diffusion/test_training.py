"""The hybrid training loss against closed forms and scipy's normal distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ditq.diffusion.gaussian import GaussianDiffusion, get_named_beta_schedule
from ditq.diffusion.training import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    training_losses,
    variational_bound_bpd,
)


@pytest.fixture
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(get_named_beta_schedule("linear", 1000), learn_sigma=True)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()),
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_likelihood_is_the_bin_mass():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.4, 0.1, 0.3, 0.8], dtype=torch.float64)
    log_scale = torch.log(torch.tensor([0.1, 0.05, 0.2, 0.01, 0.3], dtype=torch.float64))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale).numpy()
    xs, ms, ss = x.numpy(), mean.numpy(), log_scale.exp().numpy()
    upper = norm.cdf((xs + 1 / 255 - ms) / ss)
    lower = norm.cdf((xs - 1 / 255 - ms) / ss)
    expected = np.log(upper - lower)
    expected[0] = np.log(upper[0])  # lowest bin reaches -inf
    expected[-1] = np.log(1 - lower[-1])  # highest bin reaches +inf
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def _output_for(eps: torch.Tensor, v: float) -> torch.Tensor:
    return torch.cat([eps, torch.full_like(eps, v)], dim=1)


def test_vb_is_zero_for_the_true_posterior(diffusion):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    # eps = true noise gives the true posterior mean; v = -1 picks the posterior variance.
    vb = variational_bound_bpd(diffusion, _output_for(noise, -1.0), x0, x_t, t)
    torch.testing.assert_close(vb, torch.zeros(4, dtype=torch.float64), atol=1e-8, rtol=0)


def test_vb_with_beta_variance_is_the_closed_form_kl(diffusion):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 200, 900])
    x_t = diffusion.q_sample(x0, t, noise)
    vb = variational_bound_bpd(diffusion, _output_for(noise, 1.0), x0, x_t, t)
    posterior = diffusion.posterior_variance[t.numpy()]
    beta = diffusion.betas[t.numpy()]
    kl = 0.5 * (-1 + np.log(beta) - np.log(posterior) + posterior / beta) / math.log(2)
    np.testing.assert_allclose(vb.numpy(), kl, rtol=1e-8, atol=1e-14)


def test_training_losses_split_and_frozen_mean(diffusion):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 300])
    x_t = diffusion.q_sample(x0, t, noise)
    output = torch.randn(2, 6, 4, 4, generator=g).requires_grad_()
    losses = training_losses(diffusion, output, x0, x_t, t, noise)
    expected_mse = ((noise - output[:, :3]) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(losses["mse"], expected_mse)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert torch.isfinite(losses["vb"]).all() and (losses["vb"] > 0).all()
    (grad,) = torch.autograd.grad(losses["vb"].sum(), output)
    assert grad[:, :3].abs().max() == 0  # the VB term trains only the variance channels
    assert grad[:, 3:].abs().max() > 0
