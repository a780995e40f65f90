"""``ditq sample``: images from a full-precision or quantized DiT."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ditq.api import load_model
from ditq.cli.common import add_model_args, add_sampling_args, model_kwargs, sampling_settings
from ditq.diffusion.pipeline import generate, load_scheduler, parse_classes
from ditq.distributed import gather, init_from_env, scratch_dir, shard
from ditq.errors import DitqError
from ditq.eval.grid import GRID_FILE, save_grid
from ditq.io import SAMPLES_FILE, check_output, save_samples_npz
from ditq.kernels import (
    COMPILE_SCOPES,
    DEFAULT_COMPILE_SCOPE,
    compile_denoiser,
    use_cuda_graphs,
)
from ditq.models.diffusers_pixart import pipeline_vae, set_prompts
from ditq.models.vae import load_vae
from ditq.pipeline.checkpoint import is_quantized_dir, read_manifest


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="sample images from a DiT",
        description="Sample a DiT (official sampler semantics) into an npz and/or a PNG grid. "
        "Under torchrun (torchrun --nproc-per-node K -m ditq sample ...) every process samples "
        "its slice of the sample indices and rank 0 writes the gathered result.",
    )
    add_model_args(parser)
    add_sampling_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--classes", help="labels cycled over the samples, e.g. 0,1,2")
    group.add_argument(
        "--scheduler",
        metavar="DIR",
        help="sample with one of diffusers' schedulers as DiTPipeline does (guidance on every "
        "latent channel, learned sigma dropped), from its directory or a pipeline's; default: "
        "the official DiT sampler (--sampler), whose FIDs compare with the papers'",
    )
    group.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="text-to-image models (PixArt): a prompt, repeatable; the samples cycle over "
        "them (the text encoder of the pipeline the model was quantized from encodes them)",
    )
    group.add_argument("--num-samples", type=int, default=16)
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--init-noise", help="float32 N×C×H×W .npy used as x_T")
    group.add_argument("--out", help="samples npz (ADM layout: arr_0 uint8 NHWC, arr_1 labels)")
    group.add_argument("--grid", help="PNG grid of the samples")
    group.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TF32 matmuls on CUDA (on, as the official sample.py; --no-tf32 for exact fp32)",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out npz / --grid PNG (nothing else is ever replaced)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser (minutes saved on 10k-sample GPU runs; the first "
        "batch pays the compilation)",
    )
    group.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --compile on a GPU: replay CUDA graphs (default: on; without them the "
        "quantized blocks' calls wait on the host's kernel launches)",
    )
    group.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        help="with --compile, what one graph covers: the whole denoiser call (default; with "
        "CUDA graphs one replay per call, copied out of the graph's buffers) or each block",
    )
    parser.add_argument(
        "--backend",
        help="how a quantized model runs: simulated (fake quantization) or cuda (real low-bit "
        "kernels; default when a GPU is used)",
    )
    parser.set_defaults(run=run)


def load_init_noise(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise DitqError(f"--init-noise {path!r} does not exist")
    try:
        noise = np.load(path)
    except ValueError as err:
        raise DitqError(f"--init-noise {path!r} is not a .npy array: {err}") from err
    if noise.dtype != np.float32:
        raise DitqError(f"--init-noise must be float32, got {noise.dtype}")
    return noise


def model_identity(model: str, dtype: str) -> dict[str, str]:
    """Which model made the samples, for ``ditq report``: ``fp`` and the dtype for a float
    model, else the quantization method and its bits."""
    if is_quantized_dir(model):
        manifest = read_manifest(model)
        config = manifest.get("method_config", {})
        bits = f"W{config.get('wbits')}A{config.get('abits')}"
        return {"model": str(model), "method": manifest.get("method", "?"), "bits": bits}
    return {"model": str(model), "method": "fp", "bits": dtype.upper()}


def run(args: argparse.Namespace) -> None:
    if not (args.out or args.grid):
        raise DitqError("nothing to write: pass --out FILE.npz and/or --grid FILE.png")
    if args.num_samples < 1 or args.batch_size < 1:
        raise DitqError("--num-samples and --batch-size must be at least 1")
    if args.out and args.grid and Path(args.out).resolve() == Path(args.grid).resolve():
        raise DitqError("--out and --grid name the same file; give them different paths")
    inputs = [p for p in (args.model, args.init_noise) if p]
    for flag, path, kind in (("--out", args.out, SAMPLES_FILE), ("--grid", args.grid, GRID_FILE)):
        if path:
            check_output(path, kind, overwrite=args.overwrite, inputs=inputs, flag=flag)
    init_noise = load_init_noise(args.init_noise)
    ranks = init_from_env(args.device)
    args.device = ranks.device
    graphs = use_cuda_graphs(args.cuda_graphs, args.compile, args.device)
    if args.compile_scope and not args.compile:
        raise DitqError("--compile-scope says what --compile compiles: add --compile or drop it")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = args.tf32  # official sample.py: TF32 on
        torch.backends.cudnn.allow_tf32 = args.tf32
    model = load_model(
        args.model, progress=not args.quiet, backend=args.backend, **model_kwargs(args)
    )
    if args.prompt:
        set_prompts(model, args.prompt)
    if args.compile:
        scope = args.compile_scope or DEFAULT_COMPILE_SCOPE
        compile_denoiser(model, cuda_graphs=graphs, scope=scope)
    classes = parse_classes(args.classes, model.num_classes)
    pixels = model.config.in_channels == 3
    if args.vae == "auto":
        args.vae = "none" if pixels else pipeline_vae(model) or "ema"
    if args.vae != "none" and pixels:
        raise DitqError(
            f"this model has 3 input channels (pixel space) and no VAE: drop --vae {args.vae} "
            "(or pass --vae none)"
        )
    vae = load_vae(args.vae, args.device)
    start = time.perf_counter()
    scheduler = load_scheduler(args.scheduler) if args.scheduler else None
    images, labels = generate(
        model,
        args.num_samples,
        sampling_settings(args),
        scheduler=scheduler,
        classes=classes,
        init_noise=init_noise,
        vae=vae,
        batch_size=args.batch_size,
        device=args.device,
        indices=shard(args.num_samples, ranks),
        progress=not args.quiet and ranks.is_main,
    )
    elapsed = time.perf_counter() - start
    images, labels = gather((images, labels), ranks, scratch_dir(args.out or args.grid))
    if not ranks.is_main:
        return
    if args.out:
        settings = vars(sampling_settings(args))
        if scheduler is not None:  # the sampler was the scheduler's, not settings.sampler
            settings = {**settings, "sampler": f"scheduler:{type(scheduler).__name__}"}
        meta = {**model_identity(args.model, args.dtype), "settings": settings}
        save_samples_npz(args.out, images, labels, meta=meta, overwrite=args.overwrite)
    if args.grid:
        save_grid(args.grid, images, overwrite=args.overwrite)
    written = " and ".join(p for p in (args.out, args.grid) if p)
    processes = f" on {ranks.world_size} processes" if ranks.world_size > 1 else ""
    print(f"{len(images)} samples in {elapsed:.1f} s{processes} -> {written}")
