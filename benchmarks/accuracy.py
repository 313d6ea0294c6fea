"""Worst errors of grumpy.GRU's gradients and outputs over the test grid.

Prints the largest relative error (max |a - b| / max |b|, per tensor) of every
gradient against central finite differences in float64, and of outputs, final
states and every gradient against PyTorch in float64 and float32, over the
option grid the tests use (both forms, bias, 1-3 layers, directions, lengths,
batch_first), through the tests' own problem builders and references
(tests/gru_helpers.py). The tests assert the bounds; this prints the figures.

    python benchmarks/accuracy.py
"""

import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import gru_helpers as H  # noqa: E402


def finite_difference_worst() -> float:
    worst = 0.0
    for cfg in H.GRID:
        gru, x, h0, lengths, w_out, w_hn = H.make_problem(**cfg)
        gru.forward(x, h0, lengths=lengths)
        dx, dh0 = gru.backward(w_out, w_hn)
        problem: tuple[Any, ...] = (gru, x, h0, lengths, w_out, w_hn)

        def f(p: tuple[Any, ...] = problem) -> float:
            return H.loss_of(*p)

        errs = [H.rel_err(dx, H.numeric_grad(f, x)), H.rel_err(dh0, H.numeric_grad(f, h0))]
        errs += [H.rel_err(gru.grads[k], H.numeric_grad(f, p)) for k, p in gru.params.items()]
        worst = max(worst, *errs)
    return worst


def torch_worst(dtype: type) -> float:
    return max(max(H.torch_errors(cfg, dtype, "nn.GRU" if cfg["reset_after"] else "loop").values())
               for cfg in H.GRID)


if __name__ == "__main__":
    print(f"configurations: {len(H.GRID)}")
    print(f"finite differences (float64), worst relative error: {finite_difference_worst():.2e}  (bound 1e-6)")
    print(f"PyTorch, float64, worst relative error:              {torch_worst(np.float64):.2e}  (bound 1e-9)")
    print(f"PyTorch, float32, worst relative error:              {torch_worst(np.float32):.2e}  (bound 1e-4)")
