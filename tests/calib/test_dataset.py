"""Calibration sets: step selection, recording from FP trajectories, batching, save/load."""

import pytest
import torch

from ditq.calib import CalibrationSet, build_calibration_set, num_sampling_steps, select_steps
from ditq.diffusion import create_diffusion
from ditq.diffusion.pipeline import SamplingSettings, sample_generator
from ditq.errors import DitqError

from conftest import tiny_dit

GUIDED = SamplingSettings(sampler="ddim", steps=6, cfg_scale=1.5, seed=5)
UNGUIDED = SamplingSettings(sampler="ddim", steps=6, cfg_scale=1.0, seed=5)
CLASSES = [1, 3, 0]


def build(settings=GUIDED, steps=3, num_samples=3, batch_size=2):
    return build_calibration_set(
        tiny_dit(),
        num_samples,
        settings,
        steps=steps,
        classes=CLASSES,
        batch_size=batch_size,
        progress=False,
    )


@pytest.fixture(scope="module")
def guided_set() -> CalibrationSet:
    return build()


def test_select_steps_first_all_count_and_list():
    assert select_steps(6, "first") == [0]
    assert select_steps(6, "all") == [0, 1, 2, 3, 4, 5]
    assert select_steps(6, 3) == [0, 2, 5]  # round(linspace(0, 5, 3)) = 0, 2.5 -> 2, 5
    assert select_steps(250, 25)[:3] == [0, 10, 21] and select_steps(250, 25)[-1] == 249
    assert len(select_steps(250, 25)) == 25
    assert select_steps(6, 1) == [0] and select_steps(6, 6) == list(range(6))
    assert select_steps(6, [4, 0, 4]) == [0, 4]


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("last", "'last' not understood; use 'first', 'all'"),
        (0, "cannot take 0 calibration steps out of 6"),
        (7, "choose a count between 1 and 6"),
        ([0, 6], "[6] are not valid: step indices must be integers in 0..5"),
        ([-1], "[-1] are not valid"),
        ([1.0], "[1.0] are not valid"),
        ([True], "[True] are not valid"),
        ([], "[] are not valid"),
    ],
)
def test_select_steps_errors_name_the_problem(which, message):
    with pytest.raises(DitqError) as err:
        select_steps(6, which)
    assert message in str(err.value)


def test_select_steps_rejects_an_empty_run():
    with pytest.raises(DitqError, match="at least 1, got 0"):
        select_steps(0, "all")


def test_guided_set_has_cond_and_uncond_entries_per_sample_and_step(guided_set):
    assert len(guided_set) == 3 * 3 * 2
    assert guided_set.x.shape == (18, 3, 8, 8) and guided_set.x.dtype == torch.float32
    for name in ("t", "y", "step"):
        assert getattr(guided_set, name).dtype == torch.long
    assert guided_set.step.tolist() == [s for s in (0, 2, 5) for _ in range(6)]
    for step in (0, 2, 5):
        at_step = guided_set.step == step
        assert guided_set.y[at_step].tolist() == CLASSES + [4, 4, 4]  # null class = 4
        cond, uncond = guided_set.x[at_step].split(3)
        torch.testing.assert_close(cond, uncond, rtol=0, atol=0)
    assert guided_set.meta["steps"] == [0, 2, 5] and guided_set.meta["num_steps"] == 6
    assert guided_set.meta["model"]["num_classes"] == 4
    assert guided_set.meta["sampling"]["cfg_scale"] == 1.5


def test_unguided_set_has_only_conditional_entries():
    unguided = build(UNGUIDED)
    assert len(unguided) == 3 * 3
    assert unguided.y.tolist() == CLASSES * 3


def test_first_step_is_the_initial_noise_and_t_are_the_respaced_timesteps(guided_set):
    x_T = torch.stack([torch.randn(3, 8, 8, generator=sample_generator(5, i)) for i in range(3)])
    first = guided_set.x[guided_set.step == 0]
    torch.testing.assert_close(first, torch.cat([x_T, x_T]), rtol=0, atol=0)
    noisiest_first = create_diffusion("6").timestep_map.flip(0)
    assert guided_set.t.tolist() == [int(noisiest_first[s]) for s in guided_set.step]
    assert guided_set.timesteps() == [int(noisiest_first[s]) for s in (0, 2, 5)]
    assert num_sampling_steps(GUIDED) == 6


def test_same_seed_same_set_and_batch_size_only_changes_rounding(guided_set):
    again = build()
    for name in ("x", "t", "y", "step"):
        assert torch.equal(getattr(again, name), getattr(guided_set, name))
    assert again.meta == guided_set.meta
    rebatched = build(batch_size=3)
    torch.testing.assert_close(rebatched.x, guided_set.x, rtol=1e-4, atol=1e-4)
    assert torch.equal(rebatched.t, guided_set.t) and torch.equal(rebatched.y, guided_set.y)
    other_seed = build(SamplingSettings(sampler="ddim", steps=6, cfg_scale=1.5, seed=6))
    assert not torch.equal(other_seed.x, guided_set.x)


def test_batches_group_by_timestep_in_sampling_order(guided_set):
    batches = list(guided_set.batches(4))
    assert [len(x) for x, _, _ in batches] == [4, 2] * 3
    assert all(len(set(t.tolist())) == 1 for _, t, _ in batches)
    assert [int(t[0]) for _, t, _ in batches[::2]] == guided_set.timesteps()
    assert guided_set.num_batches(4) == 6
    indices = torch.cat(list(guided_set.index_batches(4)))
    assert sorted(indices.tolist()) == list(range(len(guided_set)))
    flat = list(guided_set.batches(5, by_timestep=False))
    assert [len(x) for x, _, _ in flat] == [5, 5, 5, 3]
    torch.testing.assert_close(torch.cat([x for x, _, _ in flat]), guided_set.x)
    with pytest.raises(DitqError, match="at least 1"):
        next(guided_set.batches(0))


def test_subset_keeps_the_chosen_steps(guided_set):
    first = guided_set.subset([0])
    assert len(first) == 6 and set(first.step.tolist()) == {0}
    assert first.meta["steps"] == [0] and guided_set.meta["steps"] == [0, 2, 5]
    assert guided_set.subset(None) is guided_set
    with pytest.raises(
        DitqError, match=r"no entries at steps \[1, 3\]; it holds steps \[0, 2, 5\]"
    ):
        guided_set.subset([0, 1, 3])


def test_save_load_round_trip_is_exact_and_atomic(guided_set, tmp_path):
    path = tmp_path / "calib" / "set.safetensors"
    guided_set.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["set.safetensors"]
    loaded = CalibrationSet.load(path)
    for name in ("x", "t", "y", "step"):
        assert torch.equal(getattr(loaded, name), getattr(guided_set, name))
    assert loaded.meta == guided_set.meta


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(DitqError, match="does not exist"):
        CalibrationSet.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DitqError, match="is not a ditq calibration set"):
        CalibrationSet.load(junk)


def test_check_matches_names_both_configs(guided_set):
    guided_set.check_matches(tiny_dit())
    with pytest.raises(DitqError) as err:
        guided_set.check_matches(tiny_dit(in_channels=4, num_classes=10))
    message = str(err.value)
    assert "made for a model with in_channels=3, num_classes=4" in message
    assert "this model has in_channels=4, num_classes=10" in message
    assert "regenerate the calibration set for this model" in message


def test_sampling_stops_after_the_last_selected_step():
    model = tiny_dit()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[1][0].item()))
    settings = SamplingSettings(sampler="ddpm", steps=50, cfg_scale=1.5, seed=0)
    first = build_calibration_set(model, 3, settings, steps="first", progress=False)
    assert calls == [999] and first.timesteps() == [999]  # one guided call, then stop
    calls.clear()
    build_calibration_set(model, 3, settings, steps=[0, 4], progress=False)
    assert len(calls) == 5
