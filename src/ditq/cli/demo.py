"""``ditq demo``: the bundled DiT quantized by PTQ4DiT, DiTAS and single-step calibration at
W8A8 and W4A8, sampled on the same noise, compared in a report: a few minutes on a CPU.
``--methods`` takes any method and ``--bits`` any settings (``--methods rtn,svdquant --bits
w4a4``: W4A4 in a minute).

Fast settings (every one is written into the run directories and the report):

* sampling: DDIM, 25 steps, guidance 1.5, 10 samples (one per class), seed 0;
* one calibration set of 4 seeded FP trajectories, every step recorded, shared by the
  methods as each expects: PTQ4DiT on all 25 steps (the paper's 25 timesteps), DiTAS on all
  steps with its α search on 1,024 input rows of the first, noisiest half, single-step on
  the first step;
* PTQ4DiT without block reconstruction unless ``--recon-iters N`` (official: 20,000; on a
  CPU each block takes minutes);
* output SQNR of each quantized denoiser against FP on 4 held-out trajectories (another
  seed), and the layer-wise SQNR study of first-step against all-step activation ranges.

Output (``--out``): one run directory per model (``fp``, ``ptq4dit-w8a8``, ...: quantized
model, samples, run.json) and ``sqnr/`` (study JSON and plots), written to a temporary
directory and renamed when complete, then ``report/`` (``ditq report`` over the runs:
table, side-by-side grids on the same noise, PSNR and size plots).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ditq.api import load_model, quantize, save
from ditq.calib.dataset import CalibrationSet
from ditq.calib.settings import CalibSettings
from ditq.cli.common import parse_names
from ditq.diffusion.pipeline import SamplingSettings, generate
from ditq.errors import DitqError
from ditq.eval.report import is_report_dir, make_report, markdown_table
from ditq.eval.sqnr import model_output_sqnr_db, save_study, sqnr_study
from ditq.io import OutputKind, check_output, save_samples_npz, write_output
from ditq.methods import METHODS
from ditq.models import DiT
from ditq.pipeline.config import QuantConfig

DEMO_METHODS = ("ptq4dit", "ditas", "single-step")
BYTES_PER_MB = 1_000_000
HELD_OUT_SEED_OFFSET = 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="quantize the bundled DiT with every method and compare them (CPU, minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        default="runs/demo",
        help="output directory: new, empty, or an earlier demo with --overwrite",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds an earlier demo (nothing else is ever replaced)",
    )
    parser.add_argument("--model", default="demo", help="the model (default: the bundled one)")
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument(
        "--recon-iters",
        type=int,
        default=0,
        help="PTQ4DiT block reconstruction iterations per block (default off: on a CPU each "
        "block takes minutes; official 20,000)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEMO_METHODS),
        help=f"comma-separated methods, any of {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--bits", default="w8a8,w4a8", help="comma-separated WxAy settings, e.g. w8a8,w4a8,w4a4"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def parse_bits(text: str) -> list[tuple[int, int]]:
    bits = []
    for item in text.lower().split(","):
        w, _, a = item.strip().removeprefix("w").partition("a")
        if not (w.isdigit() and a.isdigit()):
            raise DitqError(f"--bits {item!r}: write settings like w8a8,w4a8")
        bits.append((int(w), int(a)))
    return bits


def demo_config(method: str, wbits: int, abits: int, args: argparse.Namespace) -> QuantConfig:
    """The method's published defaults at these bits, with the demo's fast settings."""
    fast = {
        "ptq4dit": {"recon_iters": args.recon_iters},
        "ditas": {"search_steps": (args.steps + 1) // 2, "search_max_tokens": 1024},
    }.get(method, {})
    return METHODS[method].config_class(wbits=wbits, abits=abits, **fast)


def calibration_subset(method: str, calib: CalibrationSet) -> CalibrationSet:
    """What each method calibrates on: single-step the first step, the others all steps."""
    return calib.subset([0]) if METHODS[method].default_calib.steps == "first" else calib


def fp_size_mb(model: DiT) -> float:
    return sum(p.numel() * 4 for p in model.state_dict().values()) / BYTES_PER_MB


def is_demo_dir(path: Path) -> bool:
    """An earlier ``ditq demo`` output: its FP run and its report."""
    return (path / "fp" / "run.json").is_file() and is_report_dir(path / "report")


DEMO_DIR = OutputKind("ditq demo directory", True, is_demo_dir)


def write_run_json(directory: Path, **values) -> None:
    (directory / "run.json").write_text(json.dumps(values, indent=2) + "\n")


def run(args: argparse.Namespace) -> None:
    if args.num_samples < 1 or args.calib_samples < 1 or args.steps < 2:
        raise DitqError("--num-samples and --calib-samples must be >= 1 and --steps >= 2")
    methods, bits = parse_names(args.methods, METHODS, "--methods"), parse_bits(args.bits)
    check_output(args.out, DEMO_DIR, overwrite=args.overwrite, inputs=[args.model])
    start = time.perf_counter()
    model = load_model(args.model, progress=False, device=args.device)
    classes = list(range(model.num_classes))
    sampling = SamplingSettings(
        sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed
    )
    setting = f"{args.sampler}{args.steps}"
    calib_settings = CalibSettings(
        num_samples=args.calib_samples,
        steps="all",
        sampler=args.sampler,
        num_steps=args.steps,
        cfg_scale=args.cfg_scale,
        classes=classes,
    )
    held_out_settings = replace(
        calib_settings, num_samples=4, seed=calib_settings.seed + HELD_OUT_SEED_OFFSET
    )
    stages = 4 + len(methods) * len(bits)
    bar = tqdm(total=stages, desc="demo", disable=args.quiet, unit="stage")

    def sample_into(run_dir: Path, denoiser: DiT) -> None:
        images, labels = generate(
            denoiser,
            args.num_samples,
            sampling,
            classes=classes,
            batch_size=args.num_samples,
            device=args.device,
            progress=False,
        )
        save_samples_npz(run_dir / f"samples_{setting}.npz", images, labels)

    with write_output(args.out, DEMO_DIR, overwrite=args.overwrite) as out:
        bar.set_description("demo: FP samples")
        fp_dir = out / "fp"
        fp_dir.mkdir()
        sample_into(fp_dir, model)
        write_run_json(fp_dir, name="fp", method="fp", bits="FP32", model_size_mb=fp_size_mb(model))
        bar.update()

        bar.set_description("demo: calibration set")
        calib_start = time.perf_counter()
        calib = calib_settings.build(model, batch_size=64, device=args.device, progress=False)
        calib_seconds = time.perf_counter() - calib_start
        held_out = held_out_settings.build(model, batch_size=64, device=args.device, progress=False)
        bar.update()

        for method in methods:
            subset = calibration_subset(method, calib)
            for wbits, abits in bits:
                name = f"{method}-w{wbits}a{abits}"
                bar.set_description(f"demo: {name}")
                run_dir = out / name
                quantized = quantize(
                    copy.deepcopy(model),
                    demo_config(method, wbits, abits, args),
                    subset,
                    progress=False,
                    calibration={**subset.meta, "settings": calib_settings.to_dict()},
                    calib_seconds=calib_seconds,
                    command="ditq demo",
                )
                save(quantized, run_dir)
                quantized = load_model(run_dir, device=args.device)  # what is on disk
                sample_into(run_dir, quantized)
                sqnr = model_output_sqnr_db(model, quantized, held_out, device=args.device)
                write_run_json(run_dir, output_sqnr_db=sqnr)
                bar.update()

        bar.set_description("demo: SQNR study")
        study = sqnr_study(model, calib, QuantConfig(), device=args.device, progress=False)
        (out / "sqnr").mkdir()
        save_study(study, out / "sqnr")
        bar.update()

    bar.set_description("demo: report")
    out = Path(args.out)
    run_dirs = [out / "fp"] + [out / f"{m}-w{w}a{a}" for m in methods for w, a in bits]
    report = make_report(run_dirs, out / "report")
    bar.update()
    bar.close()
    print(markdown_table(report.rows))
    seconds = time.perf_counter() - start
    print(
        f"\n{len(run_dirs) - 1} quantized models, {args.num_samples} samples each "
        f"({args.sampler.upper()} {args.steps} steps, cfg {args.cfg_scale}) in {seconds:.0f} s"
    )
    print(f"report: {args.out}/report/report.html (and report.md, grids/, plots/)")
    print(f"SQNR study (first-step vs all-step activation ranges): {args.out}/sqnr/")
