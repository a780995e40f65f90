"""Report figures drawn with Pillow only: line plots, heatmaps and grouped bar charts.

Every function renders one PNG and writes it atomically (:func:`ditq.io.atomic_path`).
Numeric axes get 1-2-5 ticks with light grid lines, series take the Tableau-10 colors in
order (:data:`PALETTE`, also in the legend) and heatmaps a viridis-like color map with a
color bar. Non-finite values are left out: a gap in a line, no bar, a gray heatmap cell.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ditq.errors import DitqError
from ditq.io import atomic_path

Color = tuple[int, int, int]

BACKGROUND: Color = (255, 255, 255)
INK: Color = (33, 33, 33)
AXIS: Color = (96, 96, 96)
GRID: Color = (228, 228, 228)
MISSING: Color = (200, 200, 200)
PALETTE: tuple[Color, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
"""Series colors, in order (Tableau 10)."""
VIRIDIS: tuple[Color, ...] = (
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
)
"""Evenly spaced anchors of the heatmap color map, low to high."""

PREFERRED_FONT = "DejaVuSans.ttf"
TITLE_SIZE, LABEL_SIZE, TICK_SIZE = 18, 14, 12
PAD = 16
SWATCH = 14
LEGEND_GAP = 22
MAX_TICKS = 7


@cache
def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans at ``size`` pixels where the system has it (it covers Greek, e.g. ΔFID),
    else Pillow's bundled font (Pillow >= 10.1), else Pillow's fixed-size bitmap font."""
    try:
        return ImageFont.truetype(PREFERRED_FONT, size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = _font(size).getbbox(text)
    return right - left, bottom - top


def _put_text(
    draw: ImageDraw.ImageDraw,
    x: float,
    y: float,
    text: str,
    size: int,
    h_align: str = "left",
    v_align: str = "top",
    fill: Color = INK,
) -> None:
    """Draw ``text`` with its ink box aligned to (x, y) (any font, no anchor support needed)."""
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    dx = {"left": 0, "center": (right - left) / 2, "right": right - left}[h_align]
    dy = {"top": 0, "middle": (bottom - top) / 2, "bottom": bottom - top}[v_align]
    draw.text((round(x - dx - left), round(y - dy - top)), text, font=font, fill=fill)


def _put_vertical_text(image: Image.Image, x: float, y: float, text: str, size: int) -> None:
    """Draw ``text`` rotated by 90° (reading upwards), centred on (x, y)."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    tile = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(tile).text((1 - left, 1 - top), text, font=font, fill=255)
    tile = tile.rotate(90, expand=True)
    image.paste(INK, (round(x - tile.width / 2), round(y - tile.height / 2)), mask=tile)


def _nice_ticks(low: float, high: float, max_ticks: int = MAX_TICKS) -> list[float]:
    """At most ``max_ticks`` round values (steps 1, 2, 2.5 or 5 × 10^k) whose first and last
    enclose [low, high]; these ends become the axis limits."""
    if high - low < 1e-12 * max(1.0, abs(low), abs(high)):
        half = max(abs(low) * 0.1, 1.0)
        low, high = low - half, high + half
    raw_step = (high - low) / (max_ticks - 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    for mantissa in (1, 2, 2.5, 5, 10):
        step = mantissa * magnitude
        first, last = math.floor(low / step), math.ceil(high / step)
        if last - first + 1 <= max_ticks:
            break
    return [round(i * step, 12) for i in range(first, last + 1)]


def _tick_label(value: float) -> str:
    return f"{value:.6g}"


def _legend_rows(labels: Sequence[str], max_width: int) -> list[list[int]]:
    """Legend entry indices wrapped into rows of at most ``max_width`` pixels."""
    rows: list[list[int]] = [[]]
    used = 0
    for i, label in enumerate(labels):
        width = _legend_entry_width(label)
        if rows[-1] and used + width > max_width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += width
    return rows


def _legend_entry_width(label: str) -> int:
    return SWATCH + 6 + _text_size(label, LABEL_SIZE)[0] + LEGEND_GAP


def _line_height(size: int) -> int:
    return _text_size("Ag", size)[1]


@dataclass(frozen=True)
class _Layout:
    """Pixel margins around the plot area and what the frame draws in them."""

    width: int
    height: int
    left: int
    top: int
    right: int
    bottom: int
    legend_rows: list[list[int]]

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.width - self.right, self.height - self.bottom


def _layout(
    width: int,
    height: int,
    title: str,
    xlabel: str,
    ylabel: str,
    legend: Sequence[str],
    left_text_width: int,
    bottom_text_height: int,
    right_extra: int = 0,
) -> _Layout:
    """Margins for a title, a wrapped legend under it, y tick labels ``left_text_width`` wide
    and x tick labels ``bottom_text_height`` high, axis labels, and ``right_extra`` pixels
    (a color bar) right of the plot area."""
    rows = _legend_rows(legend, width - 2 * PAD) if legend else []
    top = PAD + (_line_height(TITLE_SIZE) + 14 if title else 0)
    top += len(rows) * (max(SWATCH, _line_height(LABEL_SIZE)) + 8) + 8
    bottom = PAD + bottom_text_height + 8 + (_line_height(LABEL_SIZE) + 10 if xlabel else 0)
    left = PAD + left_text_width + 8 + (_line_height(LABEL_SIZE) + 12 if ylabel else 0)
    right = PAD + right_extra + 12
    if width - left - right < 40 or height - top - bottom < 40:
        raise DitqError(
            f"a {width}x{height} figure leaves no room to plot in; make it larger (size=...)"
        )
    return _Layout(width, height, left, top, right, bottom, rows)


def _draw_frame(
    image: Image.Image,
    layout: _Layout,
    title: str,
    xlabel: str,
    ylabel: str,
    legend: Sequence[str],
) -> ImageDraw.ImageDraw:
    """Title, legend rows (centred), x label under and y label left of the plot area."""
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = layout.box
    y = PAD
    if title:
        _put_text(draw, layout.width / 2, y, title, TITLE_SIZE, "center")
        y += _line_height(TITLE_SIZE) + 14
    row_height = max(SWATCH, _line_height(LABEL_SIZE))
    for row in layout.legend_rows:
        x = (layout.width - sum(_legend_entry_width(legend[i]) for i in row) + LEGEND_GAP) / 2
        for i in row:
            color = PALETTE[i % len(PALETTE)]
            swatch_top = y + (row_height - SWATCH) / 2
            draw.rectangle([x, swatch_top, x + SWATCH - 1, swatch_top + SWATCH - 1], fill=color)
            _put_text(
                draw, x + SWATCH + 6, y + row_height / 2, legend[i], LABEL_SIZE, "left", "middle"
            )
            x += _legend_entry_width(legend[i])
        y += row_height + 8
    if xlabel:
        _put_text(
            draw, (left + right) / 2, layout.height - PAD, xlabel, LABEL_SIZE, "center", "bottom"
        )
    if ylabel:
        _put_vertical_text(
            image, PAD + _line_height(LABEL_SIZE) / 2, (top + bottom) / 2, ylabel, LABEL_SIZE
        )
    return draw


def _draw_y_axis(draw: ImageDraw.ImageDraw, box: tuple, ticks: list[float]) -> None:
    """Horizontal grid lines and labels at ``ticks`` (first tick at the bottom edge)."""
    left, top, right, bottom = box
    for tick in ticks:
        y = _scale(tick, ticks[0], ticks[-1], bottom, top)
        draw.line([(left, y), (right, y)], fill=GRID)
        _put_text(draw, left - 8, y, _tick_label(tick), TICK_SIZE, "right", "middle")


def _axes_frame(
    size: tuple[int, int],
    title: str,
    xlabel: str,
    ylabel: str,
    legend: list[str],
    y_ticks: list[float],
    x_label_size: int,
) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple]:
    """A blank plot with title, axis labels, legend and the y axis drawn; returns the image,
    its drawing context and the plot box (left, top, right, bottom).

    ``x_label_size`` is the font size of the x-axis labels (tick numbers, or group names)."""
    layout = _layout(
        *size,
        title,
        xlabel,
        ylabel,
        legend,
        _max_label_width([_tick_label(t) for t in y_ticks], TICK_SIZE),
        _line_height(x_label_size),
    )
    image = Image.new("RGB", size, BACKGROUND)
    draw = _draw_frame(image, layout, title, xlabel, ylabel, legend)
    _draw_y_axis(draw, layout.box, y_ticks)
    return image, draw, layout.box


def _draw_box(draw: ImageDraw.ImageDraw, box: tuple) -> None:
    left, top, right, bottom = box
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS, width=2)


def _scale(value: float, low: float, high: float, start: float, end: float) -> float:
    return start + (value - low) / (high - low) * (end - start)


def _finite_values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def _save(image: Image.Image, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _max_label_width(labels: Sequence[str], size: int) -> int:
    return max((_text_size(label, size)[0] for label in labels), default=0)


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: str | Path,
    size: tuple[int, int] = (960, 560),
    markers: bool | None = None,
) -> None:
    """One line per ``{label: (xs, ys)}`` entry, with a legend; ``markers`` (dots on the
    points) default to on for series of at most 60 points."""
    points = {
        label: [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
        for label, (xs, ys) in series.items()
    }
    finite = [(x, y) for pts in points.values() for x, y in pts if math.isfinite(x + y)]
    if not finite:
        raise DitqError(f"line plot {title!r} has no finite points to draw")
    x_ticks = _nice_ticks(min(x for x, _ in finite), max(x for x, _ in finite))
    y_ticks = _nice_ticks(min(y for _, y in finite), max(y for _, y in finite))
    labels = list(points)
    image, draw, box = _axes_frame(size, title, xlabel, ylabel, labels, y_ticks, TICK_SIZE)
    left, top, right, bottom = box
    for tick in x_ticks:
        x = _scale(tick, x_ticks[0], x_ticks[-1], left, right)
        draw.line([(x, top), (x, bottom)], fill=GRID)
        _put_text(draw, x, bottom + 8, _tick_label(tick), TICK_SIZE, "center")
    _draw_box(draw, box)
    for i, pts in enumerate(points.values()):
        color = PALETTE[i % len(PALETTE)]
        pixels = [
            (
                _scale(x, x_ticks[0], x_ticks[-1], left, right),
                _scale(y, y_ticks[0], y_ticks[-1], bottom, top),
            )
            if math.isfinite(x + y)
            else None
            for x, y in pts
        ]
        for run in _finite_runs(pixels):
            if len(run) > 1:
                draw.line(run, fill=color, width=3, joint="curve")
        if markers if markers is not None else len(pts) <= 60:
            for pixel in filter(None, pixels):
                draw.ellipse([pixel[0] - 3, pixel[1] - 3, pixel[0] + 3, pixel[1] + 3], fill=color)
    _save(image, path)


def _finite_runs(pixels: list[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Consecutive drawable points (a non-finite point breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for pixel in pixels:
        if pixel is None:
            runs.append([])
        else:
            runs[-1].append(pixel)
    return [run for run in runs if run]


def colormap(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """uint8 RGB colors (shape + (3,)) of ``values`` on :data:`VIRIDIS` between ``vmin`` and
    ``vmax`` (clipped); non-finite values get :data:`MISSING`."""
    values = np.asarray(values, dtype=np.float64)
    span = vmax - vmin if vmax > vmin else 1.0
    position = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / span, 0, 1)
    anchors = np.linspace(0, 1, len(VIRIDIS))
    channels = [np.interp(position, anchors, [c[k] for c in VIRIDIS]) for k in range(3)]
    rgb = np.stack(channels, axis=-1).round().astype(np.uint8)
    rgb[~np.isfinite(values)] = MISSING
    return rgb


def _thinning(pixels_per_item: float, label_extent: float) -> int:
    """Label every k-th item so that labels ``label_extent`` pixels long do not overlap."""
    return max(1, math.ceil((label_extent + 6) / max(pixels_per_item, 1e-9)))


def heatmap(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    path: str | Path,
    xlabel: str = "",
    ylabel: str = "",
    colorbar_label: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    size: tuple[int, int] | None = None,
) -> None:
    """``matrix[row][col]`` as colored cells with a color bar (``vmin``/``vmax`` default to
    the finite data range; give both of two heatmaps the same to compare them). Row and
    column labels are thinned out so that they never overlap; the size defaults to about
    22×18 pixels per cell, within 360–1200 × 180–900 pixels of plot area."""
    data = np.asarray(matrix, dtype=np.float64)
    if data.ndim != 2 or data.shape != (len(row_labels), len(col_labels)) or data.size == 0:
        raise DitqError(
            f"heatmap {title!r}: the matrix has shape {data.shape} but there are "
            f"{len(row_labels)} row and {len(col_labels)} column labels (need one per row/column)"
        )
    finite = _finite_values(data)
    low = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    high = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    bar_ticks = [t for t in _nice_ticks(low, high) if low - 1e-9 <= t <= high + 1e-9] or [low]
    bar_text = _max_label_width([_tick_label(t) for t in bar_ticks], TICK_SIZE)
    right_extra = 18 + 8 + bar_text + (_line_height(LABEL_SIZE) + 14 if colorbar_label else 0)
    left_text = _max_label_width(row_labels, TICK_SIZE)
    col_height = _line_height(TICK_SIZE)
    if size is None:
        plot_w = int(np.clip(data.shape[1] * 22, 360, 1200))
        plot_h = int(np.clip(data.shape[0] * 18, 180, 900))
        probe = _layout(
            10_000, 10_000, title, xlabel, ylabel, [], left_text, col_height, right_extra
        )
        size = (probe.left + plot_w + probe.right, probe.top + plot_h + probe.bottom)
    layout = _layout(*size, title, xlabel, ylabel, [], left_text, col_height, right_extra)
    image = Image.new("RGB", size, BACKGROUND)
    draw = _draw_frame(image, layout, title, xlabel, ylabel, [])
    left, top, right, bottom = layout.box
    cells = Image.fromarray(colormap(data, low, high), "RGB")
    image.paste(cells.resize((right - left, bottom - top), Image.NEAREST), (left, top))
    cell_w, cell_h = (right - left) / data.shape[1], (bottom - top) / data.shape[0]
    every_row = _thinning(cell_h, _line_height(TICK_SIZE))
    for i in range(0, len(row_labels), every_row):
        y = top + (i + 0.5) * cell_h
        _put_text(draw, left - 8, y, row_labels[i], TICK_SIZE, "right", "middle")
    every_col = _thinning(cell_w, _max_label_width(col_labels, TICK_SIZE))
    for j in range(0, len(col_labels), every_col):
        _put_text(draw, left + (j + 0.5) * cell_w, bottom + 8, col_labels[j], TICK_SIZE, "center")
    bar_left = right + 12
    gradient = colormap(np.linspace(high, low, bottom - top)[:, None], low, high)
    image.paste(Image.fromarray(np.repeat(gradient, 18, axis=1), "RGB"), (bar_left, top))
    for tick in bar_ticks:
        y = _scale(tick, low, high, bottom, top) if high > low else (top + bottom) / 2
        draw.line([(bar_left + 18, y), (bar_left + 22, y)], fill=AXIS)
        _put_text(draw, bar_left + 26, y, _tick_label(tick), TICK_SIZE, "left", "middle")
    if colorbar_label:
        x = layout.width - PAD - _line_height(LABEL_SIZE) / 2
        _put_vertical_text(image, x, (top + bottom) / 2, colorbar_label, LABEL_SIZE)
    _save(image, path)


def bar_plot(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str,
    path: str | Path,
    xlabel: str = "",
    size: tuple[int, int] = (960, 560),
    value_labels: bool = True,
) -> None:
    """Grouped bars: one group per entry of ``groups`` along x (e.g. bit widths), one bar per
    ``{label: values}`` series inside each group (e.g. methods), values in ``groups`` order.
    Bars start at 0 (negative values point down); ``value_labels`` prints each value."""
    values = {label: [float(v) for v in vals] for label, vals in series.items()}
    wrong = [label for label, vals in values.items() if len(vals) != len(groups)]
    if wrong or not groups or not values:
        raise DitqError(
            f"bar plot {title!r}: every series needs one value per group ({len(groups)} "
            f"groups); check series {wrong or list(values)}"
        )
    finite = _finite_values([v for vals in values.values() for v in vals])
    if not finite.size:
        raise DitqError(f"bar plot {title!r} has no finite values to draw")
    headroom = 0.08 * (finite.max() - finite.min() or abs(finite.max()) or 1.0) * value_labels
    y_ticks = _nice_ticks(
        min(0.0, finite.min() - headroom * (finite.min() < 0)),
        max(0.0, finite.max() + headroom * (finite.max() > 0)),
    )
    labels = list(values)
    image, draw, box = _axes_frame(size, title, xlabel, ylabel, labels, y_ticks, LABEL_SIZE)
    left, top, right, bottom = box
    group_w = (right - left) / len(groups)
    bar_w = group_w * 0.8 / len(values)
    zero = _scale(0.0, y_ticks[0], y_ticks[-1], bottom, top)
    for g, group in enumerate(groups):
        start = left + g * group_w + group_w * 0.1
        _put_text(draw, left + (g + 0.5) * group_w, bottom + 8, group, LABEL_SIZE, "center")
        for s, vals in enumerate(values.values()):
            value = vals[g]
            if not math.isfinite(value):
                continue
            x0, x1 = start + s * bar_w, start + (s + 1) * bar_w - 2
            y = _scale(value, y_ticks[0], y_ticks[-1], bottom, top)
            draw.rectangle([x0, min(y, zero), x1, max(y, zero)], fill=PALETTE[s % len(PALETTE)])
            if value_labels:
                v_align, offset = ("bottom", -3) if value >= 0 else ("top", 3)
                _put_text(
                    draw,
                    (x0 + x1) / 2,
                    y + offset,
                    f"{value:.3g}",
                    TICK_SIZE - 2,
                    "center",
                    v_align,
                )
    draw.line([(left, zero), (right, zero)], fill=AXIS)
    _draw_box(draw, box)
    _save(image, path)
