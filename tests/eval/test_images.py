"""Image npz loading: both layouts, limits, clear errors, batching."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditq.errors import DitqError
from ditq.eval.images import image_layout, iterate_batches, load_images


def test_jpeg_layout_decodes_like_pil(cifar_test_path: Path) -> None:
    images = load_images(cifar_test_path, limit=5)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    with np.load(cifar_test_path) as data:
        encoded = data["blob"][data["offsets"][4] : data["offsets"][5]].tobytes()
    np.testing.assert_array_equal(images[4], np.asarray(Image.open(io.BytesIO(encoded))))


def test_adm_layout_round_trip_and_limit(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 12, 3), dtype=np.uint8)
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=images, arr_1=np.arange(6))
    np.testing.assert_array_equal(load_images(path), images)
    np.testing.assert_array_equal(load_images(path, limit=4), images[:4])
    assert len(load_images(path, limit=100)) == 6


def test_layout_detection() -> None:
    assert image_layout(["blob", "offsets", "labels"]) == "jpeg"
    assert image_layout(["arr_0", "arr_1"]) == "adm"
    assert image_layout(["mu", "sigma"]) is None


def test_missing_and_foreign_files_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DitqError, match="not found"):
        load_images(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DitqError, match="not an .npz"):
        load_images(tmp_path / "text.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(DitqError, match="holds no images.*arr_0"):
        load_images(tmp_path / "stats.npz")


def test_bad_adm_arrays_and_empty_limit_raise(tmp_path: Path, cifar_test_path: Path) -> None:
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(DitqError, match="uint8"):
        load_images(tmp_path / "float.npz")
    with pytest.raises(DitqError, match="no images"):
        load_images(cifar_test_path, limit=0)


def test_iterate_batches_covers_all_images_in_order() -> None:
    images = np.arange(10)
    batches = list(iterate_batches(images, 4))
    assert [len(batch) for batch in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    with pytest.raises(ValueError):
        list(iterate_batches(images, 0))
