"""The `toolpool` command line (`toolpool <command>` or `python -m toolpool <command>`).

Each subcommand lives in its own module, listed in `COMMANDS`. A command module provides
`HELP` (one line), `configure(parser)` (adds its arguments) and `run(args) -> int` (the exit
status); adding a command is one line here and a module of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

# command name -> module implementing it
COMMANDS: dict[str, str] = {
    "top": "toolpool._top",
    "serve": "toolpool.service._cli",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command's subparser."""
    parser = argparse.ArgumentParser(
        prog="toolpool",
        description="toolpool: shared, auth-affine connection pools for AI-agent tool calls.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process arguments), run the command, return its status."""
    args = build_parser().parse_args(argv)
    status: int = args._run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
