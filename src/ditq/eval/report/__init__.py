"""Comparison report over run directories: ``ditq report RUN_DIR... --out DIR``.

A run directory is what a user accumulates for one model. It holds any of:

* ``ditq.json`` + ``calibration_report.json``: a quantized model written by ``ditq quantize``
  (method, bits WxAy from ``method_config``, calibration wall time ``wall_time_s.total``,
  model size = bytes of ``model.safetensors``);
* ``samples*.npz``: samples in the ADM layout (``arr_0`` uint8 NHWC, ``arr_1`` labels), e.g.
  ``ditq sample --out RUN/samples_ddpm250.npz``;
* ``eval*.json``: results of ``ditq eval --out RUN/eval_ddpm250.json``;
* ``run.json`` (optional, any run): ``{"name": ..., "method": ..., "bits": "W32A32",
  "calibration_time_s": ..., "model_size_mb": ..., "notes": ...}``; its values take
  precedence over those read from ``ditq.json``; other keys are kept in ``report.json``.

The run's name defaults to the directory name. The FP baseline is the run whose method is
``fp`` (a directory with only samples/eval files and ``run.json`` saying ``"method": "fp"``),
or the one given with ``--fp``; the FP row is the reference of every "vs FP" column.

The sampler setting of a file is the part of its name after ``samples``/``eval``
(``samples_ddpm250.npz`` and ``eval-ddpm-250.json`` are both ``ddpm250``: a sampler name
``ddpm``/``ddim`` and its step count are written together); an ``eval*.json`` without one
takes the setting of the samples file it names. Rows are matched to the FP row of the same
setting: ΔFID = FID - FID(FP). PSNR/SSIM vs FP come from the eval file (``ditq eval --vs``)
or, when absent, are computed here from the two sample files on their common first samples
(PROTOCOL.md, "distance to the FP model on the same noise"), provided their labels agree.

Output (written to a temporary directory and renamed at the end):
``report.md`` and ``report.html`` (one row per run and setting), ``report.json`` (everything,
machine-readable), ``grids/SETTING.png`` (the first N samples of every run having samples for
a setting shared by several runs, one labelled row per run, same indices) and
``plots/delta_fid.png`` / ``plots/psnr.png`` (grouped bars by bits and method).
"""

# This docstring is the --help of `ditq report`. The modules: runs (run discovery and file
# parsing), grids (comparison grids), rows (table rows against the FP run), render
# (markdown, HTML, plots, the report directory).

from ditq.eval.report.grids import GRID_PAD, GRID_SAMPLES, GRID_TILE_PX, comparison_grid
from ditq.eval.report.render import (
    REPORT_DIR,
    check_report_output,
    is_report_dir,
    make_report,
    markdown_table,
    write_report,
)
from ditq.eval.report.rows import Report, build_report, table_cells
from ditq.eval.report.runs import Run, canonical_setting, load_run, read_first_images

__all__ = [
    "GRID_PAD",
    "GRID_SAMPLES",
    "GRID_TILE_PX",
    "REPORT_DIR",
    "Report",
    "Run",
    "build_report",
    "canonical_setting",
    "check_report_output",
    "comparison_grid",
    "is_report_dir",
    "load_run",
    "make_report",
    "markdown_table",
    "read_first_images",
    "table_cells",
    "write_report",
]
