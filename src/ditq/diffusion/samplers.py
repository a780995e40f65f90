"""DDPM / DDIM sampling loops over a (respaced) :class:`GaussianDiffusion`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ditq.diffusion.gaussian import GaussianDiffusion
from ditq.errors import DitqError

SAMPLERS = ("ddpm", "ddim")

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
"""``denoise_fn(x_t, t_model) -> model_output``, t_model being original timesteps (B,)."""
StepCallback = Callable[[int, int, Tensor, Tensor, Tensor], None]
"""``callback(step_index, t_index, t_model, x_t, model_output)``, once per step."""


def check_sampler(sampler: str) -> None:
    """Raise :class:`DitqError` unless ``sampler`` is one of :data:`SAMPLERS`."""
    if sampler not in SAMPLERS:
        raise DitqError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")


@torch.no_grad()
def sample_loop(
    denoise_fn: DenoiseFn,
    x_T: Tensor,
    diffusion: GaussianDiffusion,
    sampler: str = "ddpm",
    noise_fn: Callable[[Tensor], Tensor] | None = None,
    clip_denoised: bool = True,
    eta: float = 0.0,
    progress: bool = True,
    callback: StepCallback | None = None,
    stop_after_step: int | None = None,
) -> Tensor:
    """Run the reverse process from ``x_T`` down to x_0 and return it (without gradients).

    Steps go over the diffusion's indices T'-1 .. 0. The model sees the original timestep
    ``diffusion.timestep_map[t_index]``, as official DiT's ``_WrappedModel`` passes it
    (rescale_timesteps=False). ``noise_fn(x)`` draws each step's noise shaped like x (default
    ``torch.randn_like``); it is called once per step, DDIM and the last step included, as
    ADM draws noise, so that per-sample seeded generators give reproducible results that do not
    depend on batch composition. ``callback`` runs after each model evaluation, with
    step_index 0 at the noisiest step. ``eta`` only applies to DDIM. ``stop_after_step``
    ends the loop right after that step's model call and callback, returning that x_t.
    """
    check_sampler(sampler)
    draw_noise = noise_fn if noise_fn is not None else torch.randn_like
    timestep_map = diffusion.timestep_map.to(x_T.device)
    indices = range(diffusion.num_timesteps - 1, -1, -1)
    x = x_T
    for step_index, t_index in enumerate(tqdm(indices, desc=sampler, disable=not progress)):
        t = torch.full((x.shape[0],), t_index, dtype=torch.long, device=x.device)
        t_model = timestep_map[t]
        model_output = denoise_fn(x, t_model)
        if callback is not None:
            callback(step_index, t_index, t_model, x, model_output)
        if step_index == stop_after_step:
            return x
        noise = draw_noise(x)
        if sampler == "ddpm":
            x = diffusion.ddpm_step(model_output, x, t, noise, clip_denoised)
        else:
            x = diffusion.ddim_step(model_output, x, t, noise, clip_denoised, eta)
    return x
