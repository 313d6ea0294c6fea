"""One GRU step, forward and backward: the readable reference.

Everything else in grumpy (the fast sequence kernels in :mod:`grumpy.kernels`)
is tested against these few lines. Gate order is r, z, n, as in PyTorch. With
``x`` the input (B, I) and ``h`` the previous state (B, H)::

    r  = σ(W_ir x + b_ir + W_hr h + b_hr)            reset gate
    z  = σ(W_iz x + b_iz + W_hz h + b_hz)            update gate
    n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))   candidate, reset_after=True
    n  = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)   candidate, reset_after=False
    h' = (1 − z) ⊙ n + z ⊙ h                         new state

``reset_after=True`` is the cuDNN / PyTorch / Keras-v2 form; ``reset_after=False``
is the form of Cho et al. (2014). They are different models. The weights are
stacked as PyTorch stacks them: ``weight_ih = [W_ir; W_iz; W_in]`` of shape
(3H, I), ``weight_hh = [W_hr; W_hz; W_hn]`` of shape (3H, H), biases (3H,).

Some texts write ``h' = (1 − z) ⊙ h + z ⊙ n``. That is the same model with the
update gate's weights and biases negated, because ``1 − σ(a) = σ(−a)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from grumpy._util import check_dtype, check_positive_int, sigmoid, uniform_init


class CellCache(NamedTuple):
    """What :func:`gru_cell_backward` needs from :func:`gru_cell_forward`."""

    x: np.ndarray  # (B, I)
    h: np.ndarray  # (B, H) previous state
    r: np.ndarray  # (B, H)
    z: np.ndarray  # (B, H)
    n: np.ndarray  # (B, H)
    hn: np.ndarray  # (B, H) W_hn h + b_hn (reset_after) or r ⊙ h (reset_before)
    reset_after: bool


def _split3(a: np.ndarray | None) -> tuple[Any, Any, Any]:
    """[A_r; A_z; A_n] -> (A_r, A_z, A_n); a missing bias is three zeros."""
    if a is None:
        return 0.0, 0.0, 0.0
    r, z, n = np.split(a, 3, axis=0)
    return r, z, n


def gru_cell_forward(
    x: np.ndarray,
    h: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    bias_ih: np.ndarray | None = None,
    bias_hh: np.ndarray | None = None,
    *,
    reset_after: bool = True,
) -> tuple[np.ndarray, CellCache]:
    """One step. x (B, I), h (B, H) -> h' (B, H) and the cache for the backward pass."""
    W_ir, W_iz, W_in = _split3(weight_ih)
    W_hr, W_hz, W_hn = _split3(weight_hh)
    b_ir, b_iz, b_in = _split3(bias_ih)
    b_hr, b_hz, b_hn = _split3(bias_hh)

    r = sigmoid(x @ W_ir.T + b_ir + h @ W_hr.T + b_hr)
    z = sigmoid(x @ W_iz.T + b_iz + h @ W_hz.T + b_hz)
    if reset_after:
        hn = h @ W_hn.T + b_hn
        n = np.tanh(x @ W_in.T + b_in + r * hn)
    else:
        hn = r * h
        n = np.tanh(x @ W_in.T + b_in + hn @ W_hn.T + b_hn)
    h_new = (1 - z) * n + z * h
    return h_new, CellCache(x, h, r, z, n, hn, reset_after)


def gru_cell_backward(
    d_h_new: np.ndarray,
    cache: CellCache,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Gradients of one step by the chain rule, one line per factor.

    d_h_new (B, H) -> dx (B, I), dh (B, H), and parameter gradients keyed
    ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``.
    """
    x, h, r, z, n, hn, reset_after = cache
    W_ir, W_iz, W_in = _split3(weight_ih)
    W_hr, W_hz, W_hn = _split3(weight_hh)

    # h' = (1 − z) n + z h
    dn = d_h_new * (1 - z)
    dz = d_h_new * (h - n)
    dh = d_h_new * z
    # pre-activations: n = tanh(a_n), z = σ(a_z), r = σ(a_r)
    da_n = dn * (1 - n * n)
    da_z = dz * z * (1 - z)
    if reset_after:
        # a_n = W_in x + b_in + r ⊙ hn, hn = W_hn h + b_hn
        d_hn = da_n * r
        dr = da_n * hn
        dh += d_hn @ W_hn
        dW_hn = d_hn.T @ h
        db_hn = d_hn.sum(0)
    else:
        # a_n = W_in x + b_in + W_hn (r ⊙ h) + b_hn
        d_rh = da_n @ W_hn
        dr = d_rh * h
        dh += d_rh * r
        dW_hn = da_n.T @ hn
        db_hn = da_n.sum(0)
    da_r = dr * r * (1 - r)
    dh += da_r @ W_hr + da_z @ W_hz
    dx = da_r @ W_ir + da_z @ W_iz + da_n @ W_in

    grads = {
        "weight_ih": np.concatenate([da_r.T @ x, da_z.T @ x, da_n.T @ x]),
        "weight_hh": np.concatenate([da_r.T @ h, da_z.T @ h, dW_hn]),
        "bias_ih": np.concatenate([da_r.sum(0), da_z.sum(0), da_n.sum(0)]),
        "bias_hh": np.concatenate([da_r.sum(0), da_z.sum(0), db_hn]),
    }
    return dx, dh, grads


class GRUCell:
    """A single GRU step with parameters and gradients, named as ``torch.nn.GRUCell``.

    Parameters: ``weight_ih`` (3H, I), ``weight_hh`` (3H, H), ``bias_ih`` (3H,),
    ``bias_hh`` (3H,), gate order r, z, n. Initialised from U(−1/√H, 1/√H).

    ``forward(x, h=None)`` takes x (B, I) or (I,) and h of the matching shape
    (zeros when None) and returns h'. ``backward(d_h_new)`` returns (dx, dh) for
    the most recent forward and adds the parameter gradients into ``grads``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        bias: bool = True,
        reset_after: bool = True,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.bias = bool(bias)
        self.reset_after = bool(reset_after)
        self.dtype = check_dtype(dtype)
        rng = np.random.default_rng(seed)
        H, I = self.hidden_size, self.input_size
        shapes: dict[str, tuple[int, ...]] = {"weight_ih": (3 * H, I), "weight_hh": (3 * H, H)}
        if self.bias:
            shapes.update(bias_ih=(3 * H,), bias_hh=(3 * H,))
        self.params = {k: uniform_init(rng, s, H, self.dtype) for k, s in shapes.items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._cache: CellCache | None = None
        self._unbatched = False

    def forward(self, x: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(x)
        self._unbatched = x.ndim == 1
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(
                f"x: expected shape (B, {self.input_size}) or ({self.input_size},), got {x.shape}"
            )
        if x.dtype != self.dtype:
            raise ValueError(f"x: expected dtype {self.dtype}, got {x.dtype}")
        x2 = x.reshape(-1, self.input_size)
        if h is None:
            h2 = np.zeros((x2.shape[0], self.hidden_size), self.dtype)
        else:
            h = np.asarray(h)
            if h.dtype != self.dtype or h.shape != x.shape[:-1] + (self.hidden_size,):
                raise ValueError(
                    f"h: expected shape {x.shape[:-1] + (self.hidden_size,)} and dtype "
                    f"{self.dtype}, got {h.shape} {h.dtype}"
                )
            h2 = h.reshape(-1, self.hidden_size)
        p = self.params
        h_new, self._cache = gru_cell_forward(
            x2, h2, p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh"),
            reset_after=self.reset_after,
        )
        return h_new[0] if self._unbatched else h_new

    __call__ = forward

    def backward(self, d_h_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None:
            raise RuntimeError("backward() called before forward()")
        d = np.asarray(d_h_new, self.dtype).reshape(-1, self.hidden_size)
        if d.shape != self._cache.h.shape:
            raise ValueError(f"d_h_new: expected shape {self._cache.h.shape}, got {d.shape}")
        dx, dh, g = gru_cell_backward(d, self._cache, self.params["weight_ih"], self.params["weight_hh"])
        for k in self.grads:
            self.grads[k] += g[k]
        if self._unbatched:
            return dx[0], dh[0]
        return dx, dh

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)
