"""Inception features of image sets, their statistics, and the reference statistics cache.

Statistics file (``.npz``, written by :func:`save_statistics`):

* ``mu`` (2048,) and ``sigma`` (2048, 2048): float64 mean and covariance (``ddof=1``, as
  ``np.cov`` in pytorch-fid and ADM) of pool3 features.
* ``mu_s`` and ``sigma_s`` (2023-d): the same for the sFID spatial features; absent when the
  weights give pool3 only.
* ``pool3`` (N, 2048): the reference features themselves, needed for Precision/Recall. Stored
  as float16: half the size (200 MB for 50k images), and the rounding (relative 2^-11) is far
  below the fp16 weights' own 0.3% and the k-NN radii it feeds. ADM itself computes these
  distances in float16.
* ``meta``: a JSON string: format version, source, number of images, and the extractor's
  :meth:`~ditq.eval.inception.InceptionFeatureExtractor.report` (weights, their sha256,
  preprocessing and feature definitions).

ADM reference statistics files (``mu``, ``sigma``, ``mu_s``, ``sigma_s``) load too, without
``pool3``; ADM reference batches with images (``arr_0``) are read as images instead, so that
every number comes from one feature extractor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ditq.errors import DitqError
from ditq.eval.images import (
    image_layout,
    iterate_batches,
    load_images,
    npz_keys,
    read_npz_array,
)
from ditq.eval.inception import InceptionFeatureExtractor, load_inception
from ditq.io import OutputKind, check_output, write_output

STATISTICS_FORMAT = "ditq-inception-statistics/1"
STATISTICS_KEYS = ("mu", "sigma")


@dataclass
class FeatureSet:
    """Per-image Inception features (float32); None where the weights cannot give them."""

    pool3: np.ndarray
    spatial: np.ndarray | None
    logits: np.ndarray | None


@dataclass
class InceptionStatistics:
    """Gaussian statistics of an image set, plus its pool3 features where kept."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool3: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def extract_features(
    images: np.ndarray,
    extractor: InceptionFeatureExtractor,
    batch_size: int = 50,
    progress: bool = True,
) -> FeatureSet:
    """Run the extractor (on its own device) over uint8 NHWC images, batch by batch."""
    device = extractor.device
    outputs: dict[str, list[np.ndarray]] = {"pool3": [], "spatial": [], "logits": []}
    with (
        torch.inference_mode(),
        tqdm(total=len(images), unit="img", desc="Inception", disable=not progress) as bar,
    ):
        for batch in iterate_batches(images, batch_size):
            result = extractor(torch.as_tensor(batch).to(device))
            for name, value in result._asdict().items():
                if value is not None:
                    outputs[name].append(value.float().cpu().numpy())
            bar.update(len(batch))
    arrays = {name: np.concatenate(parts) if parts else None for name, parts in outputs.items()}
    return FeatureSet(**arrays)


def feature_statistics(
    features: np.ndarray, chunk_rows: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``ddof=1``) in float64, two-pass, ``chunk_rows`` rows at a time."""
    if len(features) < 2:
        raise DitqError(f"statistics need at least 2 images, got {len(features)}")
    mu = features.mean(axis=0, dtype=np.float64)
    sigma = np.zeros((mu.size, mu.size))
    for start in range(0, len(features), chunk_rows):
        centred = features[start : start + chunk_rows].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (len(features) - 1)


def statistics_from_features(features: FeatureSet, meta: dict) -> InceptionStatistics:
    """Statistics of a feature set, keeping its pool3 features for Precision/Recall."""
    mu, sigma = feature_statistics(features.pool3)
    stats = InceptionStatistics(mu, sigma, pool3=features.pool3, meta=meta)
    if features.spatial is not None:
        stats.mu_s, stats.sigma_s = feature_statistics(features.spatial)
    return stats


def _meta(source: str | os.PathLike, extractor: InceptionFeatureExtractor, count: int) -> dict:
    return {
        "format": STATISTICS_FORMAT,
        "source": str(source),
        "num_images": count,
        "pool3_stored_as": "float16",
        "inception": extractor.report(),
    }


def _is_statistics_file(path: os.PathLike) -> bool:
    try:
        return all(key in npz_keys(path) for key in STATISTICS_KEYS)
    except DitqError:
        return False


STATISTICS_FILE = OutputKind("statistics npz", False, _is_statistics_file)


def save_statistics(
    stats: InceptionStatistics, path: str | os.PathLike, *, overwrite: bool = False
) -> None:
    """Write ``stats`` to ``path`` atomically; an existing statistics file is replaced only
    with ``overwrite`` (:func:`ditq.io.check_output`)."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "meta": np.array(json.dumps(stats.meta))}
    if stats.mu_s is not None:
        arrays.update(mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    if stats.pool3 is not None:
        arrays["pool3"] = stats.pool3.astype(np.float16)
    with (
        write_output(path, STATISTICS_FILE, overwrite=overwrite) as temporary,
        open(temporary, "wb") as out,
    ):
        np.savez(out, **arrays)


def load_statistics(path: str | os.PathLike) -> InceptionStatistics:
    """Read a statistics file written by :func:`save_statistics` or by ADM."""
    keys = npz_keys(path)
    if not all(key in keys for key in STATISTICS_KEYS):
        raise DitqError(f"{path} is not a statistics file: keys {keys}, expected mu and sigma")
    with np.load(path) as archive:

        def read(key: str) -> np.ndarray:
            return read_npz_array(archive, key, path)

        stats = InceptionStatistics(read("mu"), read("sigma"))
        if "mu_s" in keys and "sigma_s" in keys:
            stats.mu_s, stats.sigma_s = read("mu_s"), read("sigma_s")
        if "pool3" in keys:
            stats.pool3 = read("pool3").astype(np.float32)
        if "meta" in keys:
            stats.meta = json.loads(str(read("meta")))
    return stats


def _image_statistics(
    images: np.ndarray,
    source: str | os.PathLike,
    extractor: InceptionFeatureExtractor,
    batch_size: int,
    progress: bool,
) -> InceptionStatistics:
    features = extract_features(images, extractor, batch_size, progress)
    return statistics_from_features(features, _meta(source, extractor, len(images)))


def reference_statistics(
    path: str | os.PathLike,
    extractor: InceptionFeatureExtractor,
    batch_size: int = 50,
    progress: bool = True,
) -> InceptionStatistics:
    """Statistics of ``path``: computed when it holds images, read when it holds statistics."""
    if image_layout(npz_keys(path)) is None:
        return load_statistics(path)
    return _image_statistics(load_images(path), path, extractor, batch_size, progress)


def build_reference(
    images_path: str | os.PathLike,
    out_path: str | os.PathLike,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    limit: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> InceptionStatistics:
    """Compute the statistics of an image npz (first ``limit`` images) and cache them."""
    check_output(out_path, STATISTICS_FILE, overwrite=overwrite, inputs=[images_path])
    images = load_images(images_path, limit)
    extractor = load_inception(inception_weights, device)
    stats = _image_statistics(images, images_path, extractor, batch_size, progress)
    save_statistics(stats, out_path, overwrite=overwrite)
    return stats
