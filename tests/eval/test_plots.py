"""Pillow plots: files of the asked size, data actually drawn, legend colors, bad input."""

import math

import numpy as np
import pytest
from PIL import Image, ImageFont

from ditq.errors import DitqError
from ditq.eval import plots
from ditq.eval.plots import BACKGROUND, MISSING, PALETTE, VIRIDIS, bar_plot, heatmap, line_plot


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _count(pixels: np.ndarray, color) -> int:
    return int(np.all(pixels == np.array(color, dtype=np.uint8), axis=-1).sum())


def _drawn_fraction(pixels: np.ndarray) -> float:
    return float(np.any(pixels != np.array(BACKGROUND, dtype=np.uint8), axis=-1).mean())


def test_line_plot_draws_each_series_in_its_legend_color(tmp_path):
    path = tmp_path / "line.png"
    xs = list(range(20))
    line_plot(
        {"first": (xs, [math.sin(x / 3) for x in xs]), "second": (xs, [0.05 * x for x in xs])},
        "two series",
        "step",
        "value",
        path,
        size=(640, 400),
    )
    pixels = _pixels(path)
    assert pixels.shape == (400, 640, 3)
    assert 0.01 < _drawn_fraction(pixels) < 0.5
    # Lines (width 3), markers and the 14x14 legend swatch: far more than the swatch alone.
    for color in PALETTE[:2]:
        assert _count(pixels, color) > 2 * 14 * 14
    assert _count(pixels, PALETTE[2]) == 0


def test_line_plot_skips_non_finite_points_and_rejects_nothing_to_draw(tmp_path):
    line_plot(
        {"gappy": ([0, 1, 2, 3], [1.0, float("nan"), 2.0, 3.0])}, "t", "x", "y", tmp_path / "a.png"
    )
    assert _count(_pixels(tmp_path / "a.png"), PALETTE[0]) > 14 * 14
    with pytest.raises(DitqError, match="no finite points"):
        line_plot(
            {"empty": ([0, 1], [float("nan"), float("inf")])}, "t", "x", "y", tmp_path / "b.png"
        )
    assert not (tmp_path / "b.png").exists()


def test_colormap_ends_and_missing_values():
    colors = plots.colormap(np.array([0.0, 10.0, 20.0, np.nan, 99.0]), vmin=0.0, vmax=20.0)
    assert colors.dtype == np.uint8 and colors.shape == (5, 3)
    assert tuple(colors[0]) == VIRIDIS[0] and tuple(colors[2]) == VIRIDIS[-1]
    assert tuple(colors[1]) == VIRIDIS[len(VIRIDIS) // 2]  # 9 anchors: the middle one at 0.5
    assert tuple(colors[3]) == MISSING and tuple(colors[4]) == VIRIDIS[-1]  # clipped


def test_heatmap_cells_use_the_color_scale(tmp_path):
    path = tmp_path / "heat.png"
    matrix = np.array([[10.0, 20.0, 30.0], [15.0, np.nan, 25.0]])
    heatmap(matrix, ["layer a", "layer b"], ["0", "1", "2"], "heat", path, xlabel="step")
    pixels = _pixels(path)
    assert 300 < pixels.shape[1] < 2000 and 150 < pixels.shape[0] < 1500
    cell_area = 360 * 180 / 6  # the plot area is at least 360 x 180 pixels
    assert _count(pixels, VIRIDIS[0]) >= cell_area  # the minimum cell (plus color bar end)
    assert _count(pixels, VIRIDIS[-1]) >= cell_area
    assert _count(pixels, MISSING) >= cell_area  # the NaN cell


def test_heatmap_many_rows_and_labels_mismatch(tmp_path):
    rows = [f"blocks.{i}.mlp.fc2" for i in range(112)]
    matrix = np.arange(112 * 50, dtype=float).reshape(112, 50)
    heatmap(matrix, rows, [str(j) for j in range(50)], "big", tmp_path / "big.png", vmin=0, vmax=1)
    pixels = _pixels(tmp_path / "big.png")
    assert pixels.shape[0] < 1200 and pixels.shape[1] < 1700
    with pytest.raises(DitqError, match="column labels"):
        heatmap(matrix, rows, ["0"], "bad", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_bar_plot_bar_areas_follow_values(tmp_path):
    path = tmp_path / "bars.png"
    bar_plot(
        ["W8A8", "W4A8"],
        {"rtn": [1.0, 3.0], "smoothquant": [2.0, 6.0], "missing": [float("nan"), float("nan")]},
        "ΔFID by bits",
        "ΔFID",
        path,
        value_labels=False,
    )
    pixels = _pixels(path)
    assert pixels.shape == (560, 960, 3)
    swatch = 14 * 14
    rtn, smooth = (_count(pixels, color) - swatch for color in PALETTE[:2])
    assert rtn > 1000
    assert smooth / rtn == pytest.approx(2.0, rel=0.05)  # same widths, twice the heights
    assert _count(pixels, PALETTE[2]) == swatch  # all-NaN series: legend only, no bar


def test_bar_plot_rejects_series_of_the_wrong_length(tmp_path):
    with pytest.raises(DitqError, match="one value per group"):
        bar_plot(["a", "b"], {"s": [1.0]}, "t", "y", tmp_path / "x.png")


def test_plots_fall_back_to_bitmap_font(tmp_path, monkeypatch):
    """Without DejaVu and with Pillow < 10.1 (no size for the default font, which is then a
    bitmap font) plots still draw."""
    bitmap_font = ImageFont.load_default_imagefont()

    def no_system_font(*_args, **_kwargs):
        raise OSError("cannot open resource")

    def old_load_default(**kwargs):
        if kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap_font

    monkeypatch.setattr(ImageFont, "truetype", no_system_font)
    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    plots._font.cache_clear()
    try:
        line_plot({"s": ([0, 1, 2], [1.0, 2.0, 0.5])}, "t", "x", "y", tmp_path / "p.png")
        assert plots._font(14) is bitmap_font
    finally:
        plots._font.cache_clear()
    assert _count(_pixels(tmp_path / "p.png"), PALETTE[0]) > 14 * 14
