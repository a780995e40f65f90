"""Metrics against closed forms and brute-force references; the statistics cache; evaluate()."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.stats import ortho_group

from ditq.errors import DitqError
from ditq.eval import metrics
from ditq.eval.features import (
    FeatureSet,
    InceptionStatistics,
    build_reference,
    feature_statistics,
    load_statistics,
    reference_statistics,
    save_statistics,
)
from ditq.eval.images import load_images
from ditq.eval.inception import load_inception
from ditq.eval.metrics import (
    distance_to_reference,
    evaluate,
    fid_from_features,
    format_table,
    frechet_distance,
    inception_score,
    precision_recall,
    psnr,
    ssim,
)

SHARED_WEIGHTS = (
    Path(__file__).resolve().parents[3] / "shared" / "fid" / "pt_inception-2015-12-05-fp16.pth"
)
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def weights_path() -> Path:
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"FID Inception weights not found at {SHARED_WEIGHTS}")
    return SHARED_WEIGHTS


# --- Fréchet distance ----------------------------------------------------------------------


def test_frechet_distance_diagonal_closed_form() -> None:
    mu1, mu2 = RNG.normal(size=6), RNG.normal(size=6)
    s1, s2 = RNG.uniform(0.1, 3, 6), RNG.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)


def test_frechet_distance_commuting_full_covariances() -> None:
    basis = ortho_group.rvs(8, random_state=1)
    a, b = RNG.uniform(0.1, 2, 8), RNG.uniform(0.1, 2, 8)
    sigma1, sigma2 = basis @ np.diag(a) @ basis.T, basis @ np.diag(b) @ basis.T
    mu1, mu2 = RNG.normal(size=8), RNG.normal(size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_equals_scipy_sqrtm_on_general_covariances() -> None:
    # Non-commuting, rank-deficient covariances as from few samples in many dimensions.
    from scipy.linalg import sqrtm

    x, y = RNG.normal(size=(30, 50)), RNG.normal(size=(40, 50)) * 1.5 + 0.2
    sigma1, sigma2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu1, mu2 = x.mean(0), y.mean(0)
    root = sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_mismatched_dimensions() -> None:
    with pytest.raises(DitqError, match="dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_of_a_feature_set_with_itself_is_zero() -> None:
    features = RNG.normal(size=(200, 16)) @ RNG.normal(size=(16, 16))
    assert abs(fid_from_features(features, features)) < 1e-8
    assert fid_from_features(features, features + 1.0) == pytest.approx(16.0)


def test_feature_statistics_match_numpy_in_chunks() -> None:
    features = RNG.normal(3.0, 2.0, size=(50, 5)).astype(np.float32)
    mu, sigma = feature_statistics(features, chunk_rows=7)
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10)


# --- Precision / Recall --------------------------------------------------------------------


def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple:
    """Kynkäänniemi et al. with explicit float64 loops."""

    def radii(points: np.ndarray) -> list[float]:
        out = []
        for p in points:
            distances = sorted(float(np.sum((p - q) ** 2)) for q in points)
            out.append(distances[k])  # distances[0] is the point itself
        return out

    def fraction_inside(queries: np.ndarray, support: np.ndarray, support_radii: list) -> float:
        inside = [
            any(np.sum((q - s) ** 2) <= r for s, r in zip(support, support_radii, strict=True))
            for q in queries
        ]
        return sum(inside) / len(queries)

    real, fake = real.astype(np.float64), fake.astype(np.float64)
    return fraction_inside(fake, real, radii(real)), fraction_inside(real, fake, radii(fake))


def test_precision_recall_of_identical_sets_is_one() -> None:
    features = RNG.normal(size=(40, 8))
    assert precision_recall(features, features) == (1.0, 1.0)


def test_precision_recall_of_far_apart_clusters_is_zero() -> None:
    real = RNG.normal(size=(30, 8))
    assert precision_recall(real, real[:25] + 100.0) == (0.0, 0.0)


def test_precision_recall_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "DISTANCE_BLOCK_ELEMENTS", 100)  # many small row blocks
    real = RNG.normal(size=(45, 6)).astype(np.float32)
    fake = (RNG.normal(size=(35, 6)) * 1.3 + 0.4).astype(np.float32)
    for k in (1, 3, 5):
        expected = _brute_force_precision_recall(real, fake, k)
        assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_needs_more_than_k_samples() -> None:
    with pytest.raises(DitqError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# --- Inception Score -----------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one() -> None:
    mean, std = inception_score(np.zeros((20, 1008)), splits=2)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_class_count() -> None:
    classes = 5
    logits = 60.0 * np.eye(classes)[np.tile(np.arange(classes), 4)]  # 20 samples
    assert inception_score(logits, splits=1)[0] == pytest.approx(classes, rel=1e-9)
    mean, std = inception_score(logits, splits=4)  # every split holds each class once
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(DitqError, match="splits"):
        inception_score(logits, splits=21)


# --- PSNR / SSIM ---------------------------------------------------------------------------


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Straight float64 transcription of skimage's Gaussian SSIM for one H x W x C image."""
    radius = int(3.5 * 1.5 + 0.5)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for channel in range(a.shape[-1]):
        x, y = a[..., channel].astype(np.float64), b[..., channel].astype(np.float64)

        def blur(image: np.ndarray) -> np.ndarray:
            return gaussian_filter(image, sigma=1.5, truncate=3.5, mode="reflect")

        ux, uy = blur(x), blur(y)
        vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        per_channel.append(s[radius:-radius, radius:-radius].mean())
    return float(np.mean(per_channel))


def test_psnr_closed_form_for_constant_offset() -> None:
    a = RNG.integers(0, 200, (3, 16, 16, 3), dtype=np.uint8)
    for offset in (1, 5, 40):
        expected = 20 * math.log10(255 / offset)
        np.testing.assert_allclose(psnr(a, a + np.uint8(offset)), expected, rtol=1e-12)
    assert np.isinf(psnr(a, a)).all()


def test_ssim_of_an_image_with_itself_is_one() -> None:
    a = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(ssim(a, a), 1.0, rtol=1e-12)


def test_ssim_matches_reference_implementation() -> None:
    a = RNG.integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    noise = RNG.normal(0, 25, a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    expected = [_reference_ssim(x, y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(ssim(a, b), expected, rtol=1e-10)
    with pytest.raises(DitqError, match="at least 11 px"):
        ssim(a[:, :8, :8], b[:, :8, :8])


def test_distance_to_reference_leaves_identical_pairs_out_of_psnr() -> None:
    a = RNG.integers(0, 200, (4, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[:2] += 10
    result = distance_to_reference(b, a)
    assert result["identical_images"] == 2
    assert result["psnr"] == pytest.approx(20 * math.log10(25.5)) and result["psnr_std"] == 0
    assert result["ssim"] < 1
    with pytest.raises(DitqError, match="N x H x W x C"):
        distance_to_reference(a, a[:3])


# --- statistics cache ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_40(
    weights_path: Path, cifar_test_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, InceptionStatistics]:
    out = tmp_path_factory.mktemp("reference") / "cifar_test_40.npz"
    stats = build_reference(cifar_test_path, out, weights_path, limit=40, progress=False)
    return out, stats


@pytest.mark.slow
def test_reference_cache_round_trip(reference_40: tuple[Path, InceptionStatistics]) -> None:
    path, built = reference_40
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    loaded = load_statistics(path)
    for name in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(built, name))
    assert loaded.mu.dtype == np.float64 and loaded.sigma.shape == (2048, 2048)
    assert loaded.mu_s.shape == (2023,)
    np.testing.assert_allclose(built.mu, built.pool3.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_array_equal(loaded.pool3, built.pool3.astype(np.float16))
    assert loaded.meta["num_images"] == 40
    assert loaded.meta["inception"]["weights_sha256"]


def test_failed_statistics_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = InceptionStatistics(np.zeros(2), np.eye(2), meta={"num_images": 3})
    save_statistics(stats, tmp_path / "stats.npz")
    assert load_statistics(tmp_path / "stats.npz").meta == {"num_images": 3}

    def fail(*args, **kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError):
        save_statistics(stats, tmp_path / "other.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


def test_reference_statistics_reads_statistics_and_computes_images(
    weights_path: Path, tmp_path: Path
) -> None:
    images = RNG.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", arr_0=images)
    extractor = load_inception(weights_path)
    computed = reference_statistics(tmp_path / "images.npz", extractor, progress=False)
    assert computed.pool3.shape == (4, 2048) and computed.meta["num_images"] == 4
    assert computed.mu_s.shape == (2023,)
    save_statistics(computed, tmp_path / "stats.npz")
    loaded = reference_statistics(tmp_path / "stats.npz", extractor)
    np.testing.assert_array_equal(loaded.sigma, computed.sigma)
    np.savez(tmp_path / "neither.npz", x=np.zeros(2))
    with pytest.raises(DitqError, match="not a statistics file"):
        reference_statistics(tmp_path / "neither.npz", extractor)


# --- evaluate ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 40 samples, 2048-d covariance
def test_evaluate_images_against_their_own_statistics(
    reference_40: tuple[Path, InceptionStatistics],
    weights_path: Path,
    cifar_test_path: Path,
    tmp_path: Path,
) -> None:
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=load_images(cifar_test_path, limit=40))
    result = evaluate(samples, reference_40[0], samples, weights_path, progress=False)
    json.dumps(result, allow_nan=False)
    values = result["metrics"]
    assert result["num_samples"] == 40 and result["reference"]["num_images"] == 40
    assert abs(values["fid"]) < 1e-2 and abs(values["sfid"]) < 1e-2
    assert values["precision"] == 1.0 and values["recall"] == 1.0
    assert values["ssim"] == pytest.approx(1.0) and values["identical_images"] == 40
    assert values["psnr"] is None
    assert set(result["skipped"]) == {"inception_score"}
    assert "zeroed" in result["skipped"]["inception_score"]
    assert result["warnings"] == []
    assert "FID" in format_table(result) and "Precision" in format_table(result)


def test_evaluate_without_reference_skips_with_reasons(weights_path: Path, tmp_path: Path) -> None:
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=RNG.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    result = evaluate(samples, inception_weights=weights_path, progress=False)
    assert result["metrics"] == {}
    skipped = {"fid", "sfid", "precision_recall", "inception_score", "psnr_ssim"}
    assert set(result["skipped"]) == skipped
    assert "skipped fid" in format_table(result)
    other = tmp_path / "other.npz"
    np.savez(other, arr_0=np.zeros((5, 16, 16, 3), np.uint8))
    with pytest.raises(DitqError, match="same seeds"):
        evaluate(samples, vs_path=other, inception_weights=weights_path, progress=False)


def test_evaluate_compares_with_fewer_fp_samples_on_the_first_ones(
    weights_path: Path, tmp_path: Path
) -> None:
    images = RNG.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    fp = images[:2].copy()
    fp[1] = 255 - fp[1]
    samples, fp_path = tmp_path / "samples.npz", tmp_path / "fp.npz"
    np.savez(samples, arr_0=images)
    np.savez(fp_path, arr_0=fp)
    result = evaluate(samples, vs_path=fp_path, inception_weights=weights_path, progress=False)
    expected = distance_to_reference(images[:2], fp)
    assert result["vs_num_samples"] == 2
    assert result["metrics"]["ssim"] == pytest.approx(expected["ssim"])
    assert result["metrics"]["identical_images"] == 1
    assert "first 2 of 4" in result["warnings"][0]


def test_reference_metrics_with_adm_style_statistics() -> None:
    features = FeatureSet(RNG.normal(size=(30, 4)), RNG.normal(size=(30, 3)), None)
    mu, sigma = feature_statistics(features.pool3)
    reference = InceptionStatistics(mu, sigma)  # mu/sigma only: no mu_s, no pool3
    values, skipped = metrics._reference_metrics(features, reference, "cpu")
    assert values == {"fid": pytest.approx(0.0, abs=1e-9)}
    assert set(skipped) == {"sfid", "precision_recall"}
