"""``ditq demo`` end to end on a tiny random DiT, and the bundled model it uses by default."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ditq import load_model
from ditq.cli import main
from ditq.models.loading import BUNDLED_MODELS, CONFIG_METADATA_KEY

from conftest import tiny_dit

METHOD_NAMES = ("ptq4dit", "ditas", "single-step")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model = tiny_dit(hidden_size=128, num_heads=4)  # single-step's weight groups are 128 wide
    path = root / "tiny.safetensors"
    metadata = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata)
    out = root / "demo"
    argv = ["demo", "--model", str(path), "--out", str(out), "--num-samples", "4"]
    assert main([*argv, "--steps", "4", "--calib-samples", "2", "--quiet"]) == 0
    return out


def test_demo_writes_runs_sqnr_and_report(demo_run, capsys):
    names = [f"{m}-w{w}a8" for m in METHOD_NAMES for w in (8, 4)]
    for name in ["fp", *names]:
        assert (demo_run / name / "samples_ddim4.npz").is_file()
    for name in names:
        assert (demo_run / name / "model.safetensors").is_file()
    assert {p.name for p in (demo_run / "sqnr").iterdir()} >= {"sqnr.json", "sqnr_by_step.png"}
    report = json.loads((demo_run / "report" / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"fp", *names}
    for method in METHOD_NAMES:
        w8, w4 = rows[f"{method}-w8a8"], rows[f"{method}-w4a8"]
        assert math.isfinite(w8["psnr"]) and math.isfinite(w4["psnr"])
        assert w8["output_sqnr_db"] > w4["output_sqnr_db"] > 0  # 4-bit weights lose more
        assert w4["model_size_mb"] < w8["model_size_mb"] < rows["fp"]["model_size_mb"]
    assert (demo_run / "report" / "grids" / "ddim4.png").is_file()
    assert (demo_run / "report" / "report.html").is_file()


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "x"), "--bits", "8bit", "--quiet"]) == 2
    assert "--bits" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "x"), "--methods", "nosuch", "--quiet"]) == 2
    assert not (tmp_path / "x").exists()


def test_bundled_model_loads_by_name():
    path = Path(str(resources.files("ditq") / "assets" / BUNDLED_MODELS["demo"]))
    model = load_model("demo")  # shipped in the package: no skip, no download
    assert path.stat().st_size <= 20_000_000
    assert (model.config.input_size, model.config.in_channels, model.num_classes) == (32, 3, 10)
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.tensor([10, 500]), torch.tensor([3, 10]))
    assert out.shape == (2, 6, 32, 32) and torch.isfinite(out).all()


def test_demo_runs_on_the_bundled_model(tmp_path):
    """The README's first command, reduced to one method and few steps."""
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--methods", "single-step", "--bits", "w8a8"]
    assert (
        main([*argv, "--num-samples", "2", "--steps", "3", "--calib-samples", "1", "--quiet"]) == 0
    )
    report = json.loads((out / "report" / "report.json").read_text())
    row = {r["name"]: r for r in report["rows"]}["single-step-w8a8"]
    assert math.isfinite(row["psnr"]) and row["output_sqnr_db"] > 0


def test_demo_runs_w4a4_methods(tmp_path):
    """``--methods`` takes every method and ``--bits`` W4A4: SVDQuant's 4-bit activations in
    groups with its low-rank branch keep far more of the output than RTN's per-tensor ones."""
    model = tiny_dit(hidden_size=128, num_heads=4)  # SVDQuant's groups are 64 wide
    path = tmp_path / "tiny.safetensors"
    metadata = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata)
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(path), "--out", str(out), "--methods", "rtn,svdquant"]
    argv += ["--bits", "w4a4", "--num-samples", "2", "--steps", "4", "--calib-samples", "2"]
    assert main([*argv, "--quiet"]) == 0
    rows = {r["name"]: r for r in json.loads((out / "report" / "report.json").read_text())["rows"]}
    assert set(rows) == {"fp", "rtn-w4a4", "svdquant-w4a4"}
    assert rows["svdquant-w4a4"]["output_sqnr_db"] > rows["rtn-w4a4"]["output_sqnr_db"] + 2
