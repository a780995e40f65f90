"""``ditq bench``: latency, sampling time, memory and weight bytes of BF16 and low-bit DiTs
(:mod:`ditq.eval.speed` measures; this module parses flags and writes bench.json/bench.md)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ditq.api import load_model
from ditq.cli.common import default_device, parse_names
from ditq.errors import DitqError
from ditq.eval.speed import (
    AS_QUANTIZED,
    DEFAULT_SHAPES,
    TORCHAO,
    VARIANTS,
    BenchSettings,
    add_ratios,
    bench_variant,
    float_architecture,
    markdown,
    shape_model,
    torchao_available,
)
from ditq.io import OutputKind, atomic_path, check_output
from ditq.kernels import COMPILE_SCOPES, DEFAULT_COMPILE_SCOPE, use_cuda_graphs
from ditq.models.dit import DiT
from ditq.pipeline.checkpoint import is_quantized_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time BF16 and low-bit DiTs",
        description="Per-denoiser-call latency (median), 50-step sampling time, peak memory "
        "and weight bytes of BF16 and quantized variants; JSON and a markdown table.",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated ARCH@PIXELS or 'testbed', random weights (default "
        f"{DEFAULT_SHAPES}; "
        "none when --model is given)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="checkpoint, or a directory written by ditq quantize: variant 'quantized' times "
        "it as saved, the others its float architecture (repeatable)",
    )
    parser.add_argument("--batches", default="1,16,64", help="images per batch (×2 with cfg)")
    parser.add_argument(
        "--variants", default=None, help=f"comma-separated subset of {VARIANTS} (default all)"
    )
    parser.add_argument("--iters", type=int, default=20, help="timed denoiser calls")
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed calls per warm-up round; rounds repeat until the call time settles "
        "(compilation and Triton autotuning done; the count is reported); 0 = none",
    )
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps end to end (0: skip)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the quantized and torchao variants (default: on CUDA)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay the compiled graphs as CUDA graphs (mode='reduce-overhead'), baseline "
        "included: no per-kernel launch cost on the host, which binds the quantized calls "
        "(default: on where compiling on a GPU, as ditq sample --compile)",
    )
    parser.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        default=DEFAULT_COMPILE_SCOPE,
        help="what one compiled graph (and CUDA graph) covers: the whole denoiser call "
        "(default, as ditq sample --compile: one CUDA-graph replay per call) or each block",
    )
    parser.add_argument(
        "--fuse-mlp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each fusable MLP of the int variants as one fc1 kernel writing fc2's int8 "
        "input (GELU and quantization in the epilogue), as the cuda backend does; "
        "--no-fuse-mlp times the unfused kernels",
    )
    parser.add_argument(
        "--int4-in-kernel",
        action="store_true",
        help="int4 weights read packed by the GEMM (unpacked in registers) instead of "
        "unpacked to int8 codes once per call (slower where timed, less peak memory: "
        "benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile a few calls per variant: time per kernel category and the top "
        "kernels (GPU kernels on CUDA, operators on the CPU)",
    )
    parser.add_argument("--device", default=default_device())
    parser.add_argument(
        "--out",
        required=True,
        help="directory for bench.json (rewritten after every measured row, so an "
        "interrupted run keeps its rows) and bench.md",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the bench.json/bench.md of an earlier bench in --out",
    )
    parser.set_defaults(run=run)


BENCH_DIR = OutputKind("ditq bench directory", True, lambda path: (path / "bench.json").is_file())


def write_bench_json(out: Path, meta: dict[str, Any], rows: list[dict], complete: bool) -> None:
    """``out/bench.json``, replaced atomically: the rows so far and whether the run ended."""
    with atomic_path(out / "bench.json") as tmp:
        tmp.write_text(json.dumps({**meta, "complete": complete, "rows": rows}, indent=2) + "\n")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise DitqError(f"{flag} takes comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise DitqError(f"{flag} needs positive integers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> None:
    batches = _int_list(args.batches, "--batches")
    variants = parse_names(args.variants or ",".join(VARIANTS), VARIANTS, "--variants")
    if args.iters < 1 or args.warmup < 0 or args.steps < 0:
        raise DitqError("--iters must be at least 1, --warmup and --steps at least 0")
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise DitqError(f"--device {args.device} needs a CUDA GPU; none is available")
    compile_models = cuda if args.compile is None else args.compile
    cuda_graphs = use_cuda_graphs(args.cuda_graphs, compile_models, args.device)
    if not torchao_available():
        variants = [v for v in variants if v not in TORCHAO]
    shapes = args.shapes if args.shapes is not None else ("" if args.model else DEFAULT_SHAPES)
    sources: list[tuple[str, Callable[[], DiT]]] = [
        (s.strip(), partial(shape_model, s.strip())) for s in shapes.split(",") if s.strip()
    ]
    sources += [(m, partial(load_model, m, progress=False)) for m in args.model]
    if not sources:
        raise DitqError("nothing to time: pass --shapes ARCH@PIXELS and/or --model PATH")
    quantized_runs = [m for m in args.model if is_quantized_dir(m)]
    if args.variants is not None and AS_QUANTIZED in variants and not quantized_runs:
        raise DitqError(
            f"--variants {AS_QUANTIZED} times a directory written by ditq quantize: pass it "
            "with --model RUN"
        )
    check_output(args.out, BENCH_DIR, overwrite=args.overwrite, inputs=args.model)
    device_name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "steps": args.steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings(
        device=args.device,
        iters=args.iters,
        warmup=args.warmup,
        steps=args.steps,
        profile=args.profile,
        compile=compile_models,
        fuse_mlp=args.fuse_mlp,
        cuda_graphs=cuda_graphs,
        int4_in_kernel=args.int4_in_kernel,
        compile_scope=args.compile_scope,
    )
    rows = []
    float_variants = any(v != AS_QUANTIZED for v in variants)
    for name, make in sources:
        base = make()
        float_base = float_architecture(base) if name in quantized_runs and float_variants else base
        for variant in variants:
            if variant == AS_QUANTIZED and name not in quantized_runs:
                continue  # the other sources are float models
            model = base if variant == AS_QUANTIZED else float_base
            for row in bench_variant(model, variant, batches, settings):
                rows.append({"shape": name, **row})
                print(json.dumps(rows[-1]), flush=True)
                write_bench_json(out, meta, rows, complete=False)
    add_ratios(rows)
    write_bench_json(out, meta, rows, complete=True)
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(markdown(rows, device_name))
    print(markdown(rows, device_name))
