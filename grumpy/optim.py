"""Optimisers, gradient clipping and the learning-rate schedule.

Every optimiser updates parameter arrays in place (so updating ``model.params``
updates the model) and keeps its per-parameter state in flat arrays keyed by
the parameter's name, which is what a checkpoint stores:
``state_dict()`` -> {"<state>.<param name>": array}, e.g. "exp_avg.head.weight".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam", "adamw")


def _check_rate(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        want = "a number >= 0" if allow_zero else "a positive number"
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: hyperparameters, named state, the step counter."""

    name = ""
    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float) -> None:
        self.lr = _check_rate("lr", lr)
        self.t = 0  # completed steps, for bias correction
        self.state: dict[str, dict[str, np.ndarray]] = {s: {} for s in self.state_names}

    def _slot(self, kind: str, name: str, p: np.ndarray) -> np.ndarray:
        slots = self.state[kind]
        if name not in slots:
            slots[name] = np.zeros_like(p)
        return slots[name]

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float | None = None) -> None:
        """Update every array of ``params`` in place from ``grads`` (same keys)."""
        lr = self.lr if lr is None else lr
        self.t += 1
        for name, p in params.items():
            self._update(name, p, grads[name].astype(p.dtype, copy=False), lr)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters, JSON-serialisable (without lr, which the schedule owns)."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"<state>.<param name>": array}. The step counter is ``self.t``."""
        return {f"{kind}.{n}": a for kind, slots in self.state.items() for n, a in slots.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray], t: int, params: Mapping[str, np.ndarray]) -> None:
        """Restore the state saved by :meth:`state_dict`; every entry must match a parameter's shape."""
        new: dict[str, dict[str, np.ndarray]] = {s: {} for s in self.state_names}
        for key, arr in state.items():
            kind, _, pname = key.partition(".")
            if kind not in new or pname not in params:
                raise ValueError(f"optimizer state: unexpected entry {key!r} for {self.name}")
            if arr.shape != params[pname].shape:
                raise ValueError(f"optimizer state: {key} has shape {arr.shape}, expected {params[pname].shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"optimizer state: {key} contains non-finite values")
            new[kind][pname] = np.array(arr, dtype=params[pname].dtype)
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"optimizer state: step counter must be an integer >= 0, got {t!r}")
        self.state, self.t = new, t


class SGD(Optimizer):
    """v = μ v + g;  p -= lr v  (plain SGD when μ = 0)."""

    name = "sgd"
    state_names = ("momentum",)

    def __init__(self, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        if self.momentum == 0:
            p -= lr * g
            return
        v = self._slot("momentum", name, p)
        v *= self.momentum
        v += g
        p -= lr * v

    def hparams(self) -> dict[str, Any]:
        return {"momentum": self.momentum}


class Adagrad(Optimizer):
    """G += g²;  p -= lr g / (√G + ε)  (min-char-rnn's optimiser)."""

    name = "adagrad"
    state_names = ("sum_sq",)

    def __init__(self, lr: float = 0.1, eps: float = 1e-8) -> None:
        super().__init__(lr)
        self.eps = _check_rate("eps", eps)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        s = self._slot("sum_sq", name, p)
        s += g * g
        p -= lr * g / (np.sqrt(s) + self.eps)

    def hparams(self) -> dict[str, Any]:
        return {"eps": self.eps}


class RMSprop(Optimizer):
    """s = α s + (1 − α) g²;  p -= lr g / (√s + ε)  (char-rnn's optimiser, α = 0.95)."""

    name = "rmsprop"
    state_names = ("square_avg",)

    def __init__(self, lr: float = 2e-3, alpha: float = 0.95, eps: float = 1e-8) -> None:
        super().__init__(lr)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha: expected a number in [0, 1), got {alpha!r}")
        self.alpha = float(alpha)
        self.eps = _check_rate("eps", eps)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        s = self._slot("square_avg", name, p)
        s *= self.alpha
        s += (1.0 - self.alpha) * g * g
        p -= lr * g / (np.sqrt(s) + self.eps)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "eps": self.eps}


class Adam(Optimizer):
    """Adam with bias correction, as torch.optim.Adam. ``weight_decay`` adds
    wd·p to the gradient (L2); AdamW instead shrinks p directly."""

    name = "adam"
    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        b1, b2 = betas
        for nm, b in (("beta1", b1), ("beta2", b2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{nm}: expected a number in [0, 1), got {b!r}")
        self.betas = (float(b1), float(b2))
        self.eps = _check_rate("eps", eps)
        self.weight_decay = _check_rate("weight_decay", weight_decay, allow_zero=True)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        b1, b2 = self.betas
        if self.weight_decay:
            if self.decoupled:
                p *= 1.0 - lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        m = self._slot("exp_avg", name, p)
        v = self._slot("exp_avg_sq", name, p)
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        bc1 = 1.0 - b1**self.t
        bc2 = 1.0 - b2**self.t
        denom = np.sqrt(v)
        denom /= math.sqrt(bc2)
        denom += self.eps
        p -= (lr / bc1) * (m / denom)

    def hparams(self) -> dict[str, Any]:
        return {"betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 − lr·wd before the Adam step."""

    name = "adamw"
    decoupled = True

    def __init__(self, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(lr, betas, eps, weight_decay)


def make_optimizer(name: str, lr: float, **hparams: Any) -> Optimizer:
    """Build an optimiser by name ("sgd", "adagrad", "rmsprop", "adam", "adamw")."""
    classes = {c.name: c for c in (SGD, Adagrad, RMSprop, Adam, AdamW)}
    if name not in classes:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if "betas" in hparams:
        hparams["betas"] = tuple(hparams["betas"])
    return classes[name](lr, **hparams)


def grad_norm(grads: Mapping[str, np.ndarray]) -> float:
    """The global L2 norm of all gradients, accumulated in float64 (inf or nan if any entry is)."""
    total = 0.0
    for g in grads.values():
        g64 = g.astype(np.float64, copy=False).ravel()
        # not g64 @ g64: a BLAS dot would wake NumPy's BLAS threads, whose spinning beside
        # MKL's slows the training step (grumpy.kernels.blas, docs/benchmarks.md)
        total += float(np.square(g64).sum())
    return math.sqrt(total)


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their global norm is at most ``max_norm``; returns the norm before."""
    norm = grad_norm(grads)
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-12)
        for g in grads.values():
            g *= scale
    return norm


def clip_grad_value(grads: Mapping[str, np.ndarray], clip: float) -> None:
    """Clamp every gradient entry to [−clip, clip] in place (the seed's clipping)."""
    for g in grads.values():
        np.clip(g, -clip, clip, out=g)


def lr_at(step: int, base_lr: float, *, schedule: str = "cosine", warmup_steps: int = 0,
          progress: float | None = None, total_steps: int | None = None, min_ratio: float = 0.1) -> float:
    """The learning rate for (0-based) ``step``.

    "constant": ``base_lr`` after the linear warm-up. "cosine": linear warm-up
    over ``warmup_steps``, then cosine decay from ``base_lr`` to
    ``min_ratio * base_lr`` as training progress goes from the end of warm-up
    to 1. Progress is ``progress`` when given (e.g. the fraction of a time
    budget used), else ``step / total_steps``.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule: expected 'constant' or 'cosine', got {schedule!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if progress is None:
        if not total_steps:
            raise ValueError("lr_at: a cosine schedule needs progress or total_steps")
        w = min(warmup_steps, total_steps - 1)
        progress = (step - w) / max(1, total_steps - w)
    progress = min(max(progress, 0.0), 1.0)
    lo = base_lr * min_ratio
    return lo + 0.5 * (base_lr - lo) * (1.0 + math.cos(math.pi * progress))
