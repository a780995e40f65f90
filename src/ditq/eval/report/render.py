"""The report written out: markdown and HTML tables, plots, grids and report.json in a
report directory (atomically; an earlier report is replaced only with ``--overwrite``)."""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ditq.eval.plots import bar_plot
from ditq.eval.report.grids import GRID_SAMPLES
from ditq.eval.report.rows import COLUMNS, MISSING_TEXT, Report, build_report, table_cells
from ditq.eval.report.runs import Run, bits_order
from ditq.io import OutputKind, check_output, read_json_object, write_output
from ditq.version import __version__

REPORT_FORMAT = "ditq-report"
REPORT_JSON = "report.json"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table in Markdown (what ``ditq report`` prints)."""
    header, *body = table_cells(rows)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + " --- |" * len(header), *map(line, body)])


def _bars(report: Report, key: str) -> tuple[list[str], dict[str, list[float]]] | None:
    """Groups (bits) and series (method, plus the setting when several) of ``key``'s values
    over the non-FP rows; series are named by run when two runs share method and bits."""
    fp_name = getattr(report.fp, "name", None)
    rows = [row for row in report.rows if row[key] is not None and row["name"] != fp_name]
    if not rows:
        return None
    several_settings = len({r["setting"] for r in rows}) > 1

    def series_of(row: dict, by: str) -> str:
        label = str(row[by] or MISSING_TEXT)
        return f"{label} {row['setting'] or ''}".strip() if several_settings else label

    by = "method"
    cells = [(series_of(r, by), r["bits"] or MISSING_TEXT) for r in rows]
    if len(set(cells)) < len(cells):
        by = "name"
    groups = sorted({r["bits"] or MISSING_TEXT for r in rows}, key=bits_order)
    series: dict[str, list[float]] = {}
    for row in rows:
        values = series.setdefault(series_of(row, by), [math.nan] * len(groups))
        values[groups.index(row["bits"] or MISSING_TEXT)] = float(row[key])
    return groups, series


def _plots(report: Report, out: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Draw the bar plots that have values; returns them and notes on those left out."""
    written, notes = [], []
    for key, name, title, ylabel in (
        ("delta_fid", "delta_fid.png", "ΔFID to FP (same sampler and steps)", "ΔFID"),
        ("psnr", "psnr.png", "PSNR vs FP on the same noise", "PSNR (dB)"),
    ):
        bars = _bars(report, key)
        if bars is None:
            notes.append(f"plots/{name} not drawn: no {key} values")
            continue
        bar_plot(*bars, title=title, ylabel=ylabel, path=out / "plots" / name, xlabel="bits")
        written.append({"metric": key, "path": f"plots/{name}", "title": title})
    return written, notes


def _run_details(run: Run) -> list[str]:
    """Path, granularities, calibration set and method settings of a run."""
    parts = [str(run.path)]
    if run.settings:
        calib = run.settings["calibration"]
        steps = calib["steps"]
        timesteps = len(steps) if isinstance(steps, list) else steps
        parts += [
            f"weights {run.settings['weights']}",
            f"activations {run.settings['activations']}",
            f"attention bits {run.settings['attention_bits']}",
            f"calibration {calib['samples']} samples × {timesteps} timesteps of "
            f"{calib['sampler']} {calib['num_steps']} (cfg {calib['cfg_scale']})",
        ]
        if run.settings["method"]:
            parts.append(f"method settings {json.dumps(run.settings['method'])}")
    if run.annotations.get("notes"):
        parts.append(str(run.annotations["notes"]))
    return parts


def _run_title(run: Run) -> str:
    return f"{run.method or MISSING_TEXT}, {run.bits or MISSING_TEXT}"


def _markdown_run(run: Run) -> str:
    path, *details = _run_details(run)
    return f"- **{run.name}** ({_run_title(run)}): " + "; ".join([f"`{path}`", *details])


def _grid_caption(grid: dict[str, Any]) -> str:
    caption = (
        f"{grid['setting'] or 'samples'}: first {len(grid['indices'])} samples, rows "
        f"{', '.join(grid['runs'])}"
    )
    if grid["labels_match"]:
        return caption + " (same labels in every row)."
    return caption + ". " + "; ".join(f"{n}: {p}" for n, p in grid["problems"].items()) + "."


def _markdown(report: Report, header: str, plots: list[dict[str, str]], notes: list[str]) -> str:
    lines = [f"# ditq report\n\n{header}\n", markdown_table(report.rows), ""]
    lines += ["## Runs\n", *map(_markdown_run, report.runs), ""]
    if report.grids:
        lines.append("## Samples on the same noise\n")
        for grid in report.grids:
            alt = grid["setting"] or "samples"
            lines += [_grid_caption(grid) + "\n", f"![{alt}]({grid['path']})\n"]
    if plots:
        lines.append("## Plots\n")
        lines += [f"![{plot['title']}]({plot['path']})\n" for plot in plots]
    if notes:
        lines += ["## Notes\n", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def _html_run(run: Run) -> str:
    path, *details = (html.escape(part) for part in _run_details(run))
    title = f"<b>{html.escape(run.name)}</b> ({html.escape(_run_title(run))})"
    return f"<li>{title}: <code>{path}</code>" + "".join(f"; {d}" for d in details) + "</li>"


CSS = """body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; }
td:nth-child(-n+4), th:nth-child(-n+4) { text-align: left; }
tr.fp { font-weight: bold; }
img { max-width: 100%; }
img.grid { image-rendering: pixelated; }
code { font-size: 13px; }"""


def _html(report: Report, header: str, plots: list[dict[str, str]], notes: list[str]) -> str:
    esc = html.escape
    head, *body = table_cells(report.rows)
    fp_name = getattr(report.fp, "name", None)
    table = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for row, cells in zip(report.rows, body, strict=True):
        css = ' class="fp"' if row["name"] == fp_name else ""
        table.append(f"<tr{css}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>ditq report</title>',
        f"<style>\n{CSS}\n</style></head><body>",
        f"<h1>ditq report</h1><p>{esc(header)}</p>",
        *table,
        "</table>",
        "<h2>Runs</h2><ul>",
        *map(_html_run, report.runs),
        "</ul>",
    ]
    if report.grids:
        parts.append("<h2>Samples on the same noise</h2>")
        for grid in report.grids:
            parts += [
                f"<p>{esc(_grid_caption(grid))}</p>",
                f'<img class="grid" src="{esc(grid["path"])}" '
                f'alt="{esc(grid["setting"] or "samples")}">',
            ]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f'<img src="{esc(p["path"])}" alt="{esc(p["title"])}">' for p in plots]
    if notes:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{esc(n)}</li>" for n in notes), "</ul>"]
    return "\n".join([*parts, "</body></html>", ""])


def _json_safe(value: Any) -> Any:
    """Non-finite floats as None (JSON has no inf/nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def is_report_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a ``report.json`` written by :func:`write_report`."""
    summary = read_json_object(Path(path) / REPORT_JSON)
    return summary is not None and (
        summary.get("format") == REPORT_FORMAT or {"ditq_version", "rows", "runs"} <= set(summary)
    )


REPORT_DIR = OutputKind("ditq report directory", True, is_report_dir)


def write_report(report: Report, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write report.md, report.html, report.json, grids/ and plots/ to ``out`` atomically;
    an existing report directory is replaced only with ``overwrite``."""
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"Generated by ditq {__version__} on {created} from {len(report.runs)} runs."
    with write_output(out, REPORT_DIR, overwrite=overwrite) as tmp:
        for name, picture in report.grid_images.items():
            (tmp / "grids").mkdir(exist_ok=True)
            picture.save(tmp / "grids" / name, format="PNG")
        plots, plot_notes = _plots(report, tmp)
        notes = report.notes + plot_notes
        (tmp / "report.md").write_text(_markdown(report, header, plots, notes), "utf-8")
        (tmp / "report.html").write_text(_html(report, header, plots, notes), "utf-8")
        summary = {
            "format": REPORT_FORMAT,
            "ditq_version": __version__,
            "created": created,
            "fp": getattr(report.fp, "name", None),
            "columns": {key: title for key, title, _ in COLUMNS},
            "rows": report.rows,
            "runs": [run.to_dict() for run in report.runs],
            "grids": report.grids,
            "plots": plots,
            "notes": notes,
        }
        text = json.dumps(_json_safe(summary), indent=2, ensure_ascii=False) + "\n"
        (tmp / REPORT_JSON).write_text(text, "utf-8")
    return Path(out)


def check_report_output(
    out: str | Path, run_dirs: list[str | Path], *, overwrite: bool = False
) -> None:
    """Refuse an output that would replace or lie inside a run directory, or replace
    anything but an earlier report (:func:`ditq.io.check_output`)."""
    check_output(out, REPORT_DIR, overwrite=overwrite, inputs=run_dirs, input_dirs=run_dirs)


def make_report(
    run_dirs: list[str | Path],
    out: str | Path,
    fp: str | Path | None = None,
    grid_samples: int = GRID_SAMPLES,
    distance: bool = True,
    overwrite: bool = False,
) -> Report:
    """:func:`build_report` then :func:`write_report`; ``out`` is checked first (it may
    not hold or lie inside a run directory, nor replace anything but an earlier report)."""
    check_report_output(out, run_dirs, overwrite=overwrite)
    report = build_report(run_dirs, fp=fp, grid_samples=grid_samples, distance=distance)
    write_report(report, out, overwrite=overwrite)
    return report
