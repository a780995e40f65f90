"""``ditq analyze``: the SQNR study of single-step calibration (METHODS.md, "Single-step
calibration"): per layer and sampling step, static activation ranges calibrated on the
first step versus on all steps."""

from __future__ import annotations

import argparse
import time

from ditq.api import load_model
from ditq.calib.settings import CalibSettings
from ditq.cli.common import add_model_args, model_kwargs
from ditq.errors import DitqError
from ditq.eval.sqnr import (
    REPORT_FILES,
    STUDY_DIR,
    check_study_config,
    format_summary,
    save_study,
    sqnr_study,
)
from ditq.io import check_output, write_output
from ditq.pipeline.config import W_GRANULARITIES, QuantConfig
from ditq.quant.spec import RANGE_METHODS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="SQNR per layer and sampling step: first-step vs all-step activation ranges",
        description="Sample the FP model, quantize a copy with static activation ranges "
        "calibrated on the first sampling step and on all steps, and measure the SQNR of "
        f"every quantized layer at every step. Writes DIR/{', DIR/'.join(REPORT_FILES.values())}.",
    )
    add_model_args(parser)
    parser.add_argument("--out", required=True, help="output directory")
    q = parser.add_argument_group("quantization")
    q.add_argument("--wbits", type=int, default=QuantConfig.wbits, help="weight bits")
    q.add_argument("--abits", type=int, default=QuantConfig.abits, help="activation bits")
    q.add_argument("--w-granularity", choices=W_GRANULARITIES, default=QuantConfig.w_granularity)
    q.add_argument("--w-group-size", type=int, default=QuantConfig.w_group_size)
    q.add_argument("--w-range", choices=RANGE_METHODS, default=QuantConfig.w_range)
    q.add_argument("--a-range", choices=RANGE_METHODS, default=QuantConfig.a_range)
    q.add_argument("--a-symmetric", action="store_true", help="symmetric activation ranges")
    c = parser.add_argument_group("calibration trajectories of the FP model")
    c.add_argument("--calib-samples", type=int, default=8, help="samples (trajectories)")
    c.add_argument("--calib-sampler", choices=("ddpm", "ddim"), default="ddim")
    c.add_argument("--calib-num-steps", type=int, default=50, help="sampling steps")
    c.add_argument(
        "--calib-steps",
        default="all",
        help="steps to study: all, or K evenly spaced ones (always including the first)",
    )
    c.add_argument("--calib-cfg-scale", type=float, default=CalibSettings.cfg_scale)
    c.add_argument("--calib-seed", type=int, default=CalibSettings.seed)
    parser.add_argument("--batch-size", type=int, default=64, help="forward batch size")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds an earlier study"
    )
    parser.set_defaults(run=run)


def _study_steps(text: str) -> str | int:
    """``all`` or a count K >= 2 (one step leaves nothing to compare the first step with)."""
    if text == "all":
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 2:
        raise DitqError(f"--calib-steps must be 'all' or a count of at least 2, got {text!r}")
    return count


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    config = QuantConfig(
        wbits=args.wbits,
        abits=args.abits,
        w_granularity=args.w_granularity,
        w_group_size=args.w_group_size,
        w_range=args.w_range,
        a_range=args.a_range,
        a_symmetric=args.a_symmetric,
    )
    settings = CalibSettings(
        num_samples=args.calib_samples,
        steps=_study_steps(args.calib_steps),
        sampler=args.calib_sampler,
        num_steps=args.calib_num_steps,
        cfg_scale=args.calib_cfg_scale,
        seed=args.calib_seed,
    )
    check_output(args.out, STUDY_DIR, overwrite=args.overwrite, inputs=[args.model])
    progress = not args.quiet
    model = load_model(args.model, progress=progress, **model_kwargs(args))
    check_study_config(model, config)
    calib = settings.build(model, batch_size=args.batch_size, device=args.device, progress=progress)
    result = sqnr_study(
        model, calib, config, batch_size=args.batch_size, device=args.device, progress=progress
    )
    result["settings"]["calibration_settings"] = settings.to_dict()
    result["settings"]["wall_time_s"] = time.perf_counter() - start
    with write_output(args.out, STUDY_DIR, overwrite=args.overwrite) as tmp:
        save_study(result, tmp)
    print(f"{format_summary(result)}\n-> {args.out}")
