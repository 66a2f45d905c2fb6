"""The `leanfoem` command line.

What must stay true: every error a user can cause ends in one line on stderr naming the cause and a
non-zero exit code; `--debug` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanfoem",
        description="Quantize LLMs with FOEM/GPTQ one decoder block at a time into standard GPTQ checkpoints.")
    parser.add_argument("--version", action="version", version=f"leanfoem {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
