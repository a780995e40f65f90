"""Sampling loops: a perfect eps-oracle must reconstruct x0; loop mechanics on a toy model."""

import numpy as np
import pytest
import torch

from ditq.diffusion import create_diffusion, get_named_beta_schedule, sample_loop, space_timesteps
from ditq.errors import DitqError

ORIGINAL_ALPHAS_CUMPROD = torch.from_numpy(
    np.cumprod(1.0 - get_named_beta_schedule("linear", 1000))
)


def eps_oracle(x0: torch.Tensor, learn_sigma: bool):
    """denoise_fn returning the true eps of x_t = sqrt(ab) x0 + sqrt(1 - ab) eps at t_model."""

    def denoise_fn(x_t, t_model):
        ab = ORIGINAL_ALPHAS_CUMPROD[t_model].view(-1, 1, 1, 1)
        eps = ((x_t.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()).to(x_t.dtype)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return denoise_fn


def per_sample_noise(seeds: list[int]):
    """noise_fn drawing each sample's noise from its own generator."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def noise_fn(x):
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])

    return noise_fn


def toy_model(channels: int = 3):
    """A fixed random 1x1 linear map to 2C channels with a timestep-dependent bias."""
    weight = torch.randn(2 * channels, channels, generator=torch.Generator().manual_seed(0)) / 3

    def denoise_fn(x, t_model):
        out = torch.einsum("oc,bchw->bohw", weight, x)
        return out + (t_model.float() / 1000).view(-1, 1, 1, 1)

    return denoise_fn


@pytest.mark.parametrize("respacing", ["ddim20", "20"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_eps_oracle_reconstructs_x0(respacing, eta):
    diffusion = create_diffusion(respacing)
    assert diffusion.num_timesteps == 20
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    x_T = torch.randn(2, 3, 8, 8)
    out = sample_loop(eps_oracle(x0, True), x_T, diffusion, "ddim", eta=eta, progress=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ddpm_with_eps_oracle_reaches_x0(learn_sigma):
    diffusion = create_diffusion("100", learn_sigma=learn_sigma)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    x_T = torch.randn(2, 3, 8, 8)
    out = sample_loop(
        eps_oracle(x0, learn_sigma), x_T, diffusion, "ddpm", clip_denoised=False, progress=False
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_ddim_eta0_is_deterministic():
    diffusion = create_diffusion("ddim10")
    x_T = torch.randn(2, 3, 4, 4)
    first = sample_loop(
        toy_model(), x_T, diffusion, "ddim", noise_fn=per_sample_noise([1, 2]), progress=False
    )
    second = sample_loop(
        toy_model(), x_T, diffusion, "ddim", noise_fn=per_sample_noise([3, 4]), progress=False
    )
    assert torch.equal(first, second)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_toy_model_shape_seeds_and_callback(sampler):
    diffusion = create_diffusion("25")
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    calls = []

    def callback(step_index, t_index, t_model, x_t, out):
        calls.append((step_index, t_index, t_model.clone(), x_t.shape, out.shape))

    kwargs = {"sampler": sampler, "eta": 0.5, "progress": False}
    out = sample_loop(
        toy_model(),
        x_T,
        diffusion,
        noise_fn=per_sample_noise([0, 1, 2]),
        callback=callback,
        **kwargs,
    )
    again = sample_loop(toy_model(), x_T, diffusion, noise_fn=per_sample_noise([0, 1, 2]), **kwargs)
    other = sample_loop(toy_model(), x_T, diffusion, noise_fn=per_sample_noise([5, 1, 2]), **kwargs)

    assert out.shape == x_T.shape and torch.isfinite(out).all()
    assert torch.equal(out, again)
    assert not torch.equal(out[0], other[0]) and torch.equal(out[1:], other[1:])
    assert [c[0] for c in calls] == list(range(25))
    assert [c[1] for c in calls] == list(range(24, -1, -1))
    kept = sorted(space_timesteps(1000, [25]))  # original timesteps, ascending
    for _, t_index, t_model, x_shape, out_shape in calls:
        assert t_model.dtype == torch.long and t_model.tolist() == [kept[t_index]] * 3
        assert x_shape == (3, 3, 4, 4) and out_shape == (3, 6, 4, 4)
    assert calls[0][2].tolist() == [999] * 3 and calls[-1][2].tolist() == [0] * 3


def test_results_do_not_depend_on_batch_composition():
    diffusion = create_diffusion("10")
    x_T = torch.randn(2, 3, 4, 4)
    batch = sample_loop(
        toy_model(), x_T, diffusion, noise_fn=per_sample_noise([11, 12]), progress=False
    )
    alone = sample_loop(
        toy_model(), x_T[1:], diffusion, noise_fn=per_sample_noise([12]), progress=False
    )
    torch.testing.assert_close(batch[1:], alone, rtol=1e-6, atol=1e-6)


def test_unknown_sampler_names_the_choices():
    with pytest.raises(DitqError, match="ddpm, ddim"):
        sample_loop(toy_model(), torch.randn(1, 3, 4, 4), create_diffusion("5"), "plms")
