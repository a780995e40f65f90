"""Timestep respacing as in ADM's ``respace.py`` and official DiT's ``create_diffusion``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ditq.diffusion.gaussian import GaussianDiffusion, get_named_beta_schedule
from ditq.diffusion.samplers import check_sampler
from ditq.errors import DitqError


def _ddim_stride(num_timesteps: int, count: int) -> int | None:
    """The smallest stride s in [1, T) with len(range(0, T, s)) == count (DDIM paper), if any."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return stride
    return None


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The original timesteps to keep, with ADM's semantics.

    ``section_counts`` splits [0, T) into equal sections (earlier ones one step longer when T
    does not divide) and takes that many evenly strided steps from each, e.g. T = 300 with
    [10, 15, 20] takes 10 steps from 0..99, 15 from 100..199 and 20 from 200..299. A string is
    either comma-separated counts or "ddimN": the fixed stride of the DDIM paper,
    range(0, T, s), which raises ValueError when no integer stride gives exactly N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            count = int(section_counts[len("ddim") :])
            stride = _ddim_stride(num_timesteps, count)
            if stride is None:
                raise ValueError(
                    f"cannot take exactly {count} of {num_timesteps} steps with an integer stride"
                )
            return set(range(0, num_timesteps, stride))
        section_counts = [int(part) for part in section_counts.split(",")]

    size_per_section, extra = divmod(num_timesteps, len(section_counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per_section + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, not multiplied, so rounding matches ADM exactly
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return kept


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the original timesteps (ADM's ``SpacedDiffusion``).

    Betas are recomputed so that the kept alphas_cumprod equal the original ones:
    beta_i = 1 - abar[k_i] / abar[k_{i-1}]. ``timestep_map[i]`` is the original timestep k_i.
    """

    def __init__(
        self,
        use_timesteps: Iterable[int],
        betas: np.ndarray | Sequence[float],
        learn_sigma: bool = True,
        sigma_small: bool = False,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        kept = sorted({int(t) for t in use_timesteps})
        if not kept or kept[0] < 0 or kept[-1] >= len(betas):
            raise ValueError(f"use_timesteps must be a non-empty subset of [0, {len(betas)})")
        kept_alphas_cumprod = np.cumprod(1.0 - betas)[kept]
        new_betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        super().__init__(new_betas, learn_sigma, sigma_small)
        self.original_num_steps = len(betas)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)


def create_diffusion(
    timestep_respacing: str | int | None,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
    sigma_small: bool = False,
) -> SpacedDiffusion:
    """Official DiT's ``create_diffusion`` (eps prediction; LEARNED_RANGE, else FIXED_LARGE,
    or FIXED_SMALL with ``sigma_small``).

    ``timestep_respacing``: None or "" keeps all steps; an int N keeps N evenly spaced steps
    (same as the string "N"); other strings go to :func:`space_timesteps` ("250",
    "10,15,20", "ddim50").
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        sections: str | list[int] = [diffusion_steps]
    elif isinstance(timestep_respacing, int):
        sections = [timestep_respacing]
    else:
        sections = timestep_respacing
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, sections), betas, learn_sigma, sigma_small
    )


def respacing_for(
    sampler: str, steps: int, respacing: str | None = None, diffusion_steps: int = 1000
) -> str:
    """The ``timestep_respacing`` for the CLI's ``--sampler``/``--steps``/``--respacing``.

    ``--steps N`` keeps N evenly spaced steps (first 0, last T-1) for both samplers, as the
    official ``sample.py`` respaces with ``str(N)``; ``--respacing`` passes any ADM form
    instead ("ddim50" for the DDIM paper's stride, "10,15,20" for sections).
    """
    check_sampler(sampler)
    if respacing:
        try:
            space_timesteps(diffusion_steps, respacing)
        except ValueError as err:
            raise DitqError(f"--respacing {respacing!r} is not valid: {err}") from err
        return respacing
    if not 1 <= steps <= diffusion_steps:
        raise DitqError(f"--steps must be between 1 and {diffusion_steps}, got {steps}")
    return str(steps)
