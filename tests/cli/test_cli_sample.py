"""``ditq sample`` end to end on a tiny random checkpoint."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditq.cli import main

from conftest import tiny_dit


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_dit().state_dict(), path)
    return path


def _sample(checkpoint, *extra):
    base = [
        "sample",
        "--model",
        str(checkpoint),
        "--num-heads",
        "2",
        "--vae",
        "none",
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--quiet",
    ]
    return main(base + list(extra))


def test_writes_adm_npz_and_grid_reproducibly(checkpoint, tmp_path, capsys):
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    args = ["--num-samples", "5", "--batch-size", "2", "--classes", "1,3", "--seed", "4"]
    assert _sample(checkpoint, *args, "--out", str(out), "--grid", str(grid)) == 0
    data = np.load(out)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(data["arr_1"], [1, 3, 1, 3, 1])
    assert Image.open(grid).size[0] > 8 * 3
    assert "5 samples" in capsys.readouterr().out
    assert _sample(checkpoint, *args, "--out", str(tmp_path / "again.npz")) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["arr_0"], data["arr_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.npz", "g.png", "s.npz", "tiny.pt"]


def test_init_noise_file(checkpoint, tmp_path):
    noise = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    for seed in ("1", "2"):
        args = ["--num-samples", "2", "--classes", "1", "--seed", seed]
        args += [
            "--init-noise",
            str(tmp_path / "noise.npy"),
            "--out",
            str(tmp_path / f"{seed}.npz"),
        ]
        assert _sample(checkpoint, *args) == 0
    # DDIM with eta 0 is deterministic given x_T and labels: the seed no longer matters.
    first, second = (np.load(tmp_path / f"{seed}.npz")["arr_0"] for seed in ("1", "2"))
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "nothing to write"),
        (["--out", "x.npz", "--classes", "9"], "labels must lie in 0..3"),
        (["--out", "x.npz", "--init-noise", "missing.npy"], "does not exist"),
        (["--out", "x.npz", "--steps", "0"], "--steps must be between 1 and 1000"),
        (["--out", "x.npz", "--cuda-graphs"], "--cuda-graphs replays compiled blocks on a GPU"),
        (["--out", "x.npz", "--compile-scope", "model"], "add --compile or drop it"),
    ],
)
def test_bad_input_is_one_line_without_traceback(
    checkpoint, tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.chdir(tmp_path)
    assert _sample(checkpoint, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("graphs", [False, True], ids=["no-graphs", "cuda-graphs"])
@pytest.mark.parametrize("scope", [None, "blocks"])
def test_compile_covers_the_whole_call_unless_told(
    checkpoint, tmp_path, monkeypatch, scope, graphs
):
    """``--compile`` compiles one graph per denoiser call by default, with CUDA graphs (as
    on a GPU) too, each block with ``--compile-scope blocks``; the samples are those of the
    uncompiled model (the stand-in compiler runs the code as is)."""
    import ditq.cli.sample as sample_cli

    scopes = []
    compile_denoiser = sample_cli.compile_denoiser
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: fn)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, mode=None: None)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    monkeypatch.setattr(sample_cli, "use_cuda_graphs", lambda *a: graphs)

    def recorded(model, cuda_graphs, scope):
        scopes.append((cuda_graphs, scope))
        return compile_denoiser(model, cuda_graphs=cuda_graphs, scope=scope)

    monkeypatch.setattr(sample_cli, "compile_denoiser", recorded)
    args = ["--num-samples", "2", "--classes", "1", "--seed", "3"]
    assert _sample(checkpoint, *args, "--out", str(tmp_path / "eager.npz")) == 0
    flags = ["--compile"] + (["--compile-scope", scope] if scope else [])
    assert _sample(checkpoint, *args, *flags, "--out", str(tmp_path / "compiled.npz")) == 0
    assert scopes == [(graphs, scope or "model")]
    eager, compiled = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("eager", "compiled"))
    np.testing.assert_array_equal(compiled, eager)


def test_pixel_model_with_a_vae_is_refused(checkpoint, capsys):
    args = [
        "sample",
        "--model",
        str(checkpoint),
        "--num-heads",
        "2",
        "--vae",
        "ema",
        "--out",
        "x.npz",
        "--device",
        "cpu",
    ]
    assert main(args) == 2
    assert "pass --vae none" in capsys.readouterr().err


def test_missing_model_file(tmp_path, capsys):
    assert (
        main(["sample", "--model", str(tmp_path / "nope.pt"), "--vae", "none", "--out", "x.npz"])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_torchrun_slices_gather_to_the_single_process_result(checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    args = [
        "--model",
        str(checkpoint),
        "--num-heads",
        "2",
        "--vae",
        "none",
        "--sampler",
        "ddpm",
        "--steps",
        "4",
        "--num-samples",
        "5",
        "--batch-size",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(["sample", *args, "--out", str(tmp_path / "single.npz")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "-m",
        "ditq",
        "sample",
    ]
    done = subprocess.run(
        [*torchrun, *args, "--out", str(tmp_path / "multi.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 processes" in done.stdout
    single, multi = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    np.testing.assert_array_equal(multi["arr_0"], single["arr_0"])
    np.testing.assert_array_equal(multi["arr_1"], single["arr_1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.npz", "single.npz", "tiny.pt"]


def test_out_of_gpu_memory_is_one_line_naming_the_batch_size(
    checkpoint, tmp_path, monkeypatch, capsys
):
    import ditq.cli.sample as sample

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 7.32 GiB. GPU 0 has a total capacity of "
            "79.18 GiB of which 5.03 GiB is free. Including non-PyTorch memory, this process "
            "has 22.83 GiB memory in use."
        )

    monkeypatch.setattr(sample, "generate", out_of_memory)
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "s.npz"
    assert _sample(checkpoint, "--num-samples", "4", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ditq sample: error: out of GPU memory (tried to allocate 7.32 GiB, 5.03 GiB free): "
        "lower --batch-size (with cfg each image runs twice)"
    ]
    assert sorted(tmp_path.iterdir()) == before  # no output, no temporary file
