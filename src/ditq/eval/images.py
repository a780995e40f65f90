"""Image sets stored as ``.npz``: loading and batching.

Two layouts are read, both returned as uint8 NHWC RGB arrays:

* ``jpeg``: ``blob`` (uint8, all encoded files back to back), ``offsets`` (int64, N + 1) and
  optionally ``labels``, as in ``shared/data``; image i is ``blob[offsets[i]:offsets[i + 1]]``
  decoded with PIL.
* ``adm``: ``arr_0`` (uint8, N x H x W x 3), the sample and reference-batch layout of ADM's
  evaluator (guided-diffusion), optionally with ``arr_1`` labels.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ditq.errors import DitqError

JPEG_KEYS = ("blob", "offsets")
ADM_KEYS = ("arr_0",)


def image_layout(keys: Sequence[str]) -> str | None:
    """Name of the image layout (``"jpeg"`` or ``"adm"``) with these npz keys, else None."""
    if all(key in keys for key in JPEG_KEYS):
        return "jpeg"
    if all(key in keys for key in ADM_KEYS):
        return "adm"
    return None


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Array names in an ``.npz`` file, with a clear error for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise DitqError(f"file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise DitqError(f"{path} is not an .npz archive (a .npy or a truncated file?)")
    try:
        with np.load(path) as archive:
            return list(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DitqError(f"{path} is not a readable .npz archive: {err}") from err


def read_npz_array(archive: np.lib.npyio.NpzFile, key: str, path: str | os.PathLike) -> np.ndarray:
    """``archive[key]`` with one clear error for arrays numpy cannot read safely (Python
    objects need pickle, which is never enabled) or truncated members."""
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = "it holds Python objects" if "Object arrays" in str(err) else str(err)
        raise DitqError(
            f"{path}: cannot read the array {key!r} ({reason}); it must be a plain numeric "
            "array, as ditq sample / np.savez of a uint8 array write"
        ) from err


def _decode_jpeg_blob(blob: np.ndarray, offsets: np.ndarray, count: int, path: Path) -> np.ndarray:
    images = []
    for i in range(count):
        encoded = blob[offsets[i] : offsets[i + 1]].tobytes()
        images.append(np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")))
    if len({image.shape for image in images}) > 1:
        raise DitqError(f"{path}: images of different sizes cannot form one array")
    return np.stack(images)


def _image_count(available: int, limit: int | None, path: Path) -> int:
    count = available if limit is None else min(available, limit)
    if count < 1:
        raise DitqError(f"{path}: no images to load ({available} stored, limit={limit})")
    return count


def load_images(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Load the first ``limit`` (default all) images of an npz as uint8 NHWC RGB."""
    path = Path(path)
    keys = npz_keys(path)
    layout = image_layout(keys)
    if layout is None:
        raise DitqError(
            f"{path} holds no images: keys {keys}; expected {list(JPEG_KEYS)} (JPEG bytes) "
            f"or {list(ADM_KEYS)} (uint8 NHWC, ADM layout)"
        )
    with np.load(path) as archive:
        if layout == "jpeg":
            offsets = read_npz_array(archive, "offsets", path)
            count = _image_count(len(offsets) - 1, limit, path)
            return _decode_jpeg_blob(read_npz_array(archive, "blob", path), offsets, count, path)
        images = read_npz_array(archive, "arr_0", path)
    images = images[: _image_count(len(images), limit, path)]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DitqError(
            f"{path}: arr_0 must be uint8 N x H x W x 3, got {images.dtype} {images.shape}"
        )
    return images


def iterate_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of at most ``batch_size`` images (views, no copies)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]
