"""``ditq report``: one comparison report (tables, grids on the same noise, plots) over run
directories."""

from __future__ import annotations

import argparse

from ditq.eval import report
from ditq.eval.report import GRID_SAMPLES, make_report, markdown_table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="compare runs: FID/ΔFID, PSNR/SSIM vs FP, grids, plots (md, html, json)",
        description=report.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory: new, empty, or an earlier report with --overwrite",
    )
    parser.add_argument(
        "--fp", metavar="DIR", help="the FP baseline run (default: the run whose method is fp)"
    )
    parser.add_argument(
        "--grid-samples",
        type=int,
        default=GRID_SAMPLES,
        help="first N samples per run in the grids",
    )
    parser.add_argument(
        "--no-distance",
        dest="distance",
        action="store_false",
        help="do not compute PSNR/SSIM vs FP from the samples where the eval files lack them",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds an earlier ditq report (nothing else is ever replaced)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    result = make_report(
        args.run_dirs,
        args.out,
        fp=args.fp,
        grid_samples=args.grid_samples,
        distance=args.distance,
        overwrite=args.overwrite,
    )
    print(markdown_table(result.rows))
    print(f"-> {args.out}/report.md, report.html, report.json")
