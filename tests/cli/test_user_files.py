"""A user's files are never lost, and bad input is one line on stderr with exit status 2.

Every test drives the ``ditq`` command as a user does (a subprocess) and checks the exit
status, the message, and that nothing was written or deleted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ditq.cli.quantize import describe_calibration
from ditq.io import save_samples_npz
from ditq.methods import METHODS

from conftest import save_checkpoint, tiny_dit

FAST_CALIB = [
    "--calib-samples", "2", "--calib-sampler", "ddim", "--calib-num-steps", "4",
    "--calib-steps", "2", "--device", "cpu", "--quiet",
]  # fmt: skip


def ditq(*args: str, cwd: Path, umask: int | None = None) -> subprocess.CompletedProcess:
    """Run the ``ditq`` command line in ``cwd`` (optionally under ``umask``)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "ditq", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``root`` (hidden ones included): its mode and content hash."""
    found = {}
    for path in sorted(root.rglob("*")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path.relative_to(root))] = (path.stat().st_mode, digest)
    return found


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ditq {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> list[str]:
    return save_checkpoint(tiny_dit(), workdir / "tiny.pt")


@pytest.fixture(scope="module")
def quantized(workdir, checkpoint) -> Path:
    """A quantized directory written by ``ditq quantize`` (rtn, W8A8)."""
    result = ditq("quantize", *checkpoint, "--method", "rtn", "--out", "q", *FAST_CALIB,
                  cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return workdir / "q"


def user_directory(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return path


def test_quantize_never_replaces_a_directory_it_did_not_write(tmp_path, checkpoint):
    user_directory(tmp_path / "w")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        result = ditq("quantize", *checkpoint, "--method", "rtn", "--out", "w", *FAST_CALIB,
                      *extra, cwd=tmp_path)  # fmt: skip
        assert_one_line_error(result, "quantize", "w exists and is not a ditq quantized directory")
        assert snapshot(tmp_path) == before


def test_output_that_is_the_current_directory_is_refused(tmp_path, checkpoint):
    user_directory(tmp_path)
    before = snapshot(tmp_path)
    result = ditq("quantize", *checkpoint, "--method", "rtn", "--out", ".", *FAST_CALIB,
                  cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, "quantize", "current directory")
    assert snapshot(tmp_path) == before


def test_an_earlier_quantized_directory_is_replaced_only_with_overwrite(tmp_path, checkpoint):
    args = ["quantize", *checkpoint, "--method", "rtn", "--out", "q", *FAST_CALIB]
    assert ditq(*args, cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path)
    result = ditq(*args, "--wbits", "4", cwd=tmp_path)
    assert_one_line_error(result, "quantize", "already holds a ditq quantized directory",
                          "--overwrite")  # fmt: skip
    assert snapshot(tmp_path) == before
    assert ditq(*args, "--wbits", "4", "--overwrite", cwd=tmp_path).returncode == 0
    manifest = json.loads((tmp_path / "q" / "ditq.json").read_text())
    assert manifest["method_config"]["wbits"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_report_into_the_parent_of_its_runs_deletes_nothing(tmp_path, quantized):
    runs = tmp_path / "runs"
    for name in ("fp", "w8"):
        (runs / name).mkdir(parents=True)
        images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
        save_samples_npz(runs / name / "samples_ddim4.npz", images, np.arange(4))
    (runs / "fp" / "run.json").write_text('{"method": "fp"}')
    before = snapshot(tmp_path)
    for out, words in (("runs", "would replace the input"), ("runs/fp/r", "inside the input")):
        result = ditq("report", "runs/fp", "runs/w8", "--out", out, "--overwrite", cwd=tmp_path)
        assert_one_line_error(result, "report", *words.split(" "))
        assert snapshot(tmp_path) == before


def test_a_killed_run_leaves_a_temporary_that_the_next_run_removes(tmp_path, checkpoint):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # a process id that no longer runs, like that of a killed ditq
    stale = tmp_path / f".q.ditq-tmp-{finished.pid}-0123abcd"
    (stale / "partial").mkdir(parents=True)
    running = tmp_path / f".q.ditq-tmp-{os.getpid()}-0123abcd"  # still running: kept
    running.mkdir()
    mine = tmp_path / ".q.my-own-hidden-file"
    mine.write_text("keep me")
    result = ditq("quantize", *checkpoint, "--method", "rtn", "--out", "q", *FAST_CALIB,
                  cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and running.is_dir() and mine.read_text() == "keep me"


def test_outputs_get_the_users_umask(tmp_path, checkpoint):
    result = ditq("quantize", *checkpoint, "--method", "rtn", "--out", "q", *FAST_CALIB,
                  cwd=tmp_path, umask=0o027)  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = ditq("sample", "--model", "q", "--num-samples", "2", "--steps", "2", "--sampler",
                  "ddim", "--out", "s.npz", "--grid", "s.png", "--quiet", "--device", "cpu",
                  cwd=tmp_path, umask=0o022)  # fmt: skip
    assert result.returncode == 0, result.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "q", *tmp_path.rglob("*")]}
    assert modes["q"] == 0o750
    assert all(modes[n] == 0o640 for n in ("model.safetensors", "ditq.json"))
    assert modes["s.npz"] == modes["s.png"] == 0o644


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_damaged_safetensors_model_is_one_line(tmp_path, damage):
    model = tiny_dit()
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    data = data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data))
    (tmp_path / "m.safetensors").write_bytes(data)
    before = snapshot(tmp_path)
    result = ditq("quantize", "--model", "m.safetensors", "--method", "rtn", "--out", "q",
                  *FAST_CALIB, cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, "quantize", "m.safetensors is not a readable safetensors file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_quantized_directory_is_one_line(tmp_path, quantized, damage):
    import shutil

    copy = shutil.copytree(quantized, tmp_path / "q")
    weights = copy / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-1000])
    result = ditq("sample", "--model", "q", "--out", "s.npz", "--num-samples", "1", "--quiet",
                  cwd=tmp_path)  # fmt: skip
    words = "no model.safetensors" if damage == "missing" else "not a readable safetensors"
    assert_one_line_error(result, "sample", words)
    assert not (tmp_path / "s.npz").exists()


def test_a_random_pt_file_never_suggests_disabling_the_safe_loader(tmp_path):
    (tmp_path / "m.pt").write_bytes(os.urandom(4096))
    result = ditq("sample", "--model", "m.pt", "--out", "s.npz", "--quiet", cwd=tmp_path)
    line = assert_one_line_error(result, "sample", "m.pt is not a checkpoint ditq can read")
    assert "weights_only" not in line and "pickle" not in line.lower()


def test_sample_refuses_a_directory_output_before_sampling(tmp_path, quantized):
    user_directory(tmp_path / "out")
    before = snapshot(tmp_path)
    start = time.perf_counter()
    result = ditq("sample", "--model", str(quantized), "--out", "out", "--num-samples",
                  "100000", "--steps", "250", "--quiet", "--device", "cpu",
                  cwd=tmp_path)  # fmt: skip
    assert time.perf_counter() - start < 60  # refused before 100,000 samples were drawn
    assert_one_line_error(result, "sample", "--out out is a directory")
    result = ditq("sample", "--model", str(quantized), "--grid", "out/notes.txt",
                  "--num-samples", "100000", "--quiet", cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, "sample", "--grid out/notes.txt exists and is not a PNG image")
    assert snapshot(tmp_path) == before


def test_eval_of_an_object_array_is_one_line(tmp_path):
    np.savez(tmp_path / "obj.npz", np.array([{"a": 1}, None], dtype=object))
    save_samples_npz(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), np.uint8), np.arange(2))
    for samples, vs in (("obj.npz", "s.npz"), ("s.npz", "obj.npz")):
        result = ditq("eval", "--samples", samples, "--vs", vs, "--out", "e.json", "--quiet",
                      cwd=tmp_path)  # fmt: skip
        assert_one_line_error(result, "eval", "obj.npz", "Python objects")
    assert not (tmp_path / "e.json").exists()


def test_a_group_size_that_does_not_fit_is_refused_before_calibration(tmp_path, checkpoint):
    start = time.perf_counter()
    result = ditq("quantize", *checkpoint, "--method", "rtn", "--out", "q", "--w-granularity",
                  "group", "--w-group-size", "7", "--calib-samples", "1000", "--quiet",
                  cwd=tmp_path)  # fmt: skip
    line = assert_one_line_error(result, "quantize", "--w-group-size", "--w-granularity channel")
    assert "PerChannel" not in line and "does not divide" in line
    assert time.perf_counter() - start < 60  # 1,000 trajectories of 250 steps were not drawn
    assert list(tmp_path.iterdir()) == []


def test_bits_outside_the_paper_are_allowed_with_one_note(tmp_path, checkpoint):
    result = ditq("quantize", *checkpoint, "--method", "ptq4dit", "--wbits", "8", "--abits",
                  "4", "--recon-iters", "0", "--out", "q", *FAST_CALIB, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "published settings" in line]
    assert notes == [
        "ditq quantize: note: W8A4 is outside ptq4dit's published settings (W8A8, W4A8): "
        "allowed, but its paper did not measure it; for 4-bit activations use --method "
        'svdquant (README, "W4A4")'
    ]
    assert "attention matmuls A8" in result.stdout


def test_calibration_cost_is_said_up_front_with_the_cpu_preset(tmp_path, checkpoint):
    result = ditq("quantize", *checkpoint, "--method", "rtn", "--out", "q", "--calib-preset",
                  "cpu", "--device", "cpu", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "ditq quantize: calibration set (cpu preset): 8 FP trajectories x 25 DDIM steps, "
        "guidance 1.5 = 400 image-evaluations of the model" in result.stderr
    )
    manifest = json.loads((tmp_path / "q" / "ditq.json").read_text())
    assert manifest["calibration"]["preset"] == "cpu"
    assert manifest["calibration"]["settings"]["num_samples"] == 8


def test_published_calibration_on_a_cpu_points_to_the_preset():
    lines = describe_calibration(METHODS["ptq4dit"].default_calib, "published", "cpu")
    assert "32 FP trajectories x 250 DDPM steps, guidance 1.5 = 16,000" in lines[0]
    assert "--calib-preset cpu" in lines[1] and "40x less" in lines[1]
    assert len(describe_calibration(METHODS["ptq4dit"].default_calib, "published", "cuda")) == 1
