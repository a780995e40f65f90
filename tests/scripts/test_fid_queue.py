"""The FID queue's plan (what a lease still has to run, given the results of earlier
leases) and its sampling attempts."""

from __future__ import annotations

import argparse

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def fid_queue():
    return load_script("benchmarks/fid_queue.py")


def _queue(fid_queue, tmp_path, **overrides):
    values = dict(
        model="dit.pt", out=str(tmp_path / "out"), plan="official-20k,official-250", ref=None,
        inception=None, batch_size=2500, num_samples=10_000, steps="50,250", results=None,
        device="cuda", quantize_flags="", eval_only=False,
    )  # fmt: skip
    return fid_queue.Queue(argparse.Namespace(**{**values, **overrides}))


def test_a_run_measured_in_an_earlier_lease_is_not_planned_again(fid_queue, tmp_path):
    earlier = tmp_path / "earlier" / "ptq4dit-blocks-pct-w4a8"
    earlier.mkdir(parents=True)
    (earlier / "eval_ddpm250.json").write_text("{}")
    planned = {(j.run, j.steps) for j in _queue(fid_queue, tmp_path).pending}
    left = _queue(fid_queue, tmp_path, results=[str(earlier.parent)]).pending
    assert planned - {(j.run, j.steps) for j in left} == {("ptq4dit-blocks-pct-w4a8", 250)}
    assert ("ptq4dit-blocks-pct-w4a8", 250) in planned
    assert [j.resumable for j in left if j.run == "ptq4dit-official-w4a8-20k"] == [True, True]


@pytest.mark.parametrize("outcomes", [[True], [False, True], [False, False, True]])
def test_sampling_tries_cuda_graphs_then_compiled_then_eager(
    fid_queue, tmp_path, monkeypatch, outcomes
):
    queue = _queue(fid_queue, tmp_path)
    tried, results = [], iter(outcomes)

    def execute(key, command, gpu):
        tried.append(command)
        return next(results)

    monkeypatch.setattr(queue, "execute", execute)
    assert queue.sample(fid_queue.Job(1, "gptq-w4a8", 50, ""), "0")
    assert len(tried) == len(outcomes)
    eager = [arg for arg in tried[0] if arg != "--compile"]
    expected = [[*eager, "--compile"], [*eager, "--compile", "--no-cuda-graphs"], eager]
    assert tried == expected[: len(outcomes)]
    assert eager[eager.index("--steps") + 1] == "50" and "--no-cuda-graphs" not in eager
