"""The ``ditq`` command line: one subcommand per job, bad input reported in one line."""

from __future__ import annotations

import argparse
import sys

from ditq import __version__
from ditq.cli import analyze, bench, demo, eval, quantize, report, sample
from ditq.errors import DitqError

SUBCOMMANDS = (demo, sample, quantize, analyze, eval, report, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditq", description="Post-training quantization of Diffusion Transformers."
    )
    parser.add_argument("--version", action="version", version=f"ditq {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ditq`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except DitqError as err:
        print(f"ditq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditq {args.command}: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
