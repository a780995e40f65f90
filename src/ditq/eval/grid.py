"""Image grids (PNG) of uint8 NHWC samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ditq.io import OutputKind, write_output

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


GRID_FILE = OutputKind("PNG image", False, _is_png)


def make_grid(
    images: np.ndarray, ncols: int | None = None, pad: int = 2, scale: int = 1
) -> Image.Image:
    """Tile uint8 NHWC images into one picture, ``ncols`` wide (default about square)."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = image
    picture = Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def save_grid(
    path: str | Path,
    images: np.ndarray,
    ncols: int | None = None,
    scale: int | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write a PNG grid; small images (CIFAR-sized) are enlarged so that a person can see them.
    An existing PNG is replaced only with ``overwrite`` (:func:`ditq.io.check_output`)."""
    scale = scale if scale is not None else max(1, 128 // images.shape[1])
    with write_output(path, GRID_FILE, overwrite=overwrite) as tmp:
        make_grid(images, ncols=ncols, scale=scale).save(tmp, format="PNG")
