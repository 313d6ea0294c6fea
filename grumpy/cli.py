"""The ``grumpy`` command: a thin argparse front end over plain functions.

Each subcommand is registered by the module that implements it, through a
``register(subparsers)`` function that adds its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


class UsageError(Exception):
    """A bad argument or input file: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from grumpy import __version__

    parser = argparse.ArgumentParser(
        prog="grumpy",
        description="Train, sample and evaluate GRU character-level language models, in NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"grumpy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _registrars():
        register(sub)
    return parser


def _registrars():  # type: ignore[no-untyped-def]
    # Imported here so that `import grumpy` stays NumPy-only and fast.
    from grumpy import bench, experiments, onnx_export, train

    return [train.register, onnx_export.register, experiments.register, bench.register]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"grumpy {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
