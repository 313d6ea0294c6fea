"""The ``grumpy`` command: a thin argparse front end over plain functions.

One module per subcommand (``train`` also holds ``sample`` and ``eval``), each with
a ``register(subparsers)`` that adds its parser and sets ``func``. The library
raises ValueError for bad input; here, and only here, it becomes a one-line
message and exit code 2. Nothing in the package imports this one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from grumpy import __version__

    # Imported here so that `import grumpy` stays NumPy-only and fast.
    from grumpy.cli import bench, experiment, export, inspect, train

    parser = argparse.ArgumentParser(
        prog="grumpy",
        description="Train, sample and evaluate GRU character-level language models, in NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"grumpy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (train, inspect, export, experiment, bench):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"grumpy {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
