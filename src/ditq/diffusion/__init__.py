"""Gaussian diffusion, timestep respacing and DDPM/DDIM sampling (ADM / official DiT)."""

from ditq.diffusion.gaussian import GaussianDiffusion, get_named_beta_schedule
from ditq.diffusion.respace import SpacedDiffusion, create_diffusion, respacing_for, space_timesteps
from ditq.diffusion.samplers import sample_loop

__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "create_diffusion",
    "get_named_beta_schedule",
    "respacing_for",
    "sample_loop",
    "space_timesteps",
]
