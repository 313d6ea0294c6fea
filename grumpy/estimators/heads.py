"""Pooling, the linear head and the losses, each with its hand-written backward pass.

Everything here is a pure function of arrays, so each piece can be checked against
finite differences on its own. Shapes: T steps, B sequences, C = D * H channels of the
GRU's output (D = 2 if bidirectional), K outputs.
"""

from __future__ import annotations

import numpy as np

POOLINGS = ("last", "mean")


def _last_index(lengths: np.ndarray | None, T: int, B: int) -> np.ndarray:
    return np.full(B, T - 1) if lengths is None else np.asarray(lengths) - 1


def pool_forward(out: np.ndarray, lengths: np.ndarray | None, pooling: str, num_directions: int) -> np.ndarray:
    """Reduce the GRU's output (T, B, C) to one vector per sequence (B, C).

    "last": the state after each sequence's last valid step. For a bidirectional layer
    the reverse direction's last state is its output at t = 0 (it runs from the end
    back to the start), so its half of the channels is taken there.
    "mean": the mean over the valid steps (steps t < lengths[b]).
    ``lengths`` (B,) or None when every sequence fills all T steps.
    """
    T, B, C = out.shape
    if pooling == "last":
        H = C // num_directions
        pooled = out[_last_index(lengths, T, B), np.arange(B)].copy()
        if num_directions == 2:
            pooled[:, H:] = out[0, :, H:]
        return pooled
    if pooling == "mean":
        if lengths is None:
            return out.mean(axis=0)
        mask = np.arange(T)[:, None] < np.asarray(lengths)[None, :]
        # The layer already outputs zeros past each length; the mask keeps this exact anyway.
        total = (out * mask[..., None]).sum(axis=0)
        return total / np.asarray(lengths, dtype=out.dtype)[:, None]
    raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")


def pool_backward(d_pooled: np.ndarray, lengths: np.ndarray | None, pooling: str, num_directions: int,
                  T: int) -> np.ndarray:
    """Backward of :func:`pool_forward`: d_pooled (B, C) -> d_out (T, B, C)."""
    B, C = d_pooled.shape
    d_out = np.zeros((T, B, C), d_pooled.dtype)
    if pooling == "last":
        H = C // num_directions
        d_out[_last_index(lengths, T, B), np.arange(B), :H] = d_pooled[:, :H]
        if num_directions == 2:
            d_out[0, :, H:] = d_pooled[:, H:]
        return d_out
    if pooling == "mean":
        n = np.full(B, T) if lengths is None else np.asarray(lengths)
        mask = np.arange(T)[:, None] < n[None, :]
        d_out[...] = (d_pooled / n[:, None].astype(d_pooled.dtype))[None]
        d_out *= mask[..., None]
        return d_out
    raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")


def linear_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """y = x Wᵀ + b: x (B, C), weight (K, C), bias (K,) -> (B, K), as torch.nn.Linear."""
    return x @ weight.T + bias


def linear_backward(d_y: np.ndarray, x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`linear_forward`: d_y (B, K) -> d_x (B, C), d_weight (K, C), d_bias (K,)."""
    return d_y @ weight, d_y.T @ x, d_y.sum(axis=0)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, K) logits; shifting by the row maximum keeps exp() finite."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of (B, K) logits against integer labels (B,) in [0, K).

    Returns the loss and its gradient with respect to the logits, (softmax − onehot) / B.
    The log-probabilities come from log-sum-exp, not log(softmax), so a confident
    wrong answer gives a large finite loss rather than log(0).
    """
    B = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    loss = float(np.mean(log_z - shifted[np.arange(B), labels]))
    d_logits = np.exp(shifted - log_z[:, None])
    d_logits[np.arange(B), labels] -= 1.0
    d_logits /= B
    return loss, d_logits


def mean_squared_error(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean over all entries of (pred − target)², pred and target (B, K), as Keras's "mse".
    Returns the loss and its gradient 2 (pred − target) / (B K)."""
    diff = pred - target
    return float(np.mean(diff * diff)), (2.0 / diff.size) * diff
