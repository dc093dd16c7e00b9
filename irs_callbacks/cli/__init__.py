"""The ``irs`` command-line tool.

Each command module registers its sub-commands with ``register(subparsers)`` and must import
nothing heavy at module level (argparse only): ``irs threshold`` has to start in well under a
second, so torch, timm and friends are imported inside the command handlers.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from irs_callbacks import __version__

# Sub-command modules of this package, in the order their commands appear in --help.
_COMMAND_MODULES = ("stats_commands", "score_commands", "report_command")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irs",
        description="Image Retrieval Score (IRS): how much of its training set a generative model can produce.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except ValueError as error:  # bad input: a clear message, no traceback
        parser.exit(2, f"irs {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
