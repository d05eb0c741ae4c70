"""How a command group adds a subcommand: its name, help text and handler in one call."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

#: A command's handler: parsed arguments in, exit code out (errors raise; see main).
Handler = Callable[[argparse.Namespace], int]


def add_subcommand(subparsers: Any, name: str, handler: Handler, help: str,
                   example: str | None = None) -> argparse.ArgumentParser:
    """Add ``name`` (help text also its description) that runs ``handler``.

    ``example``, one command line (or a few, one per line), ends ``loraflow NAME --help``.
    """
    epilog = None
    if example:
        epilog = "example:\n" + "\n".join(f"  {line}" for line in example.splitlines())
    parser = subparsers.add_parser(name, help=help, description=help, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=handler)
    return parser
