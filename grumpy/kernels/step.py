"""One GRU step without a cache, for generation (one character at a time)."""

from __future__ import annotations

import numpy as np

from grumpy.cell import gru_cell_forward
from grumpy.kernels.blas import matmul
from grumpy.kernels.common import biases
from grumpy.kernels.route import STEP_BLAS_MIN, compiled_kernels, use_compiled


def gru_step(
    x: np.ndarray,
    h: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    bias_ih: np.ndarray | None = None,
    bias_hh: np.ndarray | None = None,
    *,
    reset_after: bool = True,
) -> np.ndarray:
    """One GRU step: x (I,) or (B, I), h (H,) or (B, H) -> the new state, shaped like h.

    A single float32 stream (x 1-d) runs one compiled pass (:func:`step_into`), which
    below ``STEP_BLAS_MIN`` skips the zeros of a mostly-zero x (a one-hot character);
    anything else goes through the reference :func:`grumpy.cell.gru_cell_forward`.
    """
    x = np.asarray(x)
    h = np.asarray(h)
    dt = h.dtype
    if x.ndim == 1 and h.ndim == 1 and x.dtype == dt and weight_hh.dtype == dt and use_compiled(dt, reset_after):
        return step_into(np.ascontiguousarray(x), np.ascontiguousarray(h), weight_ih, weight_hh, bias_ih, bias_hh,
                         np.empty_like(h))
    H = h.shape[-1]
    h_new, _ = gru_cell_forward(
        x.reshape(-1, x.shape[-1]), h.reshape(-1, H), weight_ih, weight_hh, bias_ih, bias_hh,
        reset_after=reset_after,
    )
    return h_new.reshape(h.shape)


def step_into(
    x: np.ndarray,
    h: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    bias_ih: np.ndarray | None,
    bias_hh: np.ndarray | None,
    out: np.ndarray,
) -> np.ndarray:
    """The compiled step of one float32 stream, for callers that checked their arrays:
    x (I,), h (H,) contiguous float32 -> out (H,), which must not overlap h; returns out.

    The three gates' matrix-vector products and the gate math run fused in one pass
    with no temporaries; from ``STEP_BLAS_MIN`` on, BLAS's matrix-vector products run
    on all cores, then the gates.
    """
    nb = compiled_kernels()
    assert nb is not None
    H = h.shape[0]
    b_ih, b_hh = biases(bias_ih, bias_hh, H, h.dtype)
    if H >= STEP_BLAS_MIN:  # the weights stream from memory: every core reads a share
        nb.step_gates(matmul(weight_ih, x), matmul(weight_hh, h), b_ih, b_hh, h, out)
    else:
        nb.step_serial(x, h, np.ascontiguousarray(weight_ih), np.ascontiguousarray(weight_hh), b_ih, b_hh, out)
    return out


class GRUStep:
    """One GRU layer prepared for generation: calling it, ``step(x, h)`` with x (I,) and
    h (H,), gives the new state (H,), the same function as :func:`gru_step`.

    For float32 below ``STEP_BLAS_MIN`` it keeps transposed copies of the weights for
    the compiled step (long contiguous loops instead of row dot products, skipping the
    rows that zeros of x and h select), so it is a snapshot of the weights then: build a
    new one after they change. Other inputs go to :func:`gru_step` with the weights as
    they are at the call.
    """

    def __init__(
        self,
        weight_ih: np.ndarray,
        weight_hh: np.ndarray,
        bias_ih: np.ndarray | None = None,
        bias_hh: np.ndarray | None = None,
        *,
        reset_after: bool = True,
    ) -> None:
        self.args = (weight_ih, weight_hh, bias_ih, bias_hh)
        self.reset_after = reset_after
        H = weight_hh.shape[-1]
        dt = weight_hh.dtype
        self._fast = (
            use_compiled(dt, reset_after) and H < STEP_BLAS_MIN and weight_ih.dtype == dt
            and weight_ih.ndim == weight_hh.ndim == 2
        )
        if self._fast:
            b_ih, b_hh = biases(bias_ih, bias_hh, H, dt)
            self._prepared = (
                np.ascontiguousarray(weight_ih.T), np.ascontiguousarray(weight_hh.T),
                np.ascontiguousarray(b_ih, dt), np.ascontiguousarray(b_hh, dt),
                np.empty((2, 3 * H), dt),
            )

    def __call__(self, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        h = np.asarray(h)
        w_ih, w_hh = self.args[:2]
        nb = compiled_kernels()
        if (self._fast and nb is not None and x.shape == (w_ih.shape[1],) and h.shape == (w_hh.shape[1],)
                and x.dtype == h.dtype == w_hh.dtype):
            out = np.empty_like(h)
            nb.step_transposed(np.ascontiguousarray(x), np.ascontiguousarray(h), *self._prepared, out)
            return out
        return gru_step(x, h, *self.args, reset_after=self.reset_after)


def steps_forward(
    x: np.ndarray,
    h0: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    bias_ih: np.ndarray | None,
    bias_hh: np.ndarray | None,
    reverse: bool,
    mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``step`` route: x (T, B, I), h0 (B, H), mask (T, B, 1) or None -> output
    (T, B, H), h_last (B, H), by :func:`gru_step` at each step (inference only). A
    layer's one step of one stream skips this loop (grumpy.layers.stack_step)."""
    T, B, _ = x.shape
    out = np.empty((T, B, h0.shape[-1]), h0.dtype)
    h = h0
    for t in range(T - 1, -1, -1) if reverse else range(T):
        # one stream as 1-d vectors: the compiled generation step
        h_new = gru_step(x[t, 0], h[0], weight_ih, weight_hh, bias_ih, bias_hh)[None] if B == 1 else \
            gru_step(x[t], h, weight_ih, weight_hh, bias_ih, bias_hh)
        if mask is not None:
            h_new = h + mask[t] * (h_new - h)
            out[t] = mask[t] * h_new
        else:
            out[t] = h_new
        h = h_new
    return out, np.array(h)
