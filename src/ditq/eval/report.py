"""Comparison report over run directories: ``ditq report RUN_DIR... --out DIR``.

A run directory is what a user accumulates for one model. It holds any of:

* ``ditq.json`` + ``calibration_report.json``: a quantized model written by ``ditq quantize``
  (method, bits WxAy from ``method_config``, calibration wall time ``wall_time_s.total``,
  model size = bytes of ``model.safetensors``);
* ``samples*.npz``: samples in the ADM layout (``arr_0`` uint8 NHWC, ``arr_1`` labels), e.g.
  ``ditq sample --out RUN/samples_ddpm250.npz``;
* ``eval*.json``: results of ``ditq eval --out RUN/eval_ddpm250.json``;
* ``run.json`` (optional, any run): ``{"name": ..., "method": ..., "bits": "W32A32",
  "calibration_time_s": ..., "model_size_mb": ..., "notes": ...}``; its values take
  precedence over those read from ``ditq.json``; other keys are kept in ``report.json``.

The run's name defaults to the directory name. The FP baseline is the run whose method is
``fp`` (a directory with only samples/eval files and ``run.json`` saying ``"method": "fp"``),
or the one given with ``--fp``; the FP row is the reference of every "vs FP" column.

The sampler setting of a file is the part of its name after ``samples``/``eval``
(``samples_ddpm250.npz`` and ``eval-ddpm-250.json`` are both ``ddpm250``: a sampler name
``ddpm``/``ddim`` and its step count are written together); an ``eval*.json`` without one
takes the setting of the samples file it names. Rows are matched to the FP row of the same
setting: ΔFID = FID - FID(FP). PSNR/SSIM vs FP come from the eval file (``ditq eval --vs``)
or, when absent, are computed here from the two sample files on their common first samples
(PROTOCOL.md, "distance to the FP model on the same noise"), provided their labels agree.

Output (written to a temporary directory and renamed at the end):
``report.md`` and ``report.html`` (one row per run and setting), ``report.json`` (everything,
machine-readable), ``grids/SETTING.png`` (the first N samples of every run having samples for
a setting shared by several runs, one labelled row per run, same indices) and
``plots/delta_fid.png`` / ``plots/psnr.png`` (grouped bars by bits and method).
"""

from __future__ import annotations

import html
import json
import math
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw

from ditq.errors import DitqError
from ditq.eval.grid import make_grid
from ditq.eval.images import load_images, npz_keys, read_npz_array
from ditq.eval.metrics import psnr, ssim
from ditq.eval.plots import BACKGROUND, LABEL_SIZE, _put_text, _text_size, bar_plot
from ditq.io import SAMPLES_META_KEY, OutputKind, check_output, read_json_object, write_output
from ditq.pipeline.checkpoint import MANIFEST, REPORT, WEIGHTS, read_manifest
from ditq.pipeline.config import QuantConfig
from ditq.version import __version__

RUN_FILE = "run.json"
REPORT_FORMAT = "ditq-report"
REPORT_JSON = "report.json"
SAMPLES_PREFIX, EVAL_PREFIX = "samples", "eval"
FP_METHOD = "fp"
MISSING_TEXT = "–"
GRID_SAMPLES = 10
GRID_PAD = 2
GRID_TILE_PX = 64
"""Grid tiles are enlarged by an integer factor to at least this many pixels (8 px -> x8)."""
GRID_LABEL_MARGIN = 8
SETTING_PATTERN = re.compile(r"(ddpm|ddim)[-_]?(\d+)", re.IGNORECASE)
BYTES_PER_MB = 1_000_000

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
class SampleFile:
    """A ``samples*.npz`` of a run: its setting, count, image shape, labels, and what
    ``ditq sample`` recorded of the model that made it (``ditq.io.SAMPLES_META_KEY``)."""

    path: Path
    setting: str
    count: int
    image_shape: tuple[int, int, int]
    labels: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "setting": self.setting,
            "count": self.count,
            "image_shape": list(self.image_shape),
            "has_labels": self.labels is not None,
        }


@dataclass
class EvalFile:
    """An ``eval*.json`` of a run (the result of :func:`ditq.eval.evaluate`)."""

    path: Path
    setting: str
    result: dict[str, Any]


@dataclass
class Run:
    """One run directory, read by :func:`load_run`."""

    path: Path
    name: str
    method: str | None = None
    bits: str | None = None
    calibration_time_s: float | None = None
    model_size_mb: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, SampleFile] = field(default_factory=dict)
    evals: dict[str, EvalFile] = field(default_factory=dict)

    @property
    def is_fp(self) -> bool:
        return (self.method or "").lower() == FP_METHOD

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.name,
            "method": self.method,
            "bits": self.bits,
            "calibration_time_s": self.calibration_time_s,
            "model_size_mb": self.model_size_mb,
            "settings": self.settings,
            "run_json": self.annotations,
            "samples": {key: s.to_dict() for key, s in self.samples.items()},
            "evals": {key: str(e.path) for key, e in self.evals.items()},
        }


def canonical_setting(text: str) -> str:
    """Lower-case setting tag with sampler and steps written together (``DDPM-250`` ->
    ``ddpm250``)."""
    tag = text.strip("_-. ").lower()
    return SETTING_PATTERN.sub(lambda m: f"{m[1].lower()}{m[2]}", tag)


def sampler_and_steps(setting: str) -> tuple[str | None, int | None]:
    match = SETTING_PATTERN.search(setting)
    return (match[1].lower(), int(match[2])) if match else (None, None)


def _file_setting(path: Path, prefix: str) -> str:
    return canonical_setting(path.stem[len(prefix) :])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DitqError(f"cannot read {path}: {err}; fix or remove the file") from err
    if not isinstance(data, dict):
        raise DitqError(f"{path} must hold a JSON object")
    return data


def _array_header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


@contextmanager
def _image_stream(path: Path) -> Iterator[tuple[IO[bytes], tuple[int, ...]]]:
    """``arr_0`` of a samples npz as a stream at its first image, and its shape."""
    if "arr_0" not in npz_keys(path):
        raise DitqError(
            f"{path} has no arr_0: samples must be in the ADM layout (arr_0 uint8 NHWC, arr_1 "
            "labels), as `ditq sample --out` writes"
        )
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as stream:
        shape, fortran_order, dtype = _array_header(stream)
        if dtype != np.uint8 or len(shape) != 4 or fortran_order:
            raise DitqError(f"{path}: arr_0 must be uint8 N x H x W x C, got {dtype} {shape}")
        yield stream, shape


def read_first_images(path: str | Path, count: int) -> np.ndarray:
    """The first ``count`` images of a samples npz, read from the start of ``arr_0`` without
    loading the rest: uint8 (min(count, N), H, W, C)."""
    with _image_stream(Path(path)) as (stream, shape):
        take = min(count, shape[0])
        data = stream.read(take * math.prod(shape[1:]))
    return np.frombuffer(data, np.uint8).reshape(take, *shape[1:])


def _sample_file(path: Path) -> SampleFile:
    with _image_stream(path) as (_, shape):
        count, image_shape = shape[0], tuple(shape[1:])
    labels, meta = None, {}
    keys = npz_keys(path)
    with np.load(path) as archive:
        if "arr_1" in keys:
            labels = np.asarray(read_npz_array(archive, "arr_1", path))
        if SAMPLES_META_KEY in keys:
            with suppress(ValueError):
                meta = json.loads(str(read_npz_array(archive, SAMPLES_META_KEY, path)))
    setting = _file_setting(path, SAMPLES_PREFIX)
    return SampleFile(
        path, setting, count, image_shape, labels, meta if isinstance(meta, dict) else {}
    )


def _eval_file(path: Path) -> EvalFile:
    result = _read_json(path)
    if not isinstance(result.get("metrics"), dict):
        raise DitqError(f"{path} is not a `ditq eval --out` result (no 'metrics' object)")
    setting = _file_setting(path, EVAL_PREFIX)
    if not setting and result.get("samples"):
        match = SETTING_PATTERN.search(Path(str(result["samples"])).stem)
        setting = canonical_setting(match[0]) if match else ""
    return EvalFile(path, setting, result)


def _quantization_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """Granularities, calibration set and method hyper-parameters of a quantized run
    (PROTOCOL.md, "Settings reported per run")."""
    config = manifest.get("method_config", {})
    calibration = manifest.get("calibration", {})
    sampling = calibration.get("sampling", {})
    shared = {f.name for f in fields(QuantConfig)}
    group = config.get("w_granularity", "")
    if "group" in group:
        group += f" {config.get('w_group_size')}"
    return {
        "weights": f"{group}, {'sym' if config.get('w_symmetric') else 'asym'}, "
        f"{config.get('w_range')}, {config.get('w_fmt')}",
        "activations": f"{config.get('a_granularity')}, "
        f"{'dynamic' if config.get('a_dynamic') else 'static'}, "
        f"{'sym' if config.get('a_symmetric') else 'asym'}, {config.get('a_range')}",
        "attention_bits": config.get("attn_bits"),
        "calibration": {
            "samples": calibration.get("num_samples"),
            "steps": calibration.get("steps"),
            "sampler": sampling.get("sampler"),
            "num_steps": calibration.get("num_steps"),
            "cfg_scale": sampling.get("cfg_scale"),
            "seed": sampling.get("seed"),
        },
        "method": {key: value for key, value in config.items() if key not in shared},
    }


def _unique(found: list, kind: str, run: Path) -> dict[str, Any]:
    by_setting: dict[str, Any] = {}
    for item in found:
        if item.setting in by_setting:
            raise DitqError(
                f"{run}: {by_setting[item.setting].path.name} and {item.path.name} are two "
                f"{kind} files of the setting {item.setting or '(none)'!r}; remove or rename one"
            )
        by_setting[item.setting] = item
    return by_setting


def load_run(path: str | Path) -> Run:
    """Read a run directory (module docstring); a directory with nothing usable is an error."""
    path = Path(path)
    if not path.is_dir():
        raise DitqError(f"run directory {path} does not exist (or is not a directory)")
    run = Run(path=path, name=path.resolve().name)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        config = manifest.get("method_config", {})
        run.method = manifest.get("method")
        run.bits = f"W{config.get('wbits')}A{config.get('abits')}"
        run.settings = _quantization_settings(manifest)
        if (path / REPORT).is_file():
            total = _read_json(path / REPORT).get("wall_time_s", {}).get("total")
            run.calibration_time_s = None if total is None else float(total)
        if (path / WEIGHTS).is_file():
            run.model_size_mb = (path / WEIGHTS).stat().st_size / BYTES_PER_MB
    run.samples = _unique(
        [_sample_file(p) for p in sorted(path.glob(f"{SAMPLES_PREFIX}*.npz"))], "samples", path
    )
    run.evals = _unique(
        [_eval_file(p) for p in sorted(path.glob(f"{EVAL_PREFIX}*.json"))], "eval", path
    )
    if run.method is None:  # samples written by `ditq sample` say which model made them
        made_by = {(s.meta.get("method"), s.meta.get("bits")) for s in run.samples.values()}
        if len(made_by) == 1 and None not in next(iter(made_by)):
            run.method, run.bits = next(iter(made_by))
    if not (run.samples or run.evals or (path / MANIFEST).is_file()):
        raise DitqError(
            f"{path} holds nothing to report: expected ditq.json (a `ditq quantize` output), "
            "samples*.npz or eval*.json"
        )
    if (path / RUN_FILE).is_file():
        run.annotations = _read_json(path / RUN_FILE)
        for key in ("name", "method", "bits", "calibration_time_s", "model_size_mb"):
            if run.annotations.get(key) is not None:
                setattr(run, key, run.annotations[key])
    return run


def _setting_order(setting: str) -> tuple:
    sampler, steps = sampler_and_steps(setting)
    return (sampler or "~", -(steps or 0), setting)


def _bits_order(bits: str) -> tuple:
    numbers = [int(n) for n in re.findall(r"\d+", bits)]
    return (*[-n for n in numbers], bits)


@dataclass
class Pairing:
    """How the samples of a run line up with the reference samples of the same setting."""

    compared: int
    problem: str | None = None
    labels_match: bool | None = None


def pair_samples(reference: SampleFile, other: SampleFile, reference_name: str) -> Pairing:
    """Check that ``other`` can be compared sample by sample with ``reference``: equal image
    shapes (else an error), equal labels on the common first samples."""
    if other.image_shape != reference.image_shape:
        raise DitqError(
            f"{other.path} holds {'x'.join(map(str, other.image_shape))} images but "
            f"{reference.path} {'x'.join(map(str, reference.image_shape))}: samples of one "
            "setting must come from models of the same resolution; remove one of them"
        )
    compared = min(reference.count, other.count)
    if reference.labels is None or other.labels is None:
        return Pairing(compared, "no labels stored (arr_1): same labels not verified")
    if not np.array_equal(reference.labels[:compared], other.labels[:compared]):
        return Pairing(
            compared,
            f"labels differ from {reference_name}'s: not the same noise and labels",
            labels_match=False,
        )
    return Pairing(compared, labels_match=True)


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


def comparison_grid(
    rows: list[tuple[str, np.ndarray]], pad: int = GRID_PAD, scale: int | None = None
) -> Image.Image:
    """One labelled row of images per ``(label, uint8 NHWC images)`` entry, all rows of
    equal length and image size; the tiles right of the label column are
    :func:`ditq.eval.grid.make_grid` of the rows stacked, ``ncols`` = images per row."""
    count = len(rows[0][1])
    height = rows[0][1].shape[1]
    scale = scale or max(1, math.ceil(GRID_TILE_PX / height))
    tiles = make_grid(
        np.concatenate([images for _, images in rows]), ncols=count, pad=pad, scale=scale
    ).convert("RGB")
    label_width = max(_text_size(label, LABEL_SIZE)[0] for label, _ in rows)
    left = label_width + 2 * GRID_LABEL_MARGIN
    picture = Image.new("RGB", (left + tiles.width, tiles.height), BACKGROUND)
    picture.paste(tiles, (left, 0))
    draw = ImageDraw.Draw(picture)
    for r, (label, _) in enumerate(rows):
        middle = (pad + r * (height + pad) + height / 2) * scale
        _put_text(draw, left - GRID_LABEL_MARGIN, middle, label, LABEL_SIZE, "right", "middle")
    return picture


def _grid_file_name(setting: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', setting) or 'samples'}.png"


def _grids(runs: list[Run], reference_run: Run | None, count: int) -> tuple[list, dict]:
    """For each setting with samples in several runs: the first ``count`` samples of each run
    (reference run first), the labels check, and the picture."""
    grids, images = [], {}
    settings = sorted({s for run in runs for s in run.samples}, key=_setting_order)
    for setting in settings:
        members = [run for run in runs if setting in run.samples]
        if len(members) < 2:
            continue
        if reference_run in members:
            members.remove(reference_run)
            members.insert(0, reference_run)
        first = members[0]
        pairings = {
            run.name: pair_samples(first.samples[setting], run.samples[setting], first.name)
            for run in members[1:]
        }
        shown = min(count, *(run.samples[setting].count for run in members))
        name = _grid_file_name(setting)
        images[name] = comparison_grid(
            [(run.name, read_first_images(run.samples[setting].path, shown)) for run in members]
        )
        problems = {n: p.problem for n, p in pairings.items() if p.problem}
        grids.append(
            {
                "setting": setting or None,
                "path": f"grids/{name}",
                "runs": [run.name for run in members],
                "indices": list(range(shown)),
                "labels_match": all(p.labels_match for p in pairings.values()),
                "problems": problems,
            }
        )
    return grids, images


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
        settings = sorted(set(run.evals) | set(run.samples), key=_setting_order)
        rows += [_row(run, setting, fp_run, distance, notes) for setting in settings or [""]]
    grids, grid_images = _grids(runs, fp_run, grid_samples)
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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table in Markdown (what ``ditq report`` prints)."""
    header, *body = table_cells(rows)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + " --- |" * len(header), *map(line, body)])


def _bars(report: Report, key: str) -> tuple[list[str], dict[str, list[float]]] | None:
    """Groups (bits) and series (method, plus the setting when several) of ``key``'s values
    over the non-FP rows; series are named by run when two runs share method and bits."""
    fp_name = getattr(report.fp, "name", None)
    rows = [row for row in report.rows if row[key] is not None and row["name"] != fp_name]
    if not rows:
        return None
    several_settings = len({r["setting"] for r in rows}) > 1

    def series_of(row: dict, by: str) -> str:
        label = str(row[by] or MISSING_TEXT)
        return f"{label} {row['setting'] or ''}".strip() if several_settings else label

    by = "method"
    cells = [(series_of(r, by), r["bits"] or MISSING_TEXT) for r in rows]
    if len(set(cells)) < len(cells):
        by = "name"
    groups = sorted({r["bits"] or MISSING_TEXT for r in rows}, key=_bits_order)
    series: dict[str, list[float]] = {}
    for row in rows:
        values = series.setdefault(series_of(row, by), [math.nan] * len(groups))
        values[groups.index(row["bits"] or MISSING_TEXT)] = float(row[key])
    return groups, series


def _plots(report: Report, out: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Draw the bar plots that have values; returns them and notes on those left out."""
    written, notes = [], []
    for key, name, title, ylabel in (
        ("delta_fid", "delta_fid.png", "ΔFID to FP (same sampler and steps)", "ΔFID"),
        ("psnr", "psnr.png", "PSNR vs FP on the same noise", "PSNR (dB)"),
    ):
        bars = _bars(report, key)
        if bars is None:
            notes.append(f"plots/{name} not drawn: no {key} values")
            continue
        bar_plot(*bars, title=title, ylabel=ylabel, path=out / "plots" / name, xlabel="bits")
        written.append({"metric": key, "path": f"plots/{name}", "title": title})
    return written, notes


def _run_details(run: Run) -> list[str]:
    """Path, granularities, calibration set and method settings of a run."""
    parts = [str(run.path)]
    if run.settings:
        calib = run.settings["calibration"]
        steps = calib["steps"]
        timesteps = len(steps) if isinstance(steps, list) else steps
        parts += [
            f"weights {run.settings['weights']}",
            f"activations {run.settings['activations']}",
            f"attention bits {run.settings['attention_bits']}",
            f"calibration {calib['samples']} samples × {timesteps} timesteps of "
            f"{calib['sampler']} {calib['num_steps']} (cfg {calib['cfg_scale']})",
        ]
        if run.settings["method"]:
            parts.append(f"method settings {json.dumps(run.settings['method'])}")
    if run.annotations.get("notes"):
        parts.append(str(run.annotations["notes"]))
    return parts


def _run_title(run: Run) -> str:
    return f"{run.method or MISSING_TEXT}, {run.bits or MISSING_TEXT}"


def _markdown_run(run: Run) -> str:
    path, *details = _run_details(run)
    return f"- **{run.name}** ({_run_title(run)}): " + "; ".join([f"`{path}`", *details])


def _grid_caption(grid: dict[str, Any]) -> str:
    caption = (
        f"{grid['setting'] or 'samples'}: first {len(grid['indices'])} samples, rows "
        f"{', '.join(grid['runs'])}"
    )
    if grid["labels_match"]:
        return caption + " (same labels in every row)."
    return caption + ". " + "; ".join(f"{n}: {p}" for n, p in grid["problems"].items()) + "."


def _markdown(report: Report, header: str, plots: list[dict[str, str]], notes: list[str]) -> str:
    lines = [f"# ditq report\n\n{header}\n", markdown_table(report.rows), ""]
    lines += ["## Runs\n", *map(_markdown_run, report.runs), ""]
    if report.grids:
        lines.append("## Samples on the same noise\n")
        for grid in report.grids:
            alt = grid["setting"] or "samples"
            lines += [_grid_caption(grid) + "\n", f"![{alt}]({grid['path']})\n"]
    if plots:
        lines.append("## Plots\n")
        lines += [f"![{plot['title']}]({plot['path']})\n" for plot in plots]
    if notes:
        lines += ["## Notes\n", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def _html_run(run: Run) -> str:
    path, *details = (html.escape(part) for part in _run_details(run))
    title = f"<b>{html.escape(run.name)}</b> ({html.escape(_run_title(run))})"
    return f"<li>{title}: <code>{path}</code>" + "".join(f"; {d}" for d in details) + "</li>"


CSS = """body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; }
td:nth-child(-n+4), th:nth-child(-n+4) { text-align: left; }
tr.fp { font-weight: bold; }
img { max-width: 100%; }
img.grid { image-rendering: pixelated; }
code { font-size: 13px; }"""


def _html(report: Report, header: str, plots: list[dict[str, str]], notes: list[str]) -> str:
    esc = html.escape
    head, *body = table_cells(report.rows)
    fp_name = getattr(report.fp, "name", None)
    table = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for row, cells in zip(report.rows, body, strict=True):
        css = ' class="fp"' if row["name"] == fp_name else ""
        table.append(f"<tr{css}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>ditq report</title>',
        f"<style>\n{CSS}\n</style></head><body>",
        f"<h1>ditq report</h1><p>{esc(header)}</p>",
        *table,
        "</table>",
        "<h2>Runs</h2><ul>",
        *map(_html_run, report.runs),
        "</ul>",
    ]
    if report.grids:
        parts.append("<h2>Samples on the same noise</h2>")
        for grid in report.grids:
            parts += [
                f"<p>{esc(_grid_caption(grid))}</p>",
                f'<img class="grid" src="{esc(grid["path"])}" '
                f'alt="{esc(grid["setting"] or "samples")}">',
            ]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f'<img src="{esc(p["path"])}" alt="{esc(p["title"])}">' for p in plots]
    if notes:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{esc(n)}</li>" for n in notes), "</ul>"]
    return "\n".join([*parts, "</body></html>", ""])


def _json_safe(value: Any) -> Any:
    """Non-finite floats as None (JSON has no inf/nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def is_report_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a ``report.json`` written by :func:`write_report`."""
    summary = read_json_object(Path(path) / REPORT_JSON)
    return summary is not None and (
        summary.get("format") == REPORT_FORMAT or {"ditq_version", "rows", "runs"} <= set(summary)
    )


REPORT_DIR = OutputKind("ditq report directory", True, is_report_dir)


def write_report(report: Report, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write report.md, report.html, report.json, grids/ and plots/ to ``out`` atomically;
    an existing report directory is replaced only with ``overwrite``."""
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"Generated by ditq {__version__} on {created} from {len(report.runs)} runs."
    with write_output(out, REPORT_DIR, overwrite=overwrite) as tmp:
        for name, picture in report.grid_images.items():
            (tmp / "grids").mkdir(exist_ok=True)
            picture.save(tmp / "grids" / name, format="PNG")
        plots, plot_notes = _plots(report, tmp)
        notes = report.notes + plot_notes
        (tmp / "report.md").write_text(_markdown(report, header, plots, notes), "utf-8")
        (tmp / "report.html").write_text(_html(report, header, plots, notes), "utf-8")
        summary = {
            "format": REPORT_FORMAT,
            "ditq_version": __version__,
            "created": created,
            "fp": getattr(report.fp, "name", None),
            "columns": {key: title for key, title, _ in COLUMNS},
            "rows": report.rows,
            "runs": [run.to_dict() for run in report.runs],
            "grids": report.grids,
            "plots": plots,
            "notes": notes,
        }
        text = json.dumps(_json_safe(summary), indent=2, ensure_ascii=False) + "\n"
        (tmp / REPORT_JSON).write_text(text, "utf-8")
    return Path(out)


def check_report_output(
    out: str | Path, run_dirs: list[str | Path], *, overwrite: bool = False
) -> None:
    """Refuse an output that would replace or lie inside a run directory, or replace
    anything but an earlier report (:func:`ditq.io.check_output`)."""
    check_output(out, REPORT_DIR, overwrite=overwrite, inputs=run_dirs, input_dirs=run_dirs)


def make_report(
    run_dirs: list[str | Path],
    out: str | Path,
    fp: str | Path | None = None,
    grid_samples: int = GRID_SAMPLES,
    distance: bool = True,
    overwrite: bool = False,
) -> Report:
    """:func:`build_report` then :func:`write_report`; ``out`` is checked first (it may
    not hold or lie inside a run directory, nor replace anything but an earlier report)."""
    check_report_output(out, run_dirs, overwrite=overwrite)
    report = build_report(run_dirs, fp=fp, grid_samples=grid_samples, distance=distance)
    write_report(report, out, overwrite=overwrite)
    return report
