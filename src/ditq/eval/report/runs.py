"""Run directories as the report reads them: discovery of sample, eval and quantized-model
files, the sampler setting in a file name, npz headers and first images, run.json."""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import numpy as np

from ditq.errors import DitqError
from ditq.eval.images import npz_keys, read_npz_array
from ditq.io import SAMPLES_META_KEY
from ditq.pipeline.checkpoint import MANIFEST, REPORT, WEIGHTS, read_manifest
from ditq.pipeline.config import QuantConfig

RUN_FILE = "run.json"
SAMPLES_PREFIX, EVAL_PREFIX = "samples", "eval"
SETTING_PATTERN = re.compile(r"(ddpm|ddim)[-_]?(\d+)", re.IGNORECASE)
BYTES_PER_MB = 1_000_000


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


FP_METHOD = "fp"


def setting_order(setting: str) -> tuple:
    sampler, steps = sampler_and_steps(setting)
    return (sampler or "~", -(steps or 0), setting)


def bits_order(bits: str) -> tuple:
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
