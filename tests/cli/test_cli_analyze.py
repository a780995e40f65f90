"""``ditq analyze`` end to end on a tiny checkpoint: four files, or nothing on error."""

import json

import numpy as np
import pytest
from PIL import Image

import ditq.eval.sqnr
from ditq.cli import main
from ditq.errors import DitqError

FILES = ("sqnr.json", "sqnr_by_step.png", "sqnr_heatmap_first.png", "sqnr_heatmap_all.png")


def _analyze(model_args, out, *extra):
    return main(
        [
            "analyze",
            *model_args,
            "--device",
            "cpu",
            "--calib-samples",
            "2",
            "--calib-num-steps",
            "5",
            "--quiet",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_analyze_writes_study_and_plots(model_args, tmp_path, capsys):
    out = tmp_path / "study"
    assert (
        _analyze(
            model_args, out, "--wbits", "4", "--w-granularity", "group", "--w-group-size", "16"
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["study"]  # no temporary directory left
    result = json.loads((out / "sqnr.json").read_text())
    assert [s["index"] for s in result["steps"]] == [0, 1, 2, 3, 4]
    assert result["settings"]["quant_config"]["w_granularity"] == "group"
    assert result["settings"]["calibration_settings"]["num_steps"] == 5
    for calibration in ("first_step", "all_steps"):
        matrix = np.array(list(result["sqnr_db"][calibration].values()))
        assert matrix.shape == (8, 5) and np.isfinite(matrix).all()
    for name in FILES[1:]:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 200
    printed = capsys.readouterr().out
    assert "W4A8" in printed and "first step" in printed and "all steps" in printed
    assert result["summary"]["first_step"]["worst_layer"] in printed


@pytest.mark.parametrize(
    "flags, message",
    [(["--abits", "16"], "static"), (["--calib-steps", "1"], "--calib-steps")],
)
def test_analyze_bad_input_writes_nothing(model_args, tmp_path, capsys, flags, message):
    out = tmp_path / "study"
    assert _analyze(model_args, out, *flags) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_analyze_failure_while_writing_leaves_nothing(model_args, tmp_path, monkeypatch):
    def broken_heatmap(*_args, **_kwargs):
        raise DitqError("disk full")

    monkeypatch.setattr(ditq.eval.sqnr, "heatmap", broken_heatmap)
    assert _analyze(model_args, tmp_path / "study") == 2  # after sqnr.json was written
    assert list(tmp_path.iterdir()) == []
