"""The ``ditq`` command line: one subcommand per job, bad input reported in one line."""

from __future__ import annotations

import argparse
import re
import sys

import torch

from ditq.cli import analyze, bench, demo, eval, quantize, report, sample
from ditq.errors import DitqError
from ditq.version import __version__

SUBCOMMANDS = (demo, sample, quantize, analyze, eval, report, bench)

MEMORY_FIXES = {
    "sample": "lower --batch-size (with cfg each image runs twice)",
    "eval": "lower --batch-size",
    "analyze": "lower --batch-size",
    "quantize": "lower --batch-size (calibration) or --recon-batch-size (reconstruction)",
    "bench": "lower --batches or take a smaller --shapes",
}
"""What to change when a command runs out of GPU memory."""


def build_parser(help_method: str | None = None) -> argparse.ArgumentParser:
    """The ``ditq`` parser; ``help_method`` narrows ``quantize --help`` to one method."""
    parser = argparse.ArgumentParser(
        prog="ditq", description="Post-training quantization of Diffusion Transformers."
    )
    parser.add_argument("--version", action="version", version=f"ditq {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        if module is quantize:
            module.add_parser(subparsers, method=help_method)
        else:
            module.add_parser(subparsers)
    return parser


def _help_method(argv: list[str]) -> str | None:
    """M of ``ditq quantize ... --method M ... --help``, else None."""
    if argv[:1] != ["quantize"] or not {"-h", "--help"} & set(argv):
        return None
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ditq`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_help_method(argv))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except DitqError as err:
        print(f"ditq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as err:
        fix = MEMORY_FIXES.get(args.command, "run it with --device cpu")
        print(f"ditq {args.command}: error: {_memory_problem(err)}: {fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditq {args.command}: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    return 0


def _memory_problem(err: torch.cuda.OutOfMemoryError) -> str:
    """torch's out-of-memory message in a few words: what was asked and what was free."""
    text = str(err)
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
    free = re.search(r"of which ([\d.]+ \w+) is free", text)
    words = "out of GPU memory"
    if asked:
        words += f" (tried to allocate {asked[1]}{f', {free[1]} free' if free else ''})"
    return words


if __name__ == "__main__":
    sys.exit(main())
