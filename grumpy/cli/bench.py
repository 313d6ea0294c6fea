"""``grumpy bench``: runs the benchmark harness, ``benchmarks/bench.py`` of the source checkout.

The harness (worker processes, the torch and JAX models, the report) is a tool
of the repository, not of the library, so it is not installed with the package;
``grumpy bench ARGS`` is ``python benchmarks/bench.py ARGS``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any


def _harness() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "benchmarks", "bench.py")
    if not os.path.isfile(path):
        raise ValueError("the benchmark harness (benchmarks/bench.py) comes with the source checkout: "
                         "clone the repository and install it with pip install -e .")
    return path


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", add_help=False, prefix_chars="\0",  # every argument, --help included, goes to the harness
        help="benchmark grumpy's GRU against PyTorch (and JAX/Flax when installed); --help for its options",
        description="Runs benchmarks/bench.py of the source checkout with these arguments.",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="the harness's arguments (grumpy bench --help)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    spec = importlib.util.spec_from_file_location("grumpy_bench_harness", _harness())
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    return int(harness.main(list(args.args)))
