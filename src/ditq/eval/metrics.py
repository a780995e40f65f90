"""Sample-quality metrics and :func:`evaluate`, the whole evaluation of one sample set.

Definitions follow ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``) and
pytorch-fid, with these differences:

* Features come from :mod:`ditq.eval.inception` (pytorch-fid preprocessing; see there).
* Fréchet distance: the same quantity as pytorch-fid and ADM, in float64, but
  ``tr sqrt(sigma1 sigma2)`` is computed as ``sum sqrt(eig(S1 sigma2 S1))`` with
  ``S1 = sigma1^(1/2)`` from a symmetric eigendecomposition (an exact identity: the two
  products are similar matrices) instead of ``scipy.linalg.sqrtm`` of the non-symmetric
  product: no complex round-off to drop, no scipy dependency, several times faster.
  Eigenvalues below zero (round-off of PSD matrices) count as zero.
* Precision/Recall: ADM's ``ManifoldEstimator`` with k=3 (squared Euclidean distances, radius
  of a point = distance to its k-th nearest other point of the same set, "inside" when within
  any radius, ``<=``). ADM computes the distances in float16 with a float32 fallback; here
  they are float32 (torch, on the chosen device), in row blocks so that 50k x 50k fits memory.
* Inception Score: improved-GAN/ADM formula on unbiased logits. Splits: ``splits`` equal parts
  (improved-GAN, default 10), where ADM uses parts of 5000 samples (2 for 10k samples); the
  score depends on the part size, so compare IS only under equal settings.
* PSNR/SSIM against the FP model's samples on the same noise are not part of ADM. SSIM
  matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1)``: an 11-tap Gaussian
  (truncate 3.5), K1 = 0.01, K2 = 0.03, averaged over the region where the window fits
  (skimage's crop), then over channels.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditq.errors import DitqError
from ditq.eval.features import (
    FeatureSet,
    InceptionStatistics,
    extract_features,
    feature_statistics,
    reference_statistics,
)
from ditq.eval.images import load_images
from ditq.eval.inception import load_inception
from ditq.io import OutputKind, read_json_object, write_output

PR_NEIGHBOURHOOD = 3
INCEPTION_SCORE_SPLITS = 10
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0
DISTANCE_BLOCK_ELEMENTS = 1 << 26  # 256 MB of float32 per block of pairwise distances
IMAGE_CHUNK_ELEMENTS = 1 << 22  # float64 pixels per chunk in PSNR/SSIM


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = (np.atleast_1d(mu).astype(np.float64) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(sigma).astype(np.float64) for sigma in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DitqError(
            f"statistics of different dimensions: {mu1.shape}/{sigma1.shape} vs "
            f"{mu2.shape}/{sigma2.shape}"
        )
    trace_sqrt = _trace_sqrt_product(sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _logsumexp(x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    out = peak + np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrt(sigma1 sigma2)`` for covariance matrices, via ``S1 sigma2 S1`` (symmetric)."""
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (rows = samples)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _squared_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances, clamped at 0 like ADM's."""
    norms_rows = rows.square().sum(1, keepdim=True)
    norms_columns = columns.square().sum(1)
    return (norms_rows - 2 * rows @ columns.T + norms_columns).clamp_min_(0)


def _row_blocks(rows: torch.Tensor, columns: torch.Tensor) -> Iterator[torch.Tensor]:
    """Distances from blocks of ``rows`` to all ``columns``, a bounded block at a time."""
    block = max(1, DISTANCE_BLOCK_ELEMENTS // max(1, len(columns)))
    for start in range(0, len(rows), block):
        yield _squared_distances(rows[start : start + block], columns)


def _manifold_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set."""
    # index k of the sorted row, since the point itself is at distance 0
    return torch.cat([d.kthvalue(k + 1, dim=1).values for d in _row_blocks(features, features)])


def _fraction_inside(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``queries`` within the radius of at least one ``support`` point."""
    inside = [(d <= radii).any(dim=1) for d in _row_blocks(queries, support)]
    return torch.cat(inside).sum().item() / len(queries)


def precision_recall(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    k: int = PR_NEIGHBOURHOOD,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Improved Precision and Recall (Kynkäänniemi et al. 2019) as in ADM's evaluator.

    Precision: fraction of fake samples inside the real manifold; recall: fraction of real
    samples inside the fake manifold.
    """
    real = torch.as_tensor(real_features, dtype=torch.float32, device=device)
    fake = torch.as_tensor(fake_features, dtype=torch.float32, device=device)
    if min(len(real), len(fake)) <= k:
        raise DitqError(f"precision/recall with k={k} need more than {k} samples in each set")
    precision = _fraction_inside(fake, real, _manifold_radii(real, k))
    recall = _fraction_inside(real, fake, _manifold_radii(fake, k))
    return precision, recall


def inception_score(
    logits: np.ndarray, splits: int = INCEPTION_SCORE_SPLITS
) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` parts of exp(E[KL(p(y|x) || p(y))])."""
    logits = np.asarray(logits, dtype=np.float64)
    if not 1 <= splits <= len(logits):
        raise DitqError(f"inception score: {splits} splits for {len(logits)} samples")
    log_probs = logits - _logsumexp(logits, axis=1, keepdims=True)
    scores = []
    for i in range(splits):
        part = log_probs[i * len(logits) // splits : (i + 1) * len(logits) // splits]
        log_marginal = _logsumexp(part, axis=0) - math.log(len(part))
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _image_pair_chunks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Matching float64 chunks of two equally shaped N x H x W x C image sets."""
    if a.shape != b.shape or a.ndim != 4:
        raise DitqError(f"image sets must both be N x H x W x C, got {a.shape} and {b.shape}")
    size = max(1, IMAGE_CHUNK_ELEMENTS // max(1, a[0].size))
    for start in range(0, len(a), size):
        yield a[start : start + size].astype(np.float64), b[start : start + size].astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB per image pair (uint8 NHWC, data range 255); inf for identical images."""
    mse = [np.square(x - y).reshape(len(x), -1).mean(axis=1) for x, y in _image_pair_chunks(a, b)]
    with np.errstate(divide="ignore"):
        return 10 * np.log10(DATA_RANGE**2 / np.concatenate(mse))


def _gaussian_window() -> torch.Tensor:
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    window = torch.exp(-0.5 * (taps / SSIM_SIGMA) ** 2)
    return window / window.sum()


def _ssim_chunk(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    vertical = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    horizontal = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # "valid" filtering = skimage's result cropped by the window radius
        return F.conv2d(F.conv2d(t, vertical, groups=channels), horizontal, groups=channels)

    mean_x, mean_y = blur(x), blur(y)
    var_x = blur(x * x) - mean_x**2
    var_y = blur(y * y) - mean_y**2
    cov_xy = blur(x * y) - mean_x * mean_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).mean(dim=(1, 2, 3))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM per image pair (uint8 NHWC, data range 255), skimage's Gaussian variant."""
    window = _gaussian_window()
    if min(a.shape[1:3]) < len(window):
        raise DitqError(f"SSIM needs images of at least {len(window)} px, got {a.shape[1:3]}")
    scores = []
    for x, y in _image_pair_chunks(a, b):
        nchw = [torch.from_numpy(images).permute(0, 3, 1, 2) for images in (x, y)]
        scores.append(_ssim_chunk(*nchw, window).numpy())
    return np.concatenate(scores)


def distance_to_reference(samples: np.ndarray, fp_samples: np.ndarray) -> dict:
    """Mean/std PSNR and SSIM of ``samples`` against the FP model's samples on the same noise.

    PSNR statistics leave out identical pairs (infinite PSNR), counted in ``identical_images``;
    they are None when every pair is identical.
    """
    psnr_values, ssim_values = psnr(samples, fp_samples), ssim(samples, fp_samples)
    finite = psnr_values[np.isfinite(psnr_values)]
    return {
        "psnr": float(finite.mean()) if finite.size else None,
        "psnr_std": float(finite.std()) if finite.size else None,
        "ssim": float(ssim_values.mean()),
        "ssim_std": float(ssim_values.std()),
        "identical_images": int(len(psnr_values) - finite.size),
    }


def _reference_report(path: str | os.PathLike, stats: InceptionStatistics) -> dict:
    count = stats.meta.get("num_images", None if stats.pool3 is None else len(stats.pool3))
    unknown = {"weights": "unknown (statistics without ditq metadata)", "weights_sha256": None}
    return {
        "path": str(path),
        "num_images": count,
        "inception": stats.meta.get("inception", unknown),
    }


def _reference_metrics(
    features: FeatureSet, reference: InceptionStatistics, device: str | torch.device
) -> tuple[dict, dict]:
    """FID, sFID, Precision and Recall of ``features`` against ``reference``."""
    mu, sigma = feature_statistics(features.pool3)
    metrics: dict = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    skipped: dict = {}
    if features.spatial is None:
        skipped["sfid"] = "the Inception weights give pool3 only"
    elif reference.mu_s is None:
        skipped["sfid"] = "the reference statistics hold no spatial statistics (mu_s, sigma_s)"
    else:
        mu_s, sigma_s = feature_statistics(features.spatial)
        metrics["sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
    if reference.pool3 is None:
        skipped["precision_recall"] = "the reference statistics hold no pool3 features"
    else:
        metrics["precision"], metrics["recall"] = precision_recall(
            reference.pool3, features.pool3, device=device
        )
    return metrics, skipped


def evaluate(
    samples_path: str | os.PathLike,
    ref_path: str | os.PathLike | None = None,
    vs_path: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    progress: bool = True,
) -> dict:
    """Every metric available for a sample npz, as a JSON-able dict.

    ``ref_path`` (an image npz or a statistics npz) enables FID, sFID and Precision/Recall;
    weights with a classifier enable the Inception Score; ``vs_path`` (the FP model's samples
    on the same noise) enables PSNR/SSIM. ``skipped`` says why a metric is missing.
    """
    samples = load_images(samples_path)
    result: dict = {
        "samples": str(samples_path),
        "num_samples": len(samples),
        "metrics": {},
        "skipped": {},
        "warnings": [],
    }
    metrics, skipped = result["metrics"], result["skipped"]
    try:
        extractor = load_inception(inception_weights, device)
    except DitqError as error:
        if ref_path is not None:
            raise
        extractor = None
        skipped["inception_score"] = f"no Inception weights: {error}"
    if extractor is not None:
        result["inception"] = extractor.report()
        features = None
        if ref_path is not None or "logits" not in extractor.unavailable:
            features = extract_features(samples, extractor, batch_size, progress)
        if ref_path is not None:
            reference = reference_statistics(ref_path, extractor, batch_size, progress)
            result["reference"] = _reference_report(ref_path, reference)
            reference_inception = result["reference"]["inception"]
            if reference_inception["weights_sha256"] != extractor.weights_sha256:
                result["warnings"].append(
                    "the reference statistics come from other Inception weights "
                    f"({reference_inception['weights']}); FID mixes two feature extractors"
                )
            reference_metrics, reference_skipped = _reference_metrics(features, reference, device)
            metrics.update(reference_metrics)
            skipped.update(reference_skipped)
        if features is not None and features.logits is not None:
            splits = min(INCEPTION_SCORE_SPLITS, len(samples))
            metrics["inception_score"], metrics["inception_score_std"] = inception_score(
                features.logits, splits
            )
            result["inception_score_splits"] = splits
        else:
            skipped["inception_score"] = extractor.unavailable["logits"]
    if ref_path is None:
        for name in ("fid", "sfid", "precision_recall"):
            skipped[name] = "no reference given (ref_path)"
    if vs_path is None:
        skipped["psnr_ssim"] = "no FP samples given (vs_path)"
    else:
        fp_samples = load_images(vs_path)
        if fp_samples.shape[1:] != samples.shape[1:] or len(fp_samples) > len(samples):
            raise DitqError(
                f"{vs_path} holds {fp_samples.shape} images, {samples_path} {samples.shape}: "
                "PSNR/SSIM need the FP samples of the same seeds and labels (at most as many)"
            )
        compared = len(fp_samples)
        if compared < len(samples):
            result["warnings"].append(
                f"PSNR/SSIM vs FP on the first {compared} of {len(samples)} samples"
            )
        metrics.update(distance_to_reference(samples[:compared], fp_samples))
        result["vs"] = str(vs_path)
        result["vs_num_samples"] = compared
    return result


def _is_evaluation_file(path: Path) -> bool:
    result = read_json_object(path)
    return result is not None and isinstance(result.get("metrics"), dict)


EVALUATION_FILE = OutputKind("ditq eval result (JSON)", False, _is_evaluation_file)


def save_evaluation(result: dict, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write :func:`evaluate`'s result as JSON, atomically; an existing result is replaced
    only with ``overwrite`` (:func:`ditq.io.check_output`)."""
    with write_output(path, EVALUATION_FILE, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")


def format_table(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s result."""
    metrics = result["metrics"]
    rows = [("samples", str(result["num_samples"]))]
    if "reference" in result:
        reference = result["reference"]
        rows.append(("reference", f"{reference['path']} ({reference['num_images']} images)"))
    for key, label, spec in (
        ("fid", "FID", ".4f"),
        ("sfid", "sFID", ".4f"),
        ("precision", "Precision", ".4f"),
        ("recall", "Recall", ".4f"),
        ("inception_score", "IS", ".2f"),
        ("psnr", "PSNR vs FP (dB)", ".2f"),
        ("ssim", "SSIM vs FP", ".4f"),
    ):
        if metrics.get(key) is not None:
            value = format(metrics[key], spec)
            if metrics.get(f"{key}_std") is not None:
                value += f" ± {metrics[f'{key}_std']:{spec}}"
            rows.append((label, value))
    if "identical_images" in metrics:
        rows.append(("identical to FP", str(metrics["identical_images"])))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines += [f"skipped {name}: {reason}" for name, reason in result["skipped"].items()]
    lines += [f"warning: {text}" for text in result["warnings"]]
    return "\n".join(lines)
