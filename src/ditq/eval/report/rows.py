"""The report's table: one row per run and setting, ΔFID and PSNR/SSIM against the FP run,
and the notes on what could not be compared."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ditq.errors import DitqError
from ditq.eval.images import load_images
from ditq.eval.metrics import psnr, ssim
from ditq.eval.report.grids import GRID_SAMPLES, run_grids
from ditq.eval.report.runs import (
    FP_METHOD,
    Run,
    SampleFile,
    load_run,
    pair_samples,
    sampler_and_steps,
    setting_order,
)

MISSING_TEXT = "–"

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "run", ""),
    ("method", "method", ""),
    ("bits", "bits", ""),
    ("setting", "sampler/steps", ""),
    ("fid", "FID", ".2f"),
    ("delta_fid", "ΔFID vs FP", "+.2f"),
    ("sfid", "sFID", ".2f"),
    ("precision", "Precision", ".3f"),
    ("recall", "Recall", ".3f"),
    ("psnr", "PSNR vs FP (dB)", ".2f"),
    ("ssim", "SSIM vs FP", ".4f"),
    ("output_sqnr_db", "output SQNR (dB)", ".1f"),
    ("calibration_time_s", "calibration (s)", ".1f"),
    ("model_size_mb", "size (MB)", ".2f"),
)
"""Table columns: row key, header, format of numbers."""
IDENTITY_COLUMNS = ("name", "method", "bits", "setting")
"""Columns shown even when empty; the other columns appear when some row has a value."""


@dataclass
class Report:
    """Everything :func:`write_report` writes: table rows, grids and notes."""

    runs: list[Run]
    fp: Run | None
    rows: list[dict[str, Any]]
    grids: list[dict[str, Any]]
    notes: list[str]
    grid_images: dict[str, Image.Image] = field(default_factory=dict)


def _choose_fp(runs: list[Run], fp: str | Path | None) -> Run | None:
    """The run of directory ``fp`` (method set to fp when unknown), else the run whose
    method is fp."""
    if fp is not None:
        chosen = [run for run in runs if run.path.resolve() == Path(fp).resolve()]
        if chosen[0].method is None:
            chosen[0].method = FP_METHOD
        return chosen[0]
    candidates = [run for run in runs if run.is_fp]
    if len(candidates) > 1:
        raise DitqError(
            f"several runs have method 'fp' ({', '.join(r.name for r in candidates)}): "
            "choose the baseline with --fp DIR"
        )
    return candidates[0] if candidates else None


def _distance(fp_samples: SampleFile, samples: SampleFile, compared: int) -> dict[str, Any]:
    """Mean PSNR (identical pairs left out, as :func:`ditq.eval.metrics.distance_to_reference`)
    and SSIM of the first ``compared`` samples against the FP samples, with notes on identical
    pairs and on images smaller than SSIM's window (SSIM None)."""
    images = load_images(samples.path, compared)
    reference = load_images(fp_samples.path, compared)
    values = psnr(images, reference)
    finite = values[np.isfinite(values)]
    result = {"psnr": float(finite.mean()) if finite.size else None, "ssim": None, "notes": []}
    if finite.size < len(values):
        identical = len(values) - finite.size
        result["notes"].append(f"{identical} of {len(values)} samples identical to FP's (no PSNR)")
    try:
        result["ssim"] = float(ssim(images, reference).mean())
    except DitqError as err:
        result["notes"].append(f"SSIM not computed: {err}")
    return result


def _row(
    run: Run, setting: str, fp: Run | None, distance: bool, notes: list[tuple[str, str]]
) -> dict[str, Any]:
    sampler, steps = sampler_and_steps(setting)
    evaluation, samples = run.evals.get(setting), run.samples.get(setting)
    metrics = evaluation.result["metrics"] if evaluation else {}
    row: dict[str, Any] = {
        "name": run.name,
        "method": run.method,
        "bits": run.bits,
        "setting": setting or None,
        "sampler": sampler,
        "steps": steps,
        "eval_file": str(evaluation.path) if evaluation else None,
        "samples_file": str(samples.path) if samples else None,
        "num_samples": evaluation.result.get("num_samples") if evaluation else None,
        "metrics": metrics,
        **{key: metrics.get(key) for key in ("fid", "sfid", "precision", "recall")},
        "delta_fid": None,
        "psnr": metrics.get("psnr"),
        "ssim": metrics.get("ssim"),
        "psnr_ssim_source": "eval" if "psnr" in metrics or "ssim" in metrics else None,
        "output_sqnr_db": run.annotations.get("output_sqnr_db"),
        "calibration_time_s": run.calibration_time_s,
        "model_size_mb": run.model_size_mb,
    }
    if samples and row["num_samples"] is None:
        row["num_samples"] = samples.count
    subject = f"{run.name} {setting}".strip()
    if evaluation:
        notes += [(subject, text) for text in evaluation.result.get("warnings", [])]
    if fp is None or run is fp:
        return row
    fp_eval = fp.evals.get(setting)
    fp_fid = fp_eval.result["metrics"].get("fid") if fp_eval else None
    if row["fid"] is not None and fp_fid is not None:
        row["delta_fid"] = row["fid"] - fp_fid
    fp_samples = fp.samples.get(setting)
    if distance and row["psnr_ssim_source"] is None and samples and fp_samples:
        pairing = pair_samples(fp_samples, samples, fp.name)
        if pairing.problem:
            notes.append((subject, pairing.problem))
        if pairing.labels_match is not False:
            computed = _distance(fp_samples, samples, pairing.compared)
            row.update(psnr=computed["psnr"], ssim=computed["ssim"])
            notes.append((subject, "PSNR/SSIM vs FP computed from the samples by ditq report"))
            notes += [(subject, note) for note in computed["notes"]]
            row["psnr_ssim_source"] = f"computed by ditq report on {pairing.compared} samples"
    return row


def _grouped(notes: list[tuple[str, str]]) -> list[str]:
    """One line per distinct message, naming the rows (subjects) it applies to."""
    subjects: dict[str, list[str]] = {}
    for subject, message in notes:
        subjects.setdefault(message, []).append(subject)
    return [
        f"{message} ({', '.join(filter(None, names))})" if any(names) else message
        for message, names in subjects.items()
    ]


def build_report(
    run_dirs: list[str | Path],
    fp: str | Path | None = None,
    grid_samples: int = GRID_SAMPLES,
    distance: bool = True,
) -> Report:
    """Read the run directories and compute the table rows (ΔFID, PSNR/SSIM vs FP), the
    grids and notes. ``distance=False`` skips computing missing PSNR/SSIM from samples."""
    if not run_dirs:
        raise DitqError("no run directories given: pass at least one RUN_DIR")
    if grid_samples < 1:
        raise DitqError(f"grid samples must be at least 1, got {grid_samples}")
    if fp is not None and all(Path(fp).resolve() != Path(p).resolve() for p in run_dirs):
        run_dirs = [fp, *run_dirs]
    runs = [load_run(path) for path in run_dirs]
    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DitqError(
            f"several runs are named {duplicates}: give each a distinct name in its run.json "
            '({"name": "..."}) or rename the directories'
        )
    fp_run = _choose_fp(runs, fp)
    runs.sort(key=lambda run: run is not fp_run)
    notes: list[tuple[str, str]] = []
    if fp_run is None:
        message = (
            "no FP run among the runs (samples from `ditq sample` of a float model, "
            "method 'fp' in run.json, or --fp DIR): no ΔFID; PSNR/SSIM vs FP only where "
            "`ditq eval --vs` computed them"
        )
        notes.append(("", message))
    rows = []
    for run in runs:
        settings = sorted(set(run.evals) | set(run.samples), key=setting_order)
        rows += [_row(run, setting, fp_run, distance, notes) for setting in settings or [""]]
    grids, grid_images = run_grids(runs, fp_run, grid_samples)
    return Report(runs, fp_run, rows, grids, _grouped(notes), grid_images)


def _format(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING_TEXT
    return format(value, spec) if spec else str(value)


def table_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The table as text: header, then one line of formatted cells per row. Metric columns
    that no row has a value for (e.g. FID when only PSNR was measured) are left out."""
    columns = [
        column
        for column in COLUMNS
        if column[0] in IDENTITY_COLUMNS or any(row.get(column[0]) is not None for row in rows)
    ]
    header = [title for _, title, _ in columns]
    return [header] + [[_format(row.get(key), spec) for key, _, spec in columns] for row in rows]
