"""Streaming: a GRU stack advanced one step at a time for a batch of independent streams.

``GRU.forward`` wants the whole sequence. A server that answers many users, or a
generator that feeds each output back as the next input, has one step at a time::

    stream = grumpy.GRUStream(gru)          # prepare once (a snapshot of the weights)
    h = stream.initial_state(B)             # zeros (num_layers, B, H)
    out_t, h = stream.step(x_t, h)          # x_t (B, I) -> out_t (B, H), h (num_layers, B, H)
    h = stream.reset(h, [2, 5])             # streams 2 and 5 start over (their state is zeroed)

Running ``step`` over x[0], x[1], ... gives ``GRU.forward(x)``'s outputs, to float32
rounding (tests/test_stream.py). Only unidirectional stacks can stream: the reverse
direction of a bidirectional layer needs the end of the sequence before its first output.
The int8 and bfloat16 copies from :func:`grumpy.quantize` have the same three methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from grumpy.layers import GRU


def check_streamable(gru: Any) -> None:
    """Raise ValueError for a stack that cannot run step by step (bidirectional)."""
    if gru.bidirectional:
        raise ValueError(
            "a bidirectional GRU cannot stream: its reverse direction reads the sequence from the end, "
            "so no output exists before the last input; run forward() on whole sequences instead"
        )


class StreamState:
    """The state handling shared by :class:`GRUStream` and the quantized copies:
    subclasses set ``num_layers``, ``hidden_size``, ``input_size`` and ``dtype``."""

    num_layers: int
    hidden_size: int
    input_size: int
    dtype: np.dtype

    def initial_state(self, batch_size: int) -> np.ndarray:
        """Zeros (num_layers, batch_size, H): the state of a fresh stream."""
        return np.zeros((self.num_layers, int(batch_size), self.hidden_size), self.dtype)

    def reset(self, h: np.ndarray, rows: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Zero the state of streams ``rows`` (indices into the batch, or a boolean mask
        (B,)) in h (num_layers, B, H), in place; returns h. The other streams go on."""
        h[:, rows] = 0
        return h

    def _check_step(self, x_t: Any, h: Any) -> tuple[np.ndarray, np.ndarray]:
        x_t = np.asarray(x_t)
        if x_t.ndim != 2 or x_t.shape[1] != self.input_size:
            raise ValueError(f"x_t: expected shape (B, {self.input_size}), got {x_t.shape}")
        B = x_t.shape[0]
        if h is None:
            h = self.initial_state(B)
        h = np.asarray(h)
        if h.shape != (self.num_layers, B, self.hidden_size):
            raise ValueError(f"h: expected shape ({self.num_layers}, {B}, {self.hidden_size}) "
                             f"(num_layers, B, H), got {h.shape}")
        return np.ascontiguousarray(x_t, self.dtype), np.ascontiguousarray(h, self.dtype)


class GRUStream(StreamState):
    """A unidirectional :class:`grumpy.GRU` prepared for streaming (inference: no dropout).

    ``step(x_t, h)``: x_t (B, I), h (num_layers, B, H) or None for fresh streams ->
    (out_t (B, H), the new h (num_layers, B, H)); out_t is the top layer's new state,
    as ``forward`` outputs it. A snapshot: build a new one after the weights change.
    Bidirectional stacks raise ValueError.
    """

    def __init__(self, gru: GRU) -> None:
        if not isinstance(gru, GRU):
            raise ValueError(f"GRUStream: expected a grumpy.GRU, got {type(gru).__name__}")
        check_streamable(gru)
        self.num_layers, self.hidden_size, self.input_size = gru.num_layers, gru.hidden_size, gru.input_size
        self.dtype = gru.dtype
        self.reset_after = gru.reset_after
        p = gru.params
        self._layers = [
            tuple(p[k].copy() if k in p else None for k in
                  (f"weight_ih_l{i}", f"weight_hh_l{i}", f"bias_ih_l{i}", f"bias_hh_l{i}"))
            for i in range(self.num_layers)
        ]
        self._compiled = False
        if self.dtype == np.float32 and self.reset_after:
            from grumpy.kernels.route import compiled_kernels

            self._compiled = compiled_kernels() is not None

    def step(self, x_t: np.ndarray, h: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One step of B streams: x_t (B, I), h (num_layers, B, H) -> (out_t (B, H), new h)."""
        x, h = self._check_step(x_t, h)
        h_new = np.empty_like(h)
        for k, w in enumerate(self._layers):
            h_new[k] = self._layer_step(w, x, h[k])
            x = h_new[k]
        return h_new[-1].copy(), h_new

    def _layer_step(self, w: tuple[Any, ...], x: np.ndarray, h: np.ndarray) -> np.ndarray:
        from grumpy.cell import gru_cell_forward
        from grumpy.kernels import gru_step

        w_ih, w_hh, b_ih, b_hh = w
        if self._compiled and x.shape[0] == 1:
            # one stream: grumpy's generation step (compiled matrix-vector products)
            return gru_step(x[0], h[0], w_ih, w_hh, b_ih, b_hh)[None]
        if self._compiled:  # the gate kernel of GRU.forward's inference path
            from grumpy.kernels.blas import matmul
            from grumpy.kernels.common import biases
            from grumpy.kernels.route import compiled_kernels

            gi, gh = matmul(x, w_ih.T), matmul(h, w_hh.T)
            out = np.empty_like(h)
            nb: Any = compiled_kernels()
            nb.gates_infer_serial(gi, gh, *biases(b_ih, b_hh, self.hidden_size, self.dtype), h, out,
                                        np.empty(0, self.dtype))
            return out
        h_new, _ = gru_cell_forward(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=self.reset_after)
        return h_new.astype(self.dtype, copy=False)
