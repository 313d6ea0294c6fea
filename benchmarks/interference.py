"""Does grumpy slow down the NumPy code around it, or the other way round?

A user's program alternates grumpy's GRU steps with its own NumPy work. This
measures, each in its own child process, alternated A B C A B C, medians:

* ``alone``: the user's own matrix product in a process that never imports grumpy;
* ``cold``: the same, with a pass over 64 MB of memory (no BLAS, one thread) between
  products, which leaves the caches as cold as a training step does;
* ``beside``: the same product in a process that runs a grumpy step between
  products (only the product is timed);
* ``step``: grumpy's step with no product of the user's between steps;
* ``step+``: the same step with the user's product between steps (only the step is timed).

grumpy's step is a training step (forward and backward), or with ``--mode infer`` an
inference pass (``forward(x, grad=False)``). The issue's targets: ``beside`` within 10%
of ``alone``, ``step+`` within 10% of ``step``.

    python benchmarks/interference.py [--mode train|infer] [--hidden 256] [--batch 32] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import numpy as np
kind, mode = sys.argv[1], sys.argv[6]
H, B, reps, n = (int(v) for v in sys.argv[2:6])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n)).astype(np.float32)
b = rng.standard_normal((n, n)).astype(np.float32)
T, I = 100, 65

def product():
    return a @ b

step = None
big = np.zeros(16 << 20, np.float32) if kind == "cold" else None
if kind not in ("alone", "cold"):
    from grumpy import GRU
    gru = GRU(I, H, seed=0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    d = rng.standard_normal((T, B, H)).astype(np.float32)

    def step():
        if mode == "infer":
            gru.forward(x, grad=False)
            return
        gru.forward(x)
        gru.backward(d, input_grad=False)

for _ in range(3):  # warm-up: compilation, buffers, thread pools
    product()
    if step is not None:
        step()
times = []
for _ in range(reps):
    if kind == "alone":
        t0 = time.perf_counter(); product(); times.append(time.perf_counter() - t0)
    elif kind == "cold":
        big += 1.0
        t0 = time.perf_counter(); product(); times.append(time.perf_counter() - t0)
    elif kind == "beside":
        step()
        t0 = time.perf_counter(); product(); times.append(time.perf_counter() - t0)
    elif kind == "step":
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
    else:  # "step+"
        product()
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps(float(np.median(times))))
"""


def measure(kind: str, H: int, B: int, reps: int, n: int, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(H), str(B), str(reps), str(n), mode],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("train", "infer"), default="train", help="grumpy's step")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="child processes per kind, alternated")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions inside each child")
    p.add_argument("--n", type=int, default=512, help="the user's product is (n, n) @ (n, n), float32")
    args = p.parse_args()
    kinds = ("alone", "cold", "beside", "step", "step+")
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            samples[k].append(measure(k, args.hidden, args.batch, args.reps, args.n, args.mode))
            time.sleep(0.3)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print("| H | B | user product alone | with cold caches | beside grumpy | beside / alone | beside / cold "
          "| grumpy step | with user product | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.hidden} | {args.batch} | {1e3 * med['alone']:.2f} ms | {1e3 * med['cold']:.2f} ms "
          f"| {1e3 * med['beside']:.2f} ms | {med['beside'] / med['alone']:.2f}x | {med['beside'] / med['cold']:.2f}x "
          f"| {1e3 * med['step']:.1f} ms | {1e3 * med['step+']:.1f} ms | {med['step+'] / med['step']:.2f}x |")
    what = "inference forward" if args.mode == "infer" else "training forward + backward"
    print(f"\nuser product: ({args.n}, {args.n}) @ ({args.n}, {args.n}) float32; step: T=100, I=65 {what}; "
          f"medians of {args.rounds} child processes x {args.reps} repetitions, alternated.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
