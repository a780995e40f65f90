"""Respacing against ADM's documented semantics, with expected values derived by hand."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from ditq.diffusion import (
    SpacedDiffusion,
    create_diffusion,
    get_named_beta_schedule,
    respacing_for,
    space_timesteps,
)
from ditq.errors import DitqError


def test_adm_docstring_example_300_steps_10_15_20():
    # Three sections of 100 steps; section i takes round(k * 99 / (count - 1)) for k < count.
    first = list(range(0, 100, 11))  # stride 99/9 = 11 exactly
    # stride 99/14: k = 7 lands on 49.5 exactly in rationals, but ADM accumulates the stride
    # in floats (7 additions give 49.49999999999999), so it keeps 149, not 150.
    second = [100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199]
    # stride 99/19: no k < 20 lands on a half, so exact rational rounding applies.
    third = [200 + round(Fraction(99 * k, 19)) for k in range(20)]
    assert third[:4] == [200, 205, 210, 216] and third[-1] == 299
    assert sorted(space_timesteps(300, [10, 15, 20])) == first + second + third
    assert space_timesteps(300, "10,15,20") == space_timesteps(300, [10, 15, 20])


@pytest.mark.parametrize(
    ("num_timesteps", "counts"),
    [(1000, [250]), (1000, [100]), (1000, [7, 3]), (1001, [5, 5, 5]), (10, [10])],
)
def test_sections_properties(num_timesteps, counts):
    kept = space_timesteps(num_timesteps, counts)
    assert len(kept) == sum(counts)
    # Sections: equal sizes, the first (num_timesteps % sections) ones one step longer.
    size, extra = divmod(num_timesteps, len(counts))
    start = 0
    for i, count in enumerate(counts):
        end = start + size + (1 if i < extra else 0)
        inside = sorted(k for k in kept if start <= k < end)
        assert len(inside) == count
        assert inside[0] == start and inside[-1] == end - 1
        start = end


def test_evenly_spaced_250_of_1000():
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    gaps = np.diff(kept)
    assert set(gaps.tolist()) <= {4, 5}  # stride 999/249 = 4.012...


def test_ddim_striding():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == set(range(0, 1000, 4))
    assert space_timesteps(1000, "ddim30") == set(range(0, 1000, 34))  # ceil(1000/34) = 30


@pytest.mark.parametrize("spec", ["ddim251", "ddim999", "ddim1"])
def test_ddim_without_exact_stride_raises(spec):
    # 251: stride 3 gives 334 steps, stride 4 gives 250; 999: stride 2 already gives 500.
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, spec)


def test_section_larger_than_its_size_raises():
    with pytest.raises(ValueError):
        space_timesteps(10, [6, 6])


def test_spaced_alphas_cumprod_equal_original_at_kept_steps():
    betas = get_named_beta_schedule("linear", 1000)
    original = np.cumprod(1.0 - betas)
    kept = sorted(space_timesteps(1000, "50"))
    spaced = SpacedDiffusion(kept, betas)
    assert spaced.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(spaced.alphas_cumprod, original[kept], rtol=1e-12, atol=0)
    assert spaced.timestep_map.dtype == torch.long
    assert spaced.timestep_map.tolist() == kept
    assert spaced.num_timesteps == 50 and spaced.original_num_steps == 1000


def test_create_diffusion_respacing_forms():
    for full in (None, ""):
        diffusion = create_diffusion(full)
        assert diffusion.timestep_map.tolist() == list(range(1000))
    assert create_diffusion(100).timestep_map.tolist() == sorted(space_timesteps(1000, [100]))
    assert torch.equal(create_diffusion(100).timestep_map, create_diffusion("100").timestep_map)
    assert create_diffusion("ddim20").timestep_map.tolist() == list(range(0, 1000, 50))
    assert not create_diffusion("10", learn_sigma=False).learn_sigma


def test_respacing_for():
    assert respacing_for("ddpm", 250) == "250"
    assert respacing_for("ddim", 50) == "50"  # evenly spaced, as official sample.py
    assert respacing_for("ddim", 50, respacing="ddim50") == "ddim50"
    with pytest.raises(DitqError, match="ddim251"):
        respacing_for("ddim", 50, respacing="ddim251")
    with pytest.raises(DitqError, match="ddpm, ddim"):
        respacing_for("euler", 50)
    with pytest.raises(DitqError):
        respacing_for("ddpm", 0)
    with pytest.raises(DitqError):
        respacing_for("ddpm", 1001)
