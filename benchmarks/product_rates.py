"""The rates of one step's recurrent product at H=256, B=32 (32 x 256 @ 256 x 768) on this
machine: NumPy's float32 product (its BLAS, 1 and 2 threads), grumpy's portable int8
products (the path of a CPU without AVX-512 VNNI), and a large float32 product for scale.

    python benchmarks/product_rates.py

It shows what bounds reduced-precision batches where the CPU has no int8 or bfloat16
instruction faster than float32's FMA (docs/precision.md): the quantized path can only run
float32's product on the quantized values, plus the quantization of the state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import numpy as np
from threadpoolctl import threadpool_limits

from grumpy.kernels import quantized_nb


def rate(f: Callable[[], object], macs: int, reps: int) -> float:
    """G multiply-adds per second: the best of 5 timings of reps calls."""
    f()
    best = min(_time(f, reps) for _ in range(5))
    return macs / best / 1e9


def _time(f: Callable[[], object], reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps


def main() -> None:
    rng = np.random.default_rng(0)
    B, K, R = 32, 256, 768
    a = rng.standard_normal((B, K)).astype(np.float32)
    w = rng.standard_normal((K, R)).astype(np.float32)
    out = np.empty((B, R), np.float32)
    a16 = rng.integers(-127, 128, (B, K)).astype(np.int16)
    q = rng.integers(-127, 128, (R, K)).astype(np.int8)
    big = rng.standard_normal((1024, 1024)).astype(np.float32)
    macs = B * K * R
    for threads in (1, 2):
        with threadpool_limits(threads):
            small = rate(lambda: np.matmul(a, w, out=out), macs, 200)
            large = rate(lambda: big @ big, 1024**3, 5)
        print(f"float32, {threads} thread(s): {small:.1f} G multiply-adds/s at 32x256x768, {large:.1f} at 1024^3")
    for kind, fn in (("serial", quantized_nb.products_int8_serial), ("parallel", quantized_nb.products_int8_parallel)):
        r = rate(partial(fn, a16, q, out), macs, 50)
        print(f"int8 portable products, {kind}: {r:.1f} G multiply-adds/s")


if __name__ == "__main__":
    main()
