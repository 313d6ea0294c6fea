"""The plain (Elman) tanh RNN: the baseline the GRU's gates are measured against.

One step, for each layer and direction::

    h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)

The sequence kernels follow the conventions of :mod:`grumpy.kernels` (time in
the input's order, states in one (T+1, B, H) array ``hs``, ``mask`` (T, B, 1) of
ones and zeros for variable lengths), so :class:`grumpy.layers.RecurrentStack`
stacks them, runs both directions and handles lengths and dropout exactly as it
does for the GRU. Parameter names and shapes are those of ``torch.nn.RNN``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from grumpy.kernels.blas import column_sums, matmul
from grumpy.kernels.common import state_views
from grumpy.layers import BackwardKernel, ForwardKernel, RecurrentStack, StackCache, stack_backward, stack_forward


class RNNSeqCache(NamedTuple):
    x: np.ndarray  # (T, B, I) input
    hs: np.ndarray  # (T+1, B, H) states, laid out as in grumpy.kernels
    mask: np.ndarray | None  # (T, B, 1)
    reverse: bool


def rnn_sequence_forward(
    x: np.ndarray,
    h0: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    bias_ih: np.ndarray | None,
    bias_hh: np.ndarray | None,
    *,
    reverse: bool = False,
    mask: np.ndarray | None = None,
    keep_cache: bool = True,
    workspace: dict[str, np.ndarray] | None = None,  # the shared kernel signature; unused here
) -> tuple[np.ndarray, np.ndarray, RNNSeqCache | None]:
    """x (T, B, I), h0 (B, H) -> output (T, B, H), h_last (B, H), cache.

    ``mask`` (T, B, 1) must hold only ones and zeros: the backward pass reads
    tanh' from the stored states, which are the cell's output only at valid steps.
    """
    T, B, _ = x.shape
    H = h0.shape[-1]
    dt = x.dtype

    # All input projections, and both biases, in one product before the loop.
    gi = matmul(x.reshape(T * B, -1), weight_ih.T).reshape(T, B, H)
    if bias_ih is not None:
        gi += bias_ih
    if bias_hh is not None:
        gi += bias_hh
    whh_t = np.ascontiguousarray(weight_hh.T)  # products on a transposed view run slower

    hs = np.empty((T + 1, B, H), dt)
    hs[T if reverse else 0] = h0
    a = np.empty((B, H), dt)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        h_prev = hs[t + 1] if reverse else hs[t]
        h_new = hs[t] if reverse else hs[t + 1]
        matmul(h_prev, whh_t, a)
        a += gi[t]
        if mask is None:
            np.tanh(a, out=h_new)
        else:
            # padded steps keep the previous state: h' = h + m (tanh(a) − h)
            np.tanh(a, out=a)
            a -= h_prev
            a *= mask[t]
            np.add(h_prev, a, out=h_new)

    _, h_out = state_views(hs, reverse)
    output = h_out * mask if mask is not None else h_out.copy()
    h_last = hs[0 if reverse else T].copy()
    return output, h_last, RNNSeqCache(x, hs, mask, reverse) if keep_cache else None


def rnn_sequence_backward(
    d_output: np.ndarray,
    d_h_last: np.ndarray | None,
    cache: RNNSeqCache,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    *,
    bias: bool = True,
    consume: bool = False,  # the shared kernel signature; this kernel never overwrites its cache
    need_dx: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, dict[str, np.ndarray]]:
    """d_output (T, B, H), d_h_last (B, H) or None -> dx (T, B, I), dh0 (B, H), grads.

    grads holds ``weight_ih``, ``weight_hh`` and, with ``bias``, ``bias_ih`` and
    ``bias_hh`` (equal, as both enter the same sum), each summed over all steps.
    """
    x, hs, mask, reverse = cache
    T, B, _ = x.shape
    H = hs.shape[-1]
    dt = x.dtype
    h_in, h_out = state_views(hs, reverse)

    dA = np.empty((T, B, H), dt)  # gradients of the pre-activations a_t
    dh = np.zeros((B, H), dt) if d_h_last is None else np.array(d_h_last, dt)
    tmp = np.empty((B, H), dt)
    steps = range(T) if reverse else range(T - 1, -1, -1)
    for t in steps:
        da = dA[t]
        if mask is not None:
            dh += d_output[t] * mask[t]
            np.multiply(dh, mask[t], out=da)  # the part of dh that flows through the cell
            dh -= da  # ... and the part that skips a padded step
        else:
            np.add(dh, d_output[t], out=da)
            dh.fill(0)
        # h' = tanh(a): da = dh' (1 − h'²); at padded steps da is already 0
        np.multiply(h_out[t], h_out[t], out=tmp)
        np.subtract(1.0, tmp, out=tmp)
        da *= tmp
        matmul(da, weight_hh, dh, beta=1.0)

    dA2 = dA.reshape(T * B, H)
    dx = matmul(dA2, weight_ih).reshape(x.shape) if need_dx else None
    grads = {
        "weight_ih": matmul(dA2.T, x.reshape(T * B, -1)),
        "weight_hh": matmul(dA2.T, h_in.reshape(T * B, H)),
    }
    if bias:
        db = column_sums(dA2)
        grads["bias_ih"] = db
        grads["bias_hh"] = db.copy()
    return dx, dh, grads


class RNN(RecurrentStack):
    r"""A multi-layer tanh RNN with hand-written backpropagation through time.

    For each layer and direction, with x_t the input and h the previous state::

        h_t = tanh(W_ih x_t + b_ih + W_hh h + b_hh)

    The same options, shapes and behaviour as :class:`grumpy.GRU` (stacking,
    bidirectional, ``lengths``, dropout between layers, batch_first, train/eval),
    and the parameters of ``torch.nn.RNN(nonlinearity="tanh")``: ``weight_ih_l{k}``
    (H, I or D*H), ``weight_hh_l{k}`` (H, H), ``bias_ih_l{k}`` (H,),
    ``bias_hh_l{k}`` (H,), with the ``_reverse`` suffix for the reverse direction.

    Initialisation: U(−1/√H, 1/√H) as PyTorch, or ``init="orthogonal"`` for an
    orthogonal W_hh. ``seed`` makes initialisation and dropout reproducible.
    """

    num_gates = 1

    def _kernels(self) -> tuple[ForwardKernel, BackwardKernel]:
        return rnn_sequence_forward, rnn_sequence_backward


def rnn_forward(
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    h0: np.ndarray,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    mask: np.ndarray | None = None,
    dropout_masks: Sequence[np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, StackCache]:
    """The RNN stack as a pure function: time-major x (T, B, I), h0 (L*D, B, H)
    -> output (T, B, D*H), h_n (L*D, B, H), cache for :func:`rnn_backward`."""
    out, h_n, cache = stack_forward(rnn_sequence_forward, params, x, h0, num_layers=num_layers,
                                    bidirectional=bidirectional, mask=mask, dropout_masks=dropout_masks)
    assert cache is not None
    return out, h_n, cache


def rnn_backward(
    params: Mapping[str, np.ndarray],
    cache: StackCache,
    d_output: np.ndarray,
    d_h_n: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Backward of :func:`rnn_forward` -> d_x (T, B, I), d_h0 (L*D, B, H), grads
    keyed as the parameters."""
    bias = any(k.startswith("bias") for k in params)
    dx, dh0, grads = stack_backward(rnn_sequence_backward, params, cache, d_output, d_h_n, bias=bias)
    assert dx is not None
    return dx, dh0, grads
