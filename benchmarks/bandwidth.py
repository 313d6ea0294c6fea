"""The memory bound on one stream at large H: how fast can a step read W_hh at all?

A step for one stream (inference at B=1, generation) multiplies the state by the
whole recurrent weight matrix, (3H, H) float32: 12.6 MB at H=1024, read once per
step with no reuse. This times that matrix-vector product alone, through the same
MKL that grumpy uses (on one thread and on all), and prints the tokens per second
it allows: no single-stream step can beat it, whatever else it does.

    python benchmarks/bandwidth.py [H ...]      (default 1024)
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

from grumpy.kernels import blas as _blas
from grumpy.kernels.blas import matmul


def seconds_per_product(w: np.ndarray, h: np.ndarray, out: np.ndarray, one_thread: bool, n: int = 300) -> float:
    ctx = _blas.one_thread() if one_thread and _blas.MKL is not None else contextlib.nullcontext()
    with ctx:
        for _ in range(20):
            matmul(w, h, out)
        t0 = time.perf_counter()
        for _ in range(n):
            matmul(w, h, out)
        return (time.perf_counter() - t0) / n


def main(hidden: list[int]) -> None:
    print(f"MKL: {'loaded' if _blas.MKL is not None else 'not loaded (NumPy BLAS)'}, {_blas.cores()} thread(s)")
    print("| H | W_hh MB | threads | us per W_hh h | GB/s | bound, tokens/s |")
    print("|---:|---:|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for H in hidden:
        w = rng.standard_normal((3 * H, H)).astype(np.float32)
        h = rng.standard_normal(H).astype(np.float32)
        out = np.empty(3 * H, np.float32)
        for one in (True, False):
            s = seconds_per_product(w, h, out, one)
            print(f"| {H} | {w.nbytes / 1e6:.1f} | {'one' if one else 'all'} | {s * 1e6:.1f} | "
                  f"{w.nbytes / s / 1e9:.1f} | {1 / s:,.0f} |")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1024])
