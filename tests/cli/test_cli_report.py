"""``ditq report`` end to end: ``ditq quantize`` and ``ditq sample`` on a tiny checkpoint,
synthetic eval files (no Inception), then the report."""

import json

import numpy as np
import pytest
import torch

from ditq.cli import main
from ditq.eval.metrics import psnr

from conftest import tiny_dit

SAMPLE = ["--vae", "none", "--num-heads", "2", "--sampler", "ddim", "--steps", "3"]
SAMPLE += ["--num-samples", "6", "--classes", "0,1,2,3", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    checkpoint = root / "tiny.pt"
    torch.save(tiny_dit().state_dict(), checkpoint)
    fp, quantized = root / "fp", root / "rtn-w4a8"
    fp.mkdir()
    (fp / "run.json").write_text(json.dumps({"name": "fp", "method": "fp", "bits": "W32A32"}))
    quantize = ["quantize", "--model", str(checkpoint), "--num-heads", "2", "--vae", "none"]
    quantize += ["--method", "rtn", "--wbits", "4", "--abits", "8", "--out", str(quantized)]
    quantize += ["--calib-samples", "2", "--calib-sampler", "ddim", "--calib-num-steps", "3"]
    assert main([*quantize, "--calib-steps", "2", "--device", "cpu", "--quiet"]) == 0
    for model, run in ((checkpoint, fp), (quantized, quantized)):
        samples = run / "samples_ddim3.npz"
        assert main(["sample", "--model", str(model), *SAMPLE, "--out", str(samples)]) == 0
    for run, fid in ((fp, 40.0), (quantized, 42.5)):
        result = {"samples": str(run / "samples_ddim3.npz"), "metrics": {"fid": fid}}
        (run / "eval.json").write_text(json.dumps(result))
    return fp, quantized


def test_report_end_to_end(runs, tmp_path, capsys):
    fp, quantized = runs
    out = tmp_path / "report"
    assert main(["report", str(quantized), str(fp), "--out", str(out), "--grid-samples", "4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| run | method | bits | sampler/steps | FID | ΔFID vs FP |")
    assert printed[2].startswith("| fp | fp | W32A32 | ddim3 | 40.00 | – |")
    assert printed[3].startswith("| rtn-w4a8 | rtn | W4A8 | ddim3 | 42.50 | +2.50 |")
    summary = json.loads((out / "report.json").read_text())
    row = summary["rows"][1]
    images = [np.load(run / "samples_ddim3.npz")["arr_0"] for run in (quantized, fp)]
    values = psnr(*images)
    assert row["psnr"] == pytest.approx(values[np.isfinite(values)].mean())
    assert row["calibration_time_s"] > 0 and row["model_size_mb"] > 0
    assert summary["grids"][0]["runs"] == ["fp", "rtn-w4a8"]
    assert summary["grids"][0]["labels_match"]
    for name in ("report.md", "report.html", "grids/ddim3.png", "plots/delta_fid.png"):
        assert (out / name).is_file()


def test_report_errors_are_one_line(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(runs[0]), str(empty), "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ditq report: error:") and "nothing to report" in error
    assert error.count("\n") == 1 and not (tmp_path / "r").exists()


def test_help_defines_a_run_directory(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out
    assert "run.json" in text and "samples*.npz" in text and "eval*.json" in text


def test_a_float_run_of_ditq_sample_is_the_fp_baseline_without_run_json(runs, tmp_path, capsys):
    fp, quantized = runs
    plain = tmp_path / "fp-plain"
    plain.mkdir()
    (plain / "samples_ddim3.npz").write_bytes((fp / "samples_ddim3.npz").read_bytes())
    stored = np.load(plain / "samples_ddim3.npz")
    meta = json.loads(str(stored["ditq_meta"]))
    assert meta["method"] == "fp" and meta["bits"] == "FP32" and meta["settings"]["steps"] == 3
    assert json.loads(str(np.load(quantized / "samples_ddim3.npz")["ditq_meta"]))["bits"] == "W4A8"
    out = tmp_path / "report"
    assert main(["report", str(plain), str(quantized), "--out", str(out)]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["fp"] == "fp-plain"
    assert not any("no FP run" in note for note in summary["notes"])
    row = next(r for r in summary["rows"] if r["name"] == "rtn-w4a8")
    assert row["psnr"] is not None
