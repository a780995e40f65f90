"""Comparison grids: the first samples of every run for a shared setting, one labelled row
per run, same indices."""

from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image, ImageDraw

from ditq.eval.grid import make_grid
from ditq.eval.plots import BACKGROUND, LABEL_SIZE, _put_text, _text_size
from ditq.eval.report.runs import Run, pair_samples, read_first_images, setting_order

GRID_SAMPLES = 10
GRID_PAD = 2
GRID_TILE_PX = 64
"""Grid tiles are enlarged by an integer factor to at least this many pixels (8 px -> x8)."""
GRID_LABEL_MARGIN = 8


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


def run_grids(runs: list[Run], reference_run: Run | None, count: int) -> tuple[list, dict]:
    """For each setting with samples in several runs: the first ``count`` samples of each run
    (reference run first), the labels check, and the picture."""
    grids, images = [], {}
    settings = sorted({s for run in runs for s in run.samples}, key=setting_order)
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
