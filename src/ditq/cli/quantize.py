"""``ditq quantize``: calibrate and quantize a DiT with one method, write a quantized directory."""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ditq.api import load_model, quantize, save
from ditq.calib.dataset import CALIBRATION_SET_FILE, CalibrationSet
from ditq.calib.settings import PAIRED_CLASSES, CalibSettings
from ditq.cli.common import add_model_args, model_kwargs, read_prompts
from ditq.diffusion.pipeline import parse_classes
from ditq.errors import DitqError
from ditq.io import check_output
from ditq.methods import METHODS, Method
from ditq.models.adapter import LAYER_GROUPS
from ditq.pipeline.checkpoint import QUANTIZED_DIR
from ditq.pipeline.config import (
    A_GRANULARITIES,
    W_GRANULARITIES,
    WEIGHT_SOLVERS,
    LayerOverride,
    LayerSelection,
    QuantConfig,
)
from ditq.pipeline.run import record_of
from ditq.pipeline.steps import layers_to_wrap, quantized_layers
from ditq.quant.spec import RANGE_METHODS, UNQUANTIZED_BITS


def _method_fields() -> list[tuple[str, Any, str, str]]:
    """Method-specific configuration fields: (name, default, methods taking it, help)."""
    shared = {f.name for f in fields(QuantConfig)}
    found: dict[str, list] = {}
    for method in METHODS.values():
        for f in fields(method.config_class):
            if f.name in shared:
                continue
            if f.name in found:
                found[f.name][2] += f", {method.name}"
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            found[f.name] = [f.name, default, method.name, f.metadata.get("help", "")]
    return [tuple(entry) for entry in found.values()]


def _check_method_flags(method: Method, args: argparse.Namespace) -> None:
    """A flag of another method is an error naming the methods that take it."""
    own = {f.name for f in fields(method.config_class)}
    for name, _, takers, _ in _method_fields():
        if name not in own and getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise DitqError(
                f"{flag} is a setting of {takers}; --method {method.name} does not take it "
                f"(drop it, or choose --method {takers.split(',')[0]})"
            )


def _parse_field(default: Any):
    if isinstance(default, bool):
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        return lambda text: tuple(part.strip() for part in text.split(",") if part.strip())
    if isinstance(default, (int, float)):
        return type(default)
    return str


def add_parser(subparsers: argparse._SubParsersAction, method: str | None = None) -> None:
    """The ``quantize`` parser; with ``method`` (``ditq quantize --method M --help``) the
    method-settings group lists only M's flags, with M's defaults."""
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a DiT (rtn, smoothquant, single-step, ...)",
        description="Calibrate on the FP model's own samples, quantize, and write DIR "
        "(integer weight codes + scales in safetensors, ditq.json, calibration_report.json).",
    )
    add_model_args(parser)
    parser.add_argument("--method", required=True, choices=list(METHODS))
    parser.add_argument("--out", required=True, help="output directory")
    q = parser.add_argument_group("quantization (defaults: the method's published settings)")
    q.add_argument("--wbits", type=int, help="weight bits (2-8, 16 = float; default: the method's)")
    q.add_argument(
        "--abits", type=int, help="activation bits (2-8, 16 = float; default: the method's)"
    )
    q.add_argument(
        "--w-granularity",
        choices=W_GRANULARITIES,
        help="weight ranges per tensor, output channel, group of --w-group-size input "
        "channels, or group of --w-group-size output channels per input column "
        "(column_group; column_group_strided: DiTAS' official row layout)",
    )
    q.add_argument("--w-group-size", type=int)
    q.add_argument(
        "--w-symmetric",
        action=argparse.BooleanOptionalAction,
        help="symmetric weight ranges (--no-w-symmetric: asymmetric; default: the method's)",
    )
    q.add_argument("--w-range", choices=RANGE_METHODS)
    q.add_argument("--w-fmt", choices=("int", "fp8_e4m3"))
    q.add_argument(
        "--a-granularity",
        choices=A_GRANULARITIES,
        help="activation ranges per tensor, per token (with --a-dynamic), or per group of "
        "--a-group-size input channels (dynamic: per token and group)",
    )
    q.add_argument("--a-group-size", type=int)
    q.add_argument(
        "--a-dynamic",
        action=argparse.BooleanOptionalAction,
        help="activation ranges of each input, at run time (--no-a-dynamic: calibrated, "
        "static; default: the method's)",
    )
    q.add_argument(
        "--a-symmetric",
        action=argparse.BooleanOptionalAction,
        help="symmetric activation ranges (--no-a-symmetric: asymmetric, a zero point per "
        "range; default: the method's)",
    )
    q.add_argument("--a-range", choices=RANGE_METHODS)
    q.add_argument("--a-fmt", choices=("int", "fp8_e4m3"))
    q.add_argument("--attn-bits", type=int, help="attention matmul inputs (16 = float)")
    q.add_argument(
        "--weight-solver",
        choices=WEIGHT_SOLVERS,
        help="round weights to nearest (rtn) or with GPTQ, block by block (gptq)",
    )
    q.add_argument("--gptq-damp", type=float, help="GPTQ damping, fraction of mean diag H")
    q.add_argument("--gptq-block-size", type=int, help="GPTQ lazy-batch columns")
    q.add_argument(
        "--gptq-act-order",
        type=_parse_field(True),
        metavar="BOOL",
        help="GPTQ: quantize columns by decreasing Hessian diagonal (default true)",
    )
    q.add_argument(
        "--rotate",
        action="store_true",
        default=None,
        help="rotate every quantized linear's input by a randomized Hadamard matrix (online) "
        "and its weight offline",
    )
    q.add_argument("--rotate-seed", type=int, help="seed of the rotations' random signs")
    q.add_argument(
        "--layers",
        help=f"comma-separated layer groups to quantize, from {', '.join(LAYER_GROUPS)} "
        "(default: blocks = the four linears of every block)",
    )
    q.add_argument(
        "--keep-float",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave matching layers in float, e.g. 'blocks.0.*' (repeatable)",
    )
    q.add_argument(
        "--layer-bits",
        action="append",
        default=[],
        metavar="PATTERN=WxA",
        help="other bits for matching layers, e.g. '*.fc2=8x8' (repeatable)",
    )
    own = None
    if method in METHODS:
        config_class = METHODS[method].config_class
        own = {f.name: f for f in fields(config_class)}
        title = f"{method} settings (--method {method} --help; other methods' flags are errors)"
    else:
        title = "method settings (ditq quantize --method M --help lists M's alone)"
    m = parser.add_argument_group(title)
    for name, default, takers, help_text in _method_fields():
        if own is not None and name not in own:
            m.add_argument("--" + name.replace("_", "-"), dest=name, help=argparse.SUPPRESS)
            continue
        if own is not None:
            f = own[name]
            default = f.default if f.default is not MISSING else f.default_factory()
            help_text, takers = f.metadata.get("help", help_text), method
        m.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_parse_field(default),
            help=f"[{takers}] {help_text} (default {default!r})".strip(),
        )
    c = parser.add_argument_group("calibration set (defaults: the method's)")
    c.add_argument(
        "--calib-preset",
        choices=tuple(CALIB_PRESETS),
        default="published",
        help="published: the method's own calibration set (e.g. PTQ4DiT: 32 trajectories of "
        "250 DDPM steps; minutes to hours on a CPU); cpu: "
        + CALIB_PRESETS["cpu"]["description"]
        + " (the --calib-* flags override either)",
    )
    c.add_argument("--calib-set", help="reuse a saved calibration set (.safetensors)")
    c.add_argument(
        "--resume-dir",
        metavar="DIR",
        help="keep each block finished by reconstruction or GPTQ in DIR: the same command "
        "run again resumes after the last one (checked: a mismatch is refused)",
    )
    c.add_argument("--save-calib-set", help="also save the generated calibration set here")
    c.add_argument("--calib-samples", type=int, help="samples (trajectories)")
    c.add_argument("--calib-steps", help="first, all, K (evenly spaced) or a list 0,10,20")
    c.add_argument("--calib-sampler", choices=("ddpm", "ddim"))
    c.add_argument("--calib-num-steps", type=int, help="sampling steps of the trajectories")
    c.add_argument("--calib-cfg-scale", type=float)
    c.add_argument("--calib-seed", type=int)
    c.add_argument(
        "--calib-classes",
        help="labels cycled over the calibration samples, e.g. 0,1,2, or 'pairs' (two samples "
        "per class, classes 0..15 cycled: PTQ4DiT's official set)",
    )
    c.add_argument(
        "--calib-prompts",
        metavar="FILE",
        help="text-to-image models (a PixArt pipeline directory): calibration prompts, one per "
        "line (default: a small built-in list); the prompts take the place of class labels",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="calibration batch size")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds an earlier ditq quantized directory (nothing else is "
        "ever replaced)",
    )
    parser.set_defaults(run=run)


def _parse_calib_steps(text: str) -> str | int | list[int]:
    if text in ("first", "all"):
        return text
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as err:
        raise DitqError(f"--calib-steps must be first, all, K or a list, got {text!r}") from err
    return values[0] if "," not in text else values


CALIB_PRESETS: dict[str, dict[str, Any]] = {
    "published": {"description": "the method's published calibration set", "settings": {}},
    "cpu": {
        "description": "8 trajectories of 25 DDIM steps, the method's recorded steps among them",
        "settings": {"num_samples": 8, "sampler": "ddim", "num_steps": 25},
    },
}
"""Calibration-set presets: the method's own (default) or a CPU-friendly one with fewer,
shorter trajectories (``--calib-preset``); explicit ``--calib-*`` flags override both."""
SLOW_ON_CPU_EVALUATIONS = 2_000
"""Image-evaluations of the denoiser beyond which a CPU user is pointed to the cpu preset."""


def calib_settings(method: Method, args: argparse.Namespace, num_classes: int) -> CalibSettings:
    settings = method.default_calib.to_dict()
    settings.update(CALIB_PRESETS[args.calib_preset]["settings"])
    steps = settings["steps"]
    if isinstance(steps, list) and max(steps) >= settings["num_steps"]:
        steps = len(steps)  # the preset's shorter run: as many evenly spaced steps
    if isinstance(steps, int) and steps > settings["num_steps"]:
        steps = settings["num_steps"]
    settings["steps"] = steps
    given = {
        "num_samples": args.calib_samples,
        "steps": _parse_calib_steps(args.calib_steps) if args.calib_steps else None,
        "sampler": args.calib_sampler,
        "num_steps": args.calib_num_steps,
        "cfg_scale": args.calib_cfg_scale,
        "seed": args.calib_seed,
        "classes": (
            PAIRED_CLASSES
            if args.calib_classes == PAIRED_CLASSES
            else parse_classes(args.calib_classes, num_classes)
        ),
    }
    settings.update({k: v for k, v in given.items() if v is not None})
    return CalibSettings(**settings)


def _layer_selection(text: str | None) -> LayerSelection | None:
    if text is None:
        return None
    groups = [g.strip() for g in text.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(LAYER_GROUPS))
    if unknown:
        raise DitqError(f"--layers {unknown}: choose from {', '.join(LAYER_GROUPS)}")
    return LayerSelection(**{g: g in groups for g in LAYER_GROUPS})


def _overrides(args: argparse.Namespace) -> dict[str, LayerOverride]:
    overrides = {pattern: LayerOverride(keep=True) for pattern in args.keep_float}
    for item in args.layer_bits:
        pattern, _, bits = item.partition("=")
        try:
            wbits, abits = (int(b) for b in bits.lower().split("x"))
        except ValueError as err:
            raise DitqError(f"--layer-bits {item!r}: write PATTERN=WxA, e.g. '*.fc2=8x8'") from err
        overrides[pattern] = LayerOverride(wbits=wbits, abits=abits)
    return overrides


def _group_sizes_imply_groups(method: Method, args: argparse.Namespace, values: dict) -> None:
    """``--w-group-size``/``--a-group-size`` without a granularity select groups (a size
    would otherwise be ignored); next to a granularity without groups they are an error."""
    defaults = method.config_class.__dataclass_fields__
    for side, grouped in (("w", lambda g: "group" in g), ("a", lambda g: g == "group")):
        if getattr(args, f"{side}_group_size", None) is None:
            continue
        granularity = getattr(args, f"{side}_granularity", None)
        if granularity is None and not grouped(defaults[f"{side}_granularity"].default):
            values[f"{side}_granularity"] = "group"
        elif granularity is not None and not grouped(granularity):
            raise DitqError(
                f"--{side}-group-size needs grouped ranges, not --{side}-granularity "
                f"{granularity}: use --{side}-granularity group or drop --{side}-group-size"
            )


def method_config(method: Method, args: argparse.Namespace) -> QuantConfig:
    """The method's configuration: its defaults, overridden by the flags that were given."""
    values = {"overrides": _overrides(args)}
    for f in fields(method.config_class):
        if f.name == "overrides":
            continue
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    layers = _layer_selection(args.layers)
    if layers is not None:
        values["layers"] = layers
    _group_sizes_imply_groups(method, args, values)
    if args.attn_bits is None and values.get("abits", 0) >= UNQUANTIZED_BITS:
        values["attn_bits"] = UNQUANTIZED_BITS  # float activations: float attention too
    return method.config_class(**values)


def _check_overrides_match(config: QuantConfig, layer_names: list[str]) -> None:
    for pattern in config.overrides:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layer_names):
            raise DitqError(f"layer pattern {pattern!r} matches no selected layer")


def _say(text: str) -> None:
    print(f"ditq quantize: {text}", file=sys.stderr, flush=True)


def calibration_cost(settings: CalibSettings) -> int:
    """Image-evaluations of the denoiser that generating the set takes (x2 with guidance)."""
    guided = 2 if settings.cfg_scale != 1 else 1
    return settings.num_samples * settings.num_steps * guided


def describe_calibration(settings: CalibSettings, preset: str, device: str) -> list[str]:
    """What generating the calibration set will cost, said before it starts."""
    evaluations = calibration_cost(settings)
    guidance = f", guidance {settings.cfg_scale:g}" if settings.cfg_scale != 1 else ""
    lines = [
        f"calibration set ({preset} preset): {settings.num_samples} FP trajectories x "
        f"{settings.num_steps} {settings.sampler.upper()} steps{guidance} = {evaluations:,} "
        f"image-evaluations of the model, recording steps {settings.steps}"
    ]
    if str(device) == "cpu" and preset != "cpu" and evaluations > SLOW_ON_CPU_EVALUATIONS:
        fast = CalibSettings(**{**settings.to_dict(), **CALIB_PRESETS["cpu"]["settings"]})
        lines.append(
            f"on a CPU this is the slow part (minutes or more); --calib-preset cpu ("
            f"{CALIB_PRESETS['cpu']['description']}) costs "
            f"{evaluations / calibration_cost(fast):.0f}x less"
        )
    return lines


def _check_resume_dir(method: Method, config: QuantConfig, resume_dir: str | None) -> None:
    """``--resume-dir`` needs a block solver and a directory (new or holding earlier units)."""
    if resume_dir is None:
        return
    if method.solver(config) is None:
        raise DitqError(
            f"--resume-dir keeps blocks solved by reconstruction or GPTQ; --method "
            f"{method.name} with these settings solves none (drop --resume-dir)"
        )
    if Path(resume_dir).exists() and not Path(resume_dir).is_dir():
        raise DitqError(f"--resume-dir {resume_dir!r} is a file; name a directory")


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    method = METHODS[args.method]
    _check_method_flags(method, args)
    config = method_config(method, args)
    _check_resume_dir(method, config, args.resume_dir)
    inputs = [p for p in (args.model, args.calib_set) if p]
    check_output(args.out, QUANTIZED_DIR, overwrite=args.overwrite, inputs=inputs)
    if args.save_calib_set:
        check_output(
            args.save_calib_set,
            CALIBRATION_SET_FILE,
            overwrite=args.overwrite,
            inputs=inputs,
            flag="--save-calib-set",
        )
    progress = not args.quiet
    prompts = read_prompts(args.calib_prompts, "--calib-prompts") if args.calib_prompts else None
    model = load_model(args.model, progress=progress, prompts=prompts, **model_kwargs(args))
    _check_overrides_match(config, config.layers.names(model))
    layers_to_wrap(model, config)  # shapes vs group sizes, before any work
    note = method.unpublished_setting(config)
    if note and config.abits <= 4:  # the seed methods collapse there (RESULTS.md)
        note += '; for 4-bit activations use --method svdquant (README, "W4A4")'
    if note:
        _say(f"note: {note}")
    settings = calib_settings(method, args, model.num_classes)
    if args.calib_set:
        calib = CalibrationSet.load(args.calib_set)
        calib.check_matches(model)
        calib_meta = calib.meta
    else:
        if progress:
            for line in describe_calibration(settings, args.calib_preset, args.device):
                _say(line)
        calib = settings.build(
            model, batch_size=args.batch_size, device=args.device, progress=progress
        )
        calib_meta = {
            **calib.meta,
            "settings": settings.to_dict(),
            "preset": args.calib_preset,
        }
        if args.save_calib_set:
            calib.save(args.save_calib_set, overwrite=args.overwrite)
    calib_seconds = time.perf_counter() - start
    if args.resume_dir:
        Path(args.resume_dir).mkdir(parents=True, exist_ok=True)
    quantize(
        model,
        config,
        calib,
        batch_size=args.batch_size,
        progress=progress,
        calibration=calib_meta,
        calib_seconds=calib_seconds,
        command=" ".join(["ditq", *sys.argv[1:]]) if sys.argv else "",
        resume_dir=args.resume_dir,
    )
    save(model, args.out, overwrite=args.overwrite)
    report = record_of(model).report
    weight_sqnr, total = report["weight_sqnr_db"], report["wall_time_s"]["total"]
    solver = report["method"].get("reconstruction", {}).get("solver", "a solver")
    sqnr_text = (
        f"mean weight SQNR {sum(weight_sqnr.values()) / len(weight_sqnr):.1f} dB"
        if weight_sqnr
        else f"weight SQNR n/a (rounding solved by {solver})"
    )
    attention = f"A{config.attn_bits}" if config.attn_bits < 16 else "float"
    formats = [
        f"{role} {fmt}"
        for role, fmt in (("weights", config.w_fmt), ("activations", config.a_fmt))
        if fmt != "int"
    ]
    bits = f"W{config.wbits}A{config.abits}" + (f" ({', '.join(formats)})" if formats else "")
    print(
        f"{method.name} {bits}: {len(quantized_layers(model))} layers, "
        f"attention matmuls {attention}, calibration {len(calib)} entries at "
        f"{len(calib.timesteps())} timesteps, {sqnr_text}, {total:.1f} s -> {args.out}"
    )
