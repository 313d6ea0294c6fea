"""``grumpy experiment``: the gated-versus-plain experiments of :mod:`grumpy.experiments`."""

from __future__ import annotations

import argparse
from typing import Any

from grumpy.experiments import EXPERIMENTS, run_experiment


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "experiment", help="run an experiment: gradient flow, adding problem, state Jacobian",
        description="Experiments comparing the GRU with a plain tanh RNN (see docs/experiments.md).",
    )
    p.add_argument("name", choices=list(EXPERIMENTS), help="which experiment")
    p.add_argument("--quick", action="store_true", help="CI-sized run (well under a minute)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="experiment-results", metavar="DIR",
                   help="directory for NAME.json and NAME.png (default: experiment-results)")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    run_experiment(args.name, args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite)
    return 0
