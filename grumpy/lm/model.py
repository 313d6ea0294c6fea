"""The character-level language model: embedding -> GRU stack -> linear head -> softmax.

Parameters live in one flat dict keyed like a PyTorch module's state dict::

    embedding.weight   (V, E)        absent with one-hot input (embedding_dim=0)
    gru.weight_ih_l0   (3H, E or V)  ... every name of grumpy.GRU, prefixed "gru."
    head.weight        (V, H)
    head.bias          (V,)

The arrays in ``params`` and ``grads`` are the very arrays the GRU holds, so an
optimiser that updates them in place updates the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from grumpy._util import check_dtype, dropout_mask
from grumpy.kernels import GRUStep, gru_step, linear
from grumpy.kernels.blas import column_sums, matmul
from grumpy.kernels.route import LOSS_ROWS, compiled_kernels
from grumpy.layers import GRU, param_shapes
from grumpy.lm.config import ModelConfig

LN2 = math.log(2.0)  # nats per bit


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, by log-sum-exp: no overflow for any finite input."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, targets: np.ndarray, *, reduction: str = "mean") -> float:
    """Cross-entropy in nats without its gradient, for evaluation: logits (..., V),
    targets (...) ints -> the mean (or, with reduction="sum", the sum), in float64.

    log-sum-exp minus the target's logit: no (N, V) log-softmax array is built
    (docs/benchmarks.md)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    fast = _compiled_log_sum_exp(z, keep_exp=False)
    if fast is not None:
        lse = fast[2]
    else:
        m = z.max(axis=1)
        e = np.subtract(z, m[:, None])
        np.exp(e, out=e)
        lse = np.log(e.sum(axis=1)) + m
    losses = (lse - np.take_along_axis(z, t[:, None], axis=1)[:, 0]).astype(np.float64)
    return float(losses.sum() if reduction == "sum" else losses.mean())


def _compiled_log_sum_exp(z: np.ndarray, keep_exp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """For float32 logits z (N, V) with numba: (e^(z - m), its row sums s (N,), the
    log-sum-exp m + log s (N,)), m the rows' maxima, by the compiled passes of
    ``shifted_exp_sums`` (docs/benchmarks.md); e^(z - m) is (N, V) with keep_exp, else a
    scratch of LOSS_ROWS rows. None without numba or for other dtypes."""
    nb = compiled_kernels()
    if nb is None or z.dtype != np.float32 or not z.size:
        return None
    m = np.empty(z.shape[0], z.dtype)
    s = np.empty_like(m)
    e = np.empty_like(z) if keep_exp else np.empty((min(LOSS_ROWS, z.shape[0]), z.shape[1]), z.dtype)
    nb.shifted_exp_sums(np.ascontiguousarray(z), m, s, e)
    return e, s, np.log(s) + m


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy in nats. logits (..., V), targets (...) ints -> (loss, d_logits)."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    N = t.shape[0]
    fast = _compiled_log_sum_exp(z, keep_exp=True)
    if fast is not None:
        e, s, lse = fast
        loss = float((lse - np.take_along_axis(z, t[:, None], axis=1)[:, 0]).astype(np.float64).mean())
        nb = compiled_kernels()
        assert nb is not None
        nb.softmax_gradient(e, s, t, np.float32(1.0 / N))  # e becomes (softmax - onehot) / N
        return loss, e.reshape(logits.shape)
    lp = log_softmax(z)
    loss = -float(lp[np.arange(N), t].astype(np.float64).mean())
    d = np.exp(lp)  # softmax
    d[np.arange(N), t] -= 1.0
    d /= N
    return loss, d.reshape(logits.shape)


def model_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every parameter of the model ``c`` describes, in ``params``' order."""
    V, H, E = c.vocab_size, c.hidden_size, c.embedding_dim
    gru = param_shapes(E or V, H, c.num_layers, bidirectional=False, bias=True)
    return {**({"embedding.weight": (V, E)} if E else {}), **{"gru." + k: s for k, s in gru.items()},
            "head.weight": (V, H), "head.bias": (V,)}


class CharModel:
    """Embedding (or one-hot) -> GRU stack -> linear head, with hand-written backward.

    ``forward(idx, h0)`` takes character indices (T, B) and h0 (L, B, H) or None
    and returns logits (T, B, V) and h_n (L, B, H). ``backward(d_logits)``
    adds parameter gradients into ``grads`` and returns d_h0 (L, B, H).
    """

    def __init__(self, config: ModelConfig, seed: int | None = None) -> None:
        self.config = config
        c = config
        self.dtype = check_dtype(c.dtype)
        rng = np.random.default_rng(seed)
        in_size = c.embedding_dim or c.vocab_size
        self.gru = GRU(
            in_size, c.hidden_size, c.num_layers, dropout=c.dropout, weight_drop=c.weight_drop,
            reset_after=c.reset_after,
            dtype=self.dtype, seed=int(rng.integers(2**63)),
        )
        shapes = model_shapes(c)
        own: dict[str, np.ndarray] = {}
        if c.embedding_dim:
            own["embedding.weight"] = rng.standard_normal(shapes["embedding.weight"]).astype(self.dtype)
        k = 1.0 / np.sqrt(c.hidden_size)
        for name in ("head.weight", "head.bias"):
            own[name] = rng.uniform(-k, k, shapes[name]).astype(self.dtype)
        self._own = own
        self._own_grads = {n: np.zeros_like(v) for n, v in own.items()}
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    # Rebuilt on each access so they stay right after gru.load_state_dict replaces arrays.
    @property
    def params(self) -> dict[str, np.ndarray]:
        return self._merge(self._own, self.gru.params)

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return self._merge(self._own_grads, self.gru.grads)

    def _merge(self, own: dict[str, np.ndarray], gru: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        if "embedding.weight" in own:
            out["embedding.weight"] = own["embedding.weight"]
        out.update({"gru." + k: v for k, v in gru.items()})
        out["head.weight"] = own["head.weight"]
        out["head.bias"] = own["head.bias"]
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace all parameters; a missing, extra, mis-shaped or non-finite entry raises ValueError."""
        expected = self.params
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            raise ValueError(f"load_state_dict: missing keys {missing}, unexpected keys {extra}")
        self.gru.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("gru.")})
        for k in self._own:
            arr = np.asarray(state[k])
            if arr.shape != self._own[k].shape:
                raise ValueError(f"load_state_dict: {k} has shape {arr.shape}, expected {self._own[k].shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"load_state_dict: {k} contains non-finite values")
            self._own[k][...] = arr

    def with_vocab_size(self, vocab_size: int, seed: int | None = None) -> CharModel:
        """A copy for a vocabulary of ``vocab_size`` >= this one's, the new characters last:
        their embedding rows, output rows (and one-hot input columns) initialised as a new
        model's from ``seed``, every old row and every other weight unchanged."""
        V = self.config.vocab_size
        if vocab_size < V:
            raise ValueError(f"vocab_size: expected at least the model's {V}, got {vocab_size}")
        new = CharModel(dataclasses.replace(self.config, vocab_size=vocab_size), seed=seed)
        state = new.state_dict()
        for k, v in self.state_dict().items():
            if k in ("embedding.weight", "head.weight", "head.bias"):
                state[k][:V] = v
            elif k == "gru.weight_ih_l0" and not self.config.embedding_dim:
                state[k][:, :V] = v  # one-hot inputs: a column per character
            else:
                state[k] = v
        new.load_state_dict(state)
        return new

    def regularise(self, dropout: float, weight_drop: float) -> None:
        """Set the training-only regularisation (a resumed or fine-tuned run may change it)."""
        self.config = dataclasses.replace(self.config, dropout=dropout, weight_drop=weight_drop)
        self.gru.dropout, self.gru.weight_drop = float(dropout), float(weight_drop)

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def train(self, mode: bool = True) -> CharModel:
        self.gru.train(mode)
        return self

    def eval(self) -> CharModel:
        return self.train(False)

    def init_state(self, batch_size: int) -> np.ndarray:
        """Zeros (L, B, H)."""
        return np.zeros((self.config.num_layers, batch_size, self.config.hidden_size), self.dtype)

    def _embed(self, idx: np.ndarray) -> np.ndarray:
        if self.config.embedding_dim:
            return self._own["embedding.weight"][idx]
        x = np.zeros(idx.shape + (self.config.vocab_size,), self.dtype)
        np.put_along_axis(x, idx[..., None], 1.0, axis=-1)
        return x

    def forward(
        self, idx: np.ndarray, h0: np.ndarray | None = None, *, grad: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """idx (T, B) ints in [0, V), h0 (L, B, H) -> logits (T, B, V), h_n (L, B, H).

        ``grad=False``: inference only, nothing kept for :meth:`backward`."""
        idx = np.asarray(idx)
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise ValueError(f"idx: expected a (T, B) integer array, got shape {idx.shape} dtype {idx.dtype}")
        V = self.config.vocab_size
        if idx.size and (idx.min() < 0 or idx.max() >= V):
            raise ValueError(f"idx: values must lie in [0, {V}), got range [{idx.min()}, {idx.max()}]")
        out, h_n = self.gru.forward(self._embed(idx), h0, grad=grad)
        T, B, H = out.shape
        # Dropout also on the head's input: on every connection that is not recurrent, as
        # Zaremba et al. (2014) do; with it, the default 2-layer model overfits far less (docs/lm.md).
        drop = None
        if self.gru.training and self.config.dropout > 0:
            drop = dropout_mask(self.gru.rng, (T, B, H), self.config.dropout, self.dtype)
            out = out * drop
        logits = linear(out.reshape(T * B, H), self._own["head.weight"]).reshape(T, B, V)
        logits += self._own["head.bias"]
        self._cache = (idx, out, drop) if grad else None
        return logits, h_n

    __call__ = forward

    def gates(self, idx: np.ndarray, h0: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """:meth:`grumpy.GRU.gates` for character indices idx (T, B): each layer's r, z, n
        and h at every step, (L, T, B, H)."""
        idx = np.asarray(idx)
        return self.gru.gates(self._embed(idx), h0)

    def backward(self, d_logits: np.ndarray, d_h_n: np.ndarray | None = None) -> np.ndarray:
        """d_logits (T, B, V) -> d_h0 (L, B, H); parameter gradients are added into ``grads``."""
        if self._cache is None or self.gru._cache is None:  # before any gradient is touched
            raise RuntimeError(self.gru._why_no_backward())
        idx, out, drop = self._cache
        T, B, H = out.shape
        V = self.config.vocab_size
        d2 = d_logits.reshape(T * B, V).astype(self.dtype, copy=False)
        matmul(d2.T, out.reshape(T * B, H), self._own_grads["head.weight"], beta=1.0)
        self._own_grads["head.bias"] += column_sums(d2)
        d_out = matmul(d2, self._own["head.weight"]).reshape(T, B, H)
        if drop is not None:
            d_out *= drop
        # one-hot inputs have no parameters: their gradient is not needed
        dx, dh0 = self.gru.backward(d_out, d_h_n, input_grad=bool(self.config.embedding_dim))
        if dx is not None:
            np.add.at(self._own_grads["embedding.weight"], idx.reshape(-1), dx.reshape(T * B, -1))
        return dh0

    def step(self, i: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One character of one stream, for generation: index i, state h (L, H) ->
        logits (V,), new state (L, H). No cache, no dropout: inference only."""
        ra = self.config.reset_after

        def layer(w_ih: np.ndarray, w_hh: np.ndarray, b_ih: Any, b_hh: Any) -> Callable[..., np.ndarray]:
            return lambda x, h: gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=ra)

        return self._step_fn(self.params, layer)(i, h)

    def stepper(self) -> Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """:meth:`step` with each layer's weights prepared once (:class:`GRUStep`),
        for generating many characters: a snapshot of the parameters as they are now."""
        ra = self.config.reset_after
        snapshot = {k: v.copy() for k, v in self.params.items()}
        return self._step_fn(snapshot, lambda *w: GRUStep(*w, reset_after=ra))

    def _step_fn(
        self, p: dict[str, np.ndarray], layer: Callable[..., Callable[..., np.ndarray]]
    ) -> Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """The one-character step over parameters p, each GRU layer run by
        layer(w_ih, w_hh, b_ih, b_hh)(x, h) -> new h."""
        c = self.config
        layers = [
            layer(p[f"gru.weight_ih_l{k}"], p[f"gru.weight_hh_l{k}"], p.get(f"gru.bias_ih_l{k}"),
                  p.get(f"gru.bias_hh_l{k}"))
            for k in range(c.num_layers)
        ]
        embed = p["embedding.weight"] if c.embedding_dim else None

        def step(i: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if embed is not None:
                x = embed[i]
            else:
                x = np.zeros(c.vocab_size, self.dtype)
                x[i] = 1.0
            h_new = np.empty_like(h)
            for k, run in enumerate(layers):
                x = h_new[k] = run(x, h[k])
            return matmul(p["head.weight"], x) + p["head.bias"], h_new

        return step


def sample_next(
    logits: np.ndarray,
    rng: np.random.Generator,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> int:
    """Draw one index from logits (V,). temperature 0 is greedy (argmax);
    top_k keeps the k most likely; top_p keeps the smallest set whose
    probability reaches p (nucleus sampling)."""
    if temperature == 0:
        return int(np.argmax(logits))
    lp = log_softmax(logits.astype(np.float64) / temperature)
    p = np.exp(lp)
    order = np.argsort(-p, kind="stable")
    keep = np.ones_like(p, dtype=bool)
    if top_k is not None and top_k < p.size:
        keep[order[top_k:]] = False
    if top_p is not None and top_p < 1.0:
        cum = np.cumsum(p[order])
        cut = int(np.searchsorted(cum, top_p)) + 1  # smallest prefix reaching top_p
        keep[order[cut:]] = False
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    return int(rng.choice(p.size, p=p))
