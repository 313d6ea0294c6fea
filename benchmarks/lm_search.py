"""The search behind `grumpy train`'s defaults: whole runs, each in its own process.

Each configuration is a string of `grumpy train` options (empty: today's defaults),
run once per seed for the same wall-time budget on the shipped corpus, one run at a
time. Prints one row per configuration: the best validation loss of each seed, their
mean, the steps taken and the median training speed (characters/s, evaluation left
out), and appends every run to a JSON-lines file so a long search can be resumed.

    python benchmarks/lm_search.py --budget 300 --seeds 1 2 \\
        "" "--dropout 0.2" "--hidden-size 384 --dropout 0.3"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(options: str, seed: int, budget: float) -> dict:
    """One `grumpy train` run in a fresh process; returns its summary from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "grumpy", "train", "--out", str(out), "--seed", str(seed),
               "--time-budget", str(budget), "--sample-length", "0", "--no-progress", *shlex.split(options)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    speeds = [r["chars_per_s"] for r in rows if r.get("chars_per_s")]
    best = min(evals, key=lambda r: r["val_loss"])
    return dict(options=options, seed=seed, budget=budget, best_val=best["val_loss"], best_at_s=best["elapsed"],
                steps=max(r["step"] for r in rows), chars_per_s=statistics.median(speeds),
                last_train_loss=[r["loss"] for r in rows if "loss" in r][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="grumpy train options per configuration ('' for the defaults)")
    p.add_argument("--budget", type=float, default=300.0, help="--time-budget of every run (seconds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--log", default="lm_search.jsonl",
                   help="JSON lines of finished runs; runs found there are not redone")
    args = p.parse_args()

    log = Path(args.log)
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for options in args.configs:
        for seed in args.seeds:
            if any(r["options"] == options and r["seed"] == seed and r["budget"] == args.budget for r in done):
                continue
            r = run_once(options, seed, args.budget)
            done.append(r)
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"  {options or '(defaults)'} seed {seed}: {r['best_val']:.4f} at {r['best_at_s']:.0f} s, "
                  f"{r['chars_per_s'] / 1000:.1f}k chars/s", file=sys.stderr, flush=True)

    print(f"| options (budget {args.budget:g} s) | best validation loss per seed (nats/char) | mean | steps "
          "| chars/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for options in args.configs:
        rs = [r for r in done if r["options"] == options and r["budget"] == args.budget and r["seed"] in args.seeds]
        if not rs:
            continue
        mean = statistics.mean(r["best_val"] for r in rs)
        print(f"| `{options or '(defaults)'}` | {', '.join(format(r['best_val'], '.4f') for r in rs)} | {mean:.4f} | "
              f"{round(statistics.mean(r['steps'] for r in rs))} | "
              f"{statistics.median(r['chars_per_s'] for r in rs) / 1000:.1f}k |")


if __name__ == "__main__":
    main()
