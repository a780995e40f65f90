"""GaussianDiffusion against closed forms computed independently in float64."""

import math

import numpy as np
import pytest
import torch

from ditq.diffusion import GaussianDiffusion, get_named_beta_schedule
from ditq.errors import DitqError

T = 1000


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, 1e-4 .. 0.02 at T = 1000, scaled by 1000/T (ADM)."""
    scale = 1000 / num_steps
    t = np.arange(num_steps, dtype=np.float64)
    return scale * 1e-4 + t * scale * (0.02 - 1e-4) / (num_steps - 1)


def alpha_bar(t: int, num_steps: int = T) -> float:
    return float(np.prod(1.0 - linear_betas(num_steps)[: t + 1]))


@pytest.mark.parametrize("num_steps", [1000, 250])
def test_linear_betas_closed_form(num_steps):
    betas = get_named_beta_schedule("linear", num_steps)
    assert betas.dtype == np.float64 and betas.shape == (num_steps,)
    np.testing.assert_allclose(betas, linear_betas(num_steps), rtol=1e-12)
    scale = 1000 / num_steps
    assert betas[0] == pytest.approx(scale * 1e-4) and betas[-1] == pytest.approx(scale * 0.02)


def test_cosine_schedule_telescopes_to_alpha_bar():
    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = get_named_beta_schedule("squaredcos_cap_v2", 100)
    assert betas.max() <= 0.999
    cumprod = np.cumprod(1.0 - betas)
    expected = np.array([f((t + 1) / 100) / f(0) for t in range(100)])
    # The last beta is capped at 0.999; every earlier one telescopes exactly.
    np.testing.assert_allclose(cumprod[:-1], expected[:-1], rtol=1e-10)


def test_unknown_schedule_raises():
    with pytest.raises(DitqError, match="linear"):
        get_named_beta_schedule("quadratic", 10)


def test_q_sample_closed_form():
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", T))
    x0 = torch.rand(4, 3, 2, 2, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    steps = [0, 10, 500, 999]
    t = torch.tensor(steps)
    ab = torch.tensor([alpha_bar(s) for s in steps], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), expected, rtol=1e-12, atol=1e-12)

    # Empirical moments of q(x_t | x_0) = N(sqrt(ab) x0, (1 - ab) I) at t = 300, with the
    # default noise; tolerances are about 5 standard errors for 200k samples.
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    samples = diffusion.q_sample(x0, torch.full((200_000,), 300))
    ab = alpha_bar(300)
    assert samples.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=1e-2)
    assert samples.var().item() == pytest.approx(1 - ab, rel=1.5e-2)


def true_eps(x_t: torch.Tensor, x0: torch.Tensor, steps: list[int]) -> torch.Tensor:
    ab = torch.tensor([alpha_bar(s) for s in steps], dtype=torch.float64).view(-1, 1, 1, 1)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def bayes_posterior(x0, x_t, step):
    """q(x_{t-1} | x_t, x0) as the product of q(x_t | x_{t-1}) and q(x_{t-1} | x0)."""
    beta = linear_betas(T)[step]
    ab_prev = alpha_bar(step - 1)
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    variance = 1 / precision
    mean = variance * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * x_t / beta)
    return mean, variance


def test_p_mean_variance_is_the_true_posterior_for_a_perfect_eps():
    diffusion = GaussianDiffusion(
        get_named_beta_schedule("linear", T), learn_sigma=False, sigma_small=True
    )
    steps = [1, 2, 37, 500, 999]
    x0 = torch.rand(len(steps), 3, 4, 4, dtype=torch.float64) * 2 - 1
    x_t = torch.randn_like(x0)
    out = diffusion.p_mean_variance(true_eps(x_t, x0, steps), x_t, torch.tensor(steps), False)
    torch.testing.assert_close(out["pred_x0"], x0, rtol=1e-9, atol=1e-9)
    for i, step in enumerate(steps):
        mean, variance = bayes_posterior(x0[i], x_t[i], step)
        torch.testing.assert_close(out["mean"][i], mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out["variance"][i], torch.full_like(mean, variance))
        torch.testing.assert_close(
            out["log_variance"][i], torch.full_like(mean, math.log(variance))
        )


def test_posterior_at_t0_is_x0_with_clipped_log_variance():
    diffusion = GaussianDiffusion(
        get_named_beta_schedule("linear", T), learn_sigma=False, sigma_small=True
    )
    x0 = torch.rand(1, 3, 4, 4, dtype=torch.float64) * 2 - 1
    x_t = torch.randn_like(x0)
    out = diffusion.p_mean_variance(true_eps(x_t, x0, [0]), x_t, torch.tensor([0]), False)
    torch.testing.assert_close(out["mean"], x0, rtol=1e-9, atol=1e-9)
    _, variance_at_1 = bayes_posterior(x0, x_t, 1)
    torch.testing.assert_close(out["log_variance"], torch.full_like(x0, math.log(variance_at_1)))


def test_learned_range_endpoints():
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", T), learn_sigma=True)
    steps = [0, 1, 250, 999]
    t = torch.tensor(steps)
    x_t = torch.randn(len(steps), 3, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(x_t)
    min_log = [math.log(bayes_posterior(0.0, 0.0, max(s, 1))[1]) for s in steps]
    max_log = [math.log(b) for b in linear_betas(T)[steps]]
    for v, expected in [(-1.0, min_log), (1.0, max_log)]:
        output = torch.cat([eps, torch.full_like(x_t, v)], dim=1)
        out = diffusion.p_mean_variance(output, x_t, t, False)
        expected_log = torch.tensor(expected, dtype=torch.float64).view(-1, 1, 1, 1)
        torch.testing.assert_close(out["log_variance"], expected_log.expand_as(x_t))
        torch.testing.assert_close(out["variance"], expected_log.exp().expand_as(x_t))
        torch.testing.assert_close(out["eps"], eps)
    midpoint = diffusion.p_mean_variance(torch.cat([eps, torch.zeros_like(x_t)], 1), x_t, t, False)
    expected_mid = (torch.tensor(min_log) + torch.tensor(max_log)).double().view(-1, 1, 1, 1) / 2
    torch.testing.assert_close(midpoint["log_variance"], expected_mid.expand_as(x_t))


def test_clip_denoised_clamps_pred_x0_and_mean_uses_it():
    diffusion = GaussianDiffusion(
        get_named_beta_schedule("linear", T), learn_sigma=False, sigma_small=True
    )
    step = 400
    x0 = torch.tensor([[[[3.0, -2.5], [0.5, -0.2]]]], dtype=torch.float64)
    x_t = torch.randn_like(x0)
    eps = true_eps(x_t, x0, [step])
    t = torch.tensor([step])
    unclipped = diffusion.p_mean_variance(eps, x_t, t, clip_denoised=False)
    clipped = diffusion.p_mean_variance(eps, x_t, t, clip_denoised=True)
    torch.testing.assert_close(unclipped["pred_x0"], x0)
    torch.testing.assert_close(clipped["pred_x0"], x0.clamp(-1, 1))
    mean, _ = bayes_posterior(x0.clamp(-1, 1), x_t, step)
    torch.testing.assert_close(clipped["mean"], mean)


def test_wrong_channel_count_raises():
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 100), learn_sigma=True)
    x_t = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match="expected 6"):
        diffusion.p_mean_variance(torch.randn(1, 3, 2, 2), x_t, torch.tensor([5]), True)


def test_ddim_eta1_equals_ddpm_with_posterior_variance():
    # With eta = 1, DDIM's sigma^2 is the posterior variance and its mean the posterior mean.
    diffusion = GaussianDiffusion(
        get_named_beta_schedule("linear", 100), learn_sigma=False, sigma_small=True
    )
    x_t = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x_t)
    noise = torch.randn_like(x_t)
    t = torch.tensor([99, 40, 0])
    ddpm = diffusion.ddpm_step(eps, x_t, t, noise, clip_denoised=True)
    ddim = diffusion.ddim_step(eps, x_t, t, noise, clip_denoised=True, eta=1.0)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)


def test_fixed_large_variance_is_official_dit_default():
    # Official DiT: learn_sigma=False without sigma_small -> ADM FIXED_LARGE, i.e. beta_t,
    # with the posterior variance at t = 0.
    T = 50
    betas = get_named_beta_schedule("linear", T)
    diffusion = GaussianDiffusion(betas, learn_sigma=False)
    x_t = torch.randn(T, 2, 4, 4, dtype=torch.float64)
    t = torch.arange(T)
    out = diffusion.p_mean_variance(torch.zeros_like(x_t), x_t, t, clip_denoised=False)
    ab = np.cumprod(1 - betas)
    posterior_1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
    expected = np.concatenate([[posterior_1], betas[1:]])
    np.testing.assert_allclose(out["variance"][:, 0, 0, 0].numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(
        out["log_variance"][:, 0, 0, 0].numpy(), np.log(expected), rtol=1e-12
    )
