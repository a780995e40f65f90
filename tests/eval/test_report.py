"""``ditq.eval.report``: table values and ΔFID, PSNR/SSIM vs FP, grids made of the actual
sample pixels, files and links, atomic output and errors, on synthetic runs plus a real
quantized directory."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import ditq
from ditq.calib.dataset import build_calibration_set
from ditq.diffusion.pipeline import SamplingSettings
from ditq.errors import DitqError
from ditq.eval.metrics import ssim
from ditq.eval.report import (
    GRID_PAD,
    GRID_TILE_PX,
    build_report,
    canonical_setting,
    load_run,
    make_report,
    markdown_table,
    read_first_images,
)
from ditq.eval.report import render as report_render
from ditq.io import save_samples_npz
from ditq.methods import RTNConfig
from ditq.pipeline.checkpoint import WEIGHTS, save_quantized

from conftest import tiny_dit

COUNT, SIDE = 12, 8
LABELS = np.arange(COUNT) % 4


def _images(seed: int, count: int = COUNT, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def _eval(path, **metrics) -> None:
    path.write_text(json.dumps({"samples": "x.npz", "num_samples": COUNT, "metrics": metrics}))


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """A real `ditq quantize`-style directory: rtn W8A8 on tiny_dit, saved by the core."""
    model = tiny_dit()
    calib = build_calibration_set(
        model, 2, SamplingSettings(sampler="ddim", steps=3, seed=1), progress=False
    )
    config = RTNConfig(wbits=8, abits=8)
    ditq.quantize(model, config, calib, progress=False)
    out = tmp_path_factory.mktemp("q") / "rtn-w8a8"
    report = {"wall_time_s": {"total": 3.4, "calibration_set": 1.0, "method": 2.4}}
    save_quantized(model, out, "rtn", config.to_dict(), calib.meta, report)
    return out


@pytest.fixture
def runs(tmp_path, quantized_dir):
    """fp (ddpm250 + ddim50), rtn-w8a8 (real quantized dir, PSNR in its eval), w4 (run.json
    only, PSNR left to the report)."""
    fp, rtn, w4 = tmp_path / "fp", tmp_path / "rtn-w8a8", tmp_path / "w4"
    fp.mkdir()
    (fp / "run.json").write_text(json.dumps({"name": "fp", "method": "fp", "bits": "W32A32"}))
    save_samples_npz(fp / "samples_ddpm250.npz", _images(0), LABELS)
    save_samples_npz(fp / "samples_ddim50.npz", _images(1), LABELS)
    _eval(fp / "eval_ddpm250.json", fid=10.0, sfid=20.0, precision=0.7, recall=0.6)
    _eval(fp / "eval_ddim50.json", fid=12.0)
    shutil.copytree(quantized_dir, rtn)
    brighter = np.clip(_images(0).astype(int) + 2, 0, 255).astype(np.uint8)
    save_samples_npz(rtn / "samples_ddpm250.npz", brighter, LABELS)
    _eval(rtn / "eval_ddpm250.json", fid=11.5, sfid=21.0, psnr=30.0, ssim=0.9)
    w4.mkdir()
    annotation = {"name": "w4", "method": "rtn", "bits": "W4A8", "calibration_time_s": 2.0}
    (w4 / "run.json").write_text(json.dumps(annotation))
    save_samples_npz(w4 / "samples_DDPM-250.npz", _images(2, count=10), LABELS[:10])
    _eval(w4 / "eval-ddpm-250.json", fid=15.0)
    return fp, rtn, w4


def _rows(report):
    return {(row["name"], row["setting"]): row for row in report.rows}


def test_table_values_delta_fid_and_distance_to_fp(runs):
    fp, rtn, w4 = runs
    report = build_report([rtn, w4, fp])
    assert [run.name for run in report.runs] == ["fp", "rtn-w8a8", "w4"]  # FP first
    rows = _rows(report)
    assert list(rows) == [
        ("fp", "ddim50"),
        ("fp", "ddpm250"),
        ("rtn-w8a8", "ddpm250"),
        ("w4", "ddpm250"),
    ]
    quantized = rows["rtn-w8a8", "ddpm250"]
    assert (quantized["method"], quantized["bits"]) == ("rtn", "W8A8")  # from ditq.json
    assert quantized["calibration_time_s"] == 3.4  # calibration_report.json
    assert quantized["model_size_mb"] == (rtn / WEIGHTS).stat().st_size / 1e6
    assert quantized["delta_fid"] == pytest.approx(1.5)
    assert (quantized["psnr"], quantized["ssim"], quantized["psnr_ssim_source"]) == (
        30.0,
        0.9,
        "eval",
    )
    w4_row = rows["w4", "ddpm250"]
    assert (w4_row["bits"], w4_row["calibration_time_s"]) == ("W4A8", 2.0)  # run.json
    assert w4_row["delta_fid"] == pytest.approx(5.0)
    # computed from the samples on the 10 samples both runs have, float64 reference
    ours, theirs = _images(2, count=10).astype(np.float64), _images(0)[:10].astype(np.float64)
    mse = ((ours - theirs) ** 2).reshape(10, -1).mean(axis=1)
    assert w4_row["psnr"] == pytest.approx(np.mean(10 * np.log10(255**2 / mse)), rel=1e-12)
    assert w4_row["ssim"] is None  # 8 px images are smaller than SSIM's 11-tap window
    assert "10 samples" in w4_row["psnr_ssim_source"]
    assert any(n.startswith("SSIM not computed") and "(w4 ddpm250)" in n for n in report.notes)
    assert rows["fp", "ddpm250"]["delta_fid"] is None and rows["fp", "ddim50"]["fid"] == 12.0
    table = markdown_table(report.rows).splitlines()
    assert table[0].startswith("| run | method | bits | sampler/steps | FID | ΔFID vs FP |")
    assert table[4] == (
        "| rtn-w8a8 | rtn | W8A8 | ddpm250 | 11.50 | +1.50 | 21.00 | – | – | 30.00 | 0.9000 "
        f"| 3.4 | {(rtn / WEIGHTS).stat().st_size / 1e6:.2f} |"
    )
    assert table[2].startswith("| fp | fp | W32A32 | ddim50 | 12.00 | – | – |")


def test_ssim_vs_fp_is_computed_on_the_common_first_samples(tmp_path):
    fp, quantized = tmp_path / "fp", tmp_path / "q"
    for run, seed, count in ((fp, 0, 6), (quantized, 1, 4)):
        run.mkdir()
        save_samples_npz(run / "samples_ddim20.npz", _images(seed, count, side=16), LABELS[:count])
    (fp / "run.json").write_text(json.dumps({"method": "fp"}))
    row = _rows(build_report([fp, quantized]))["q", "ddim20"]
    expected = ssim(_images(1, 4, side=16), _images(0, 6, side=16)[:4]).mean()
    assert row["ssim"] == pytest.approx(expected, rel=1e-12) and row["psnr"] < 10


def test_without_distance_and_without_fp(runs):
    fp, rtn, w4 = runs
    rows = _rows(build_report([fp, w4], distance=False))
    assert rows["w4", "ddpm250"]["psnr"] is None and rows["w4", "ddpm250"]["delta_fid"] == 5.0
    report = build_report([rtn, w4])
    assert all(row["delta_fid"] is None and row["psnr"] in (None, 30.0) for row in report.rows)
    assert any("no FP run" in note for note in report.notes)


def test_fp_flag_marks_the_baseline_and_is_added_to_the_runs(runs):
    fp, rtn, _ = runs
    (fp / "run.json").unlink()
    report = build_report([rtn], fp=fp)
    assert report.fp.name == "fp" and report.fp.method == "fp"
    assert _rows(report)["rtn-w8a8", "ddpm250"]["delta_fid"] == pytest.approx(1.5)


def test_grid_rows_are_the_samples_of_each_run(runs):
    fp, rtn, w4 = runs
    report = build_report([w4, rtn, fp], grid_samples=5)
    (grid,) = report.grids  # ddim50 only in fp: no grid
    assert grid["runs"] == ["fp", "w4", "rtn-w8a8"] and grid["indices"] == [0, 1, 2, 3, 4]
    assert grid["labels_match"] and grid["path"] == "grids/ddpm250.png"
    picture = np.asarray(report.grid_images["ddpm250.png"])
    scale = GRID_TILE_PX // SIDE
    tiles_width = (5 * (SIDE + GRID_PAD) + GRID_PAD) * scale
    assert picture.shape[0] == (3 * (SIDE + GRID_PAD) + GRID_PAD) * scale
    label_width = picture.shape[1] - tiles_width
    assert label_width > 0
    labels_column = picture[:, :label_width]
    assert (labels_column < 128).any()  # the run names are drawn
    for r, path in enumerate(
        [fp / "samples_ddpm250.npz", w4 / "samples_DDPM-250.npz", rtn / "samples_ddpm250.npz"]
    ):
        samples = np.load(path)["arr_0"]
        for c in range(5):
            top = (GRID_PAD + r * (SIDE + GRID_PAD)) * scale
            left = label_width + (GRID_PAD + c * (SIDE + GRID_PAD)) * scale
            block = picture[top : top + SIDE * scale, left : left + SIDE * scale]
            expected = samples[c].repeat(scale, axis=0).repeat(scale, axis=1)
            np.testing.assert_array_equal(block, expected)


def test_different_labels_are_reported_and_not_compared(runs):
    fp, _, w4 = runs
    save_samples_npz(
        w4 / "samples_DDPM-250.npz", _images(2, count=10), (LABELS[:10] + 1) % 4, overwrite=True
    )
    report = build_report([fp, w4])
    assert _rows(report)["w4", "ddpm250"]["psnr"] is None
    assert not report.grids[0]["labels_match"]
    assert any("labels differ from fp's" in note for note in report.notes)


def test_written_files_links_and_json(runs, tmp_path):
    out = tmp_path / "report"
    make_report([*runs], out)
    for name in ("report.md", "report.html", "report.json", "grids/ddpm250.png"):
        assert (out / name).is_file(), name
    for name in ("plots/delta_fid.png", "plots/psnr.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert all((out / source).is_file() for source in sources)
    assert sorted(sources) == ["grids/ddpm250.png", "plots/delta_fid.png", "plots/psnr.png"]
    assert re.findall(r'(?:href|src)="([^"]+)"', page) == sources  # nothing else is linked
    markdown = (out / "report.md").read_text()
    assert sorted(re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)) == sorted(sources)
    assert "<td>+5.00</td>" in page and "| w4 | rtn | W4A8 | ddpm250 | 15.00 | +5.00 |" in markdown
    summary = json.loads((out / "report.json").read_text())
    assert summary["fp"] == "fp" and len(summary["rows"]) == 4
    w4_row = next(row for row in summary["rows"] if row["name"] == "w4")
    assert w4_row["delta_fid"] == pytest.approx(5.0) and w4_row["metrics"] == {"fid": 15.0}
    rtn_run = next(run for run in summary["runs"] if run["name"] == "rtn-w8a8")
    assert rtn_run["settings"]["weights"].startswith("channel, asym")
    assert rtn_run["settings"]["calibration"]["samples"] == 2
    assert [p["path"] for p in summary["plots"]] == ["plots/delta_fid.png", "plots/psnr.png"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_output_is_atomic_on_error(runs, tmp_path, monkeypatch):
    out = tmp_path / "report"
    make_report([*runs], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise DitqError("plot failed")

    monkeypatch.setattr(report_render, "bar_plot", broken)
    with pytest.raises(DitqError, match="plot failed"):
        make_report([*runs], out, overwrite=True)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # previous report untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]


def test_existing_output_is_replaced_only_when_it_is_a_report_and_asked(runs, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(DitqError, match="is not a ditq report directory"):
            make_report([*runs], out, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    make_report([*runs], out)
    with pytest.raises(DitqError, match="already holds a ditq report directory"):
        make_report([*runs], out)
    make_report([*runs], out, overwrite=True)
    with pytest.raises(DitqError, match="would replace the input"):
        make_report([*runs], runs[0].parent, overwrite=True)
    with pytest.raises(DitqError, match="inside the input directory"):
        make_report([*runs], runs[0] / "report")


def test_errors(runs, tmp_path):
    fp, rtn, w4 = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DitqError, match="holds nothing to report"):
        build_report([fp, empty])
    with pytest.raises(DitqError, match="no run directories"):
        build_report([])
    with pytest.raises(DitqError, match="does not exist"):
        build_report([tmp_path / "missing"])
    save_samples_npz(w4 / "samples_DDPM-250.npz", _images(2, side=16), LABELS, overwrite=True)
    with pytest.raises(DitqError, match="16x16x3 images but .* 8x8x3"):
        make_report([fp, w4], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (w4 / "run.json").write_text(json.dumps({"name": "fp", "method": "fp"}))
    with pytest.raises(DitqError, match="several runs are named"):
        build_report([fp, w4])
    (w4 / "run.json").write_text(json.dumps({"name": "other-fp", "method": "fp"}))
    with pytest.raises(DitqError, match="--fp DIR"):
        build_report([fp, w4])
    (rtn / "eval_broken.json").write_text('{"fid": 3}')
    with pytest.raises(DitqError, match="not a `ditq eval --out` result"):
        load_run(rtn)


def test_settings_from_names():
    assert canonical_setting("_DDPM-250") == "ddpm250"
    assert canonical_setting("ddim_50_cfg4") == "ddim50_cfg4"
    assert canonical_setting("") == ""


def test_eval_without_setting_takes_its_samples_file_setting(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "eval.json").write_text(
        json.dumps({"samples": "/x/samples_ddim20.npz", "metrics": {"fid": 1.0}})
    )
    assert list(load_run(run).evals) == ["ddim20"]


def test_read_first_images_reads_a_prefix(tmp_path):
    images = _images(3, count=7)
    save_samples_npz(tmp_path / "s.npz", images, LABELS[:7])
    np.testing.assert_array_equal(read_first_images(tmp_path / "s.npz", 3), images[:3])
    np.testing.assert_array_equal(read_first_images(tmp_path / "s.npz", 99), images)
    assert read_first_images(tmp_path / "s.npz", 0).shape == (0, SIDE, SIDE, 3)
