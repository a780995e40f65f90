"""The ``ditq`` command line: one subcommand per job, bad input reported in one line."""

from __future__ import annotations

import argparse
import sys

from ditq.cli import analyze, bench, demo, eval, quantize, report, sample
from ditq.errors import DitqError
from ditq.version import __version__

SUBCOMMANDS = (demo, sample, quantize, analyze, eval, report, bench)


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
    except KeyboardInterrupt:
        print(f"ditq {args.command}: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
