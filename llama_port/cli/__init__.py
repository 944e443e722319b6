"""The ``llama-port`` command: parity, generate, convert, bench, one module each (``NAME``, ``HELP``,
``add_arguments(parser)``, ``run(args) -> exit code``); this module only gathers them.

Exit codes: 0 success (parity: passed), 1 parity failed, 2 bad usage or unreadable input (with a
one-line reason on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import bench, convert, generate, parity
from .common import UsageError

SUBCOMMANDS = (parity, generate, convert, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-port", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llama-port {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command_parser = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        command.add_arguments(command_parser)
        command_parser.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, FileNotFoundError, ValueError) as err:
        print(f"llama-port {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


__all__ = ["UsageError", "build_parser", "main"]
