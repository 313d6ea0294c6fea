"""Experiments: does the GRU keep gradients alive where a plain RNN loses them?

Three experiments, each a plain function returning its numbers as a dict, and
each a ``grumpy experiment NAME`` subcommand that also writes a JSON of those
numbers and, with matplotlib installed, a PNG:

* ``gradient_flow``: the norm of dL/dh_t at every step t when the loss depends
  only on the last state, for the plain RNN and both GRU forms, at
  initialisation and after training on the adding problem.
* ``adding``: the adding problem (sum the two marked values of a long
  sequence), RNN versus GRU on the same budget, for several lengths T.
* ``jacobian``: the state Jacobian dh_t/dh_{t-1} from grumpy's backward pass
  against its closed form, with the gates forced near 0 or 1.

All gradients come from grumpy's hand-written backward passes, never autograd.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from grumpy.kernels.blas import blas_threads
from grumpy.layers import GRU, RecurrentStack
from grumpy.optim import Adam, clip_grad_norm
from grumpy.rnn import RNN

# The models compared: label -> constructor (input_size, hidden_size, dtype, seed).
MODELS: dict[str, Callable[..., RecurrentStack]] = {
    "RNN": lambda i, h, dtype, seed: RNN(i, h, dtype=dtype, seed=seed),
    "GRU": lambda i, h, dtype, seed: GRU(i, h, dtype=dtype, seed=seed, reset_after=True),
    "GRU (reset_after=False)": lambda i, h, dtype, seed: GRU(i, h, dtype=dtype, seed=seed, reset_after=False),
}


# -- the adding problem -------------------------------------------------------------


def adding_batch(rng: np.random.Generator, T: int, B: int, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """B adding-problem sequences of length T: x (T, B, 2), y (B,).

    Channel 0 holds values from U[0, 1), channel 1 the markers: one step marked
    in the first half, one in the second. The target is the sum of the two
    marked values, so always predicting its mean, 1, scores an MSE of 1/6.
    """
    x = np.zeros((T, B, 2), dtype)
    x[..., 0] = rng.random((T, B))
    first = rng.integers(0, T // 2, size=B)
    second = rng.integers(T // 2, T, size=B)
    cols = np.arange(B)
    x[first, cols, 1] = 1.0
    x[second, cols, 1] = 1.0
    y = (x[first, cols, 0] + x[second, cols, 0]).astype(dtype)
    return x, y


class Regressor:
    """A one-layer recurrent layer with a linear head on its last state: x (T, B, I) -> y (B,)."""

    def __init__(self, kind: str, hidden_size: int, seed: int, input_size: int = 2, dtype: Any = np.float32) -> None:
        self.layer = MODELS[kind](input_size, hidden_size, dtype, seed)
        rng = np.random.default_rng([seed, 1])
        k = 1.0 / np.sqrt(hidden_size)
        # head.* joins the layer's own arrays, so an optimiser updating params in place updates the model
        self.params = dict(self.layer.params)
        self.params["head.weight"] = rng.uniform(-k, k, hidden_size).astype(dtype)
        self.params["head.bias"] = np.zeros(1, dtype)

    def predict(self, x: np.ndarray) -> np.ndarray:
        _, h_n = self.layer.forward(x)
        self._h = h_n[-1]
        return self._h @ self.params["head.weight"] + self.params["head.bias"][0]

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean squared error and its gradients (fresh dict, same keys as params)."""
        err = self.predict(x) - y
        B = y.shape[0]
        d_pred = (2.0 / B) * err  # (B,)
        self.layer.zero_grad()
        d_h_n = np.zeros((1, B, self.layer.hidden_size), err.dtype)
        d_h_n[0] = np.outer(d_pred, self.params["head.weight"])
        T = x.shape[0]
        self.layer.backward(np.zeros((T, B, self.layer.hidden_size), err.dtype), d_h_n)
        grads = dict(self.layer.grads)
        grads["head.weight"] = self._h.T @ d_pred
        grads["head.bias"] = np.array([d_pred.sum()], err.dtype)
        return float(np.mean(err.astype(np.float64) ** 2)), grads

    def mse(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean((self.predict(x) - y).astype(np.float64) ** 2))


def train_adding(
    kind: str, T: int, *, steps: int, batch_size: int = 32, hidden_size: int = 32, lr: float = 1e-2,
    clip: float = 1.0, eval_every: int = 50, n_val: int = 500, n_test: int = 2000, seed: int = 0,
    target: float = 0.01, log: Callable[[str], None] | None = None,
) -> tuple[Regressor, dict[str, Any]]:
    """Train ``kind`` (a key of MODELS) on the adding problem with length T.

    Each step draws a fresh batch. Every ``eval_every`` steps the MSE on a fixed
    validation set is recorded; ``steps_to_target`` is the first such step with
    MSE below ``target`` (None: never). The test set is separate and fixed by ``seed``.
    """
    model = Regressor(kind, hidden_size, seed)
    data_rng = np.random.default_rng([seed, T, 2])
    x_val, y_val = adding_batch(np.random.default_rng([seed, T, 3]), T, n_val)
    x_test, y_test = adding_batch(np.random.default_rng([seed, T, 4]), T, n_test)
    opt = Adam(lr)
    curve = [(0, model.mse(x_val, y_val))]
    reached = None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = adding_batch(data_rng, T, batch_size)
        _, grads = model.loss_and_grads(x, y)
        clip_grad_norm(grads, clip)  # keeps a plain RNN's rare exploding steps from wrecking a run
        opt.step(model.params, grads)
        if step % eval_every == 0 or step == steps:
            mse = model.mse(x_val, y_val)
            curve.append((step, mse))
            if reached is None and mse < target:
                reached = step
            if log is not None and step % (eval_every * 10) == 0:
                log(f"  {kind:>24} T={T:<4} step {step:>5}  val MSE {mse:.4f}")
    result = {
        "model": kind, "T": T, "steps": steps, "batch_size": batch_size, "hidden_size": hidden_size,
        "lr": lr, "clip": clip, "test_mse": model.mse(x_test, y_test), "steps_to_target": reached,
        "target": target, "curve": curve, "seconds": round(time.perf_counter() - t0, 2),
    }
    return model, result


# -- experiment 1: gradient flow ----------------------------------------------------


def _norm(a: np.ndarray) -> float:
    """Frobenius norm, scaled first: squaring entries near 1e-160 would underflow to 0."""
    m = float(np.max(np.abs(a)))
    return 0.0 if m == 0.0 else m * float(np.linalg.norm(a / m))


def state_gradient_norms(model: Regressor, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """||dL/dh_t|| for t = 0..T (h_0 the initial state, h_T the last), in float64.

    L is the mean squared error of the head on the last state. The recurrence is
    run one step at a time through the layer's own kernels; the backward of the
    step from h_t to h_{t+1}, given dL/dh_{t+1}, returns dL/dh_t. Norms are over
    the whole (B, H) array.
    """
    fwd, bwd = model.layer._kernels()
    p = {k: v.astype(np.float64) for k, v in model.params.items()}
    w_ih, w_hh = p["weight_ih_l0"], p["weight_hh_l0"]
    b_ih, b_hh = p.get("bias_ih_l0"), p.get("bias_hh_l0")
    x = x.astype(np.float64)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    h = np.zeros((B, H))
    caches = []
    for t in range(T):
        _, h, c = fwd(x[t : t + 1], h, w_ih, w_hh, b_ih, b_hh, reverse=False, mask=None)
        caches.append(c)
    err = h @ p["head.weight"] + p["head.bias"][0] - y
    g = np.outer((2.0 / B) * err, p["head.weight"])  # dL/dh_T
    norms = np.empty(T + 1)
    norms[T] = _norm(g)
    zero = np.zeros((1, B, H))
    for t in range(T - 1, -1, -1):
        _, g, _ = bwd(zero, g, caches[t], w_ih, w_hh, bias=b_ih is not None)
        norms[t] = _norm(g)
    return norms


def gradient_flow(quick: bool = False, seed: int = 0, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Norms of dL/dh_t, at initialisation and after training on the adding problem."""
    cfg: dict[str, Any] = (
        dict(T=100, hidden_size=32, batch_size=32, steps=300, lr=1e-2, n_measure=64, init_draws=3) if quick
        else dict(T=200, hidden_size=32, batch_size=32, steps=1500, lr=1e-2, n_measure=256, init_draws=10))
    T = cfg["T"]
    x, y = adding_batch(np.random.default_rng([seed, 99]), T, cfg["n_measure"])
    out: dict[str, Any] = {"experiment": "gradient-flow", "quick": quick, "seed": seed, "config": cfg, "runs": {}}
    for kind in MODELS:
        init_model = Regressor(kind, cfg["hidden_size"], seed)
        at_init = state_gradient_norms(init_model, x, y)
        if log:
            log(f"training {kind} on the adding problem, T={T}, {cfg['steps']} steps")
        trained, res = train_adding(kind, T, steps=cfg["steps"], batch_size=cfg["batch_size"],
                                    hidden_size=cfg["hidden_size"], lr=cfg["lr"], seed=seed, log=log)
        after = state_gradient_norms(trained, x, y)
        out["runs"][kind] = {
            "init": at_init.tolist(), "trained": after.tolist(),
            "trained_test_mse": res["test_mse"], "train_seconds": res["seconds"],
        }
        if log:
            log(f"{kind}: test MSE after training {res['test_mse']:.2e}")
    out["table"] = _flow_table(out["runs"], T)
    # One initialisation is one draw: how the models compare at init varies from
    # draw to draw, so report the T-50 / T ratio over several (cheap: no training).
    spread: dict[str, list[float]] = {kind: [] for kind in MODELS}
    for s in range(cfg["init_draws"]):
        for kind in MODELS:
            n = state_gradient_norms(Regressor(kind, cfg["hidden_size"], seed * 1000 + s), x, y)
            spread[kind].append(float(n[T - 50] / n[T]))
    out["init_ratio_T50_over_draws"] = spread
    if log:
        for kind, v in spread.items():
            log(f"{kind:>24}: ||dL/dh_(T-50)|| / ||dL/dh_T|| over {len(v)} initialisations: "
                f"min {min(v):.1e}, median {float(np.median(v)):.1e}, max {max(v):.1e}")
    return out


def _flow_table(runs: dict[str, Any], T: int) -> list[dict[str, Any]]:
    rows = []
    for kind, r in runs.items():
        for when in ("init", "trained"):
            n = r[when]
            row: dict[str, Any] = {"model": kind, "when": "initialisation" if when == "init" else "trained"}
            for lag in (0, 10, 50, 100):
                if T - lag >= 0:
                    row["t=T" if lag == 0 else f"t=T-{lag}"] = n[T - lag]
            row["ratio T-50 / T"] = n[T - 50] / n[T] if n[T] > 0 else float("nan")
            rows.append(row)
    return rows


def _plot_flow(out: dict[str, Any], path: str) -> bool:
    Figure = _figure_class()
    if Figure is None:
        return False
    T = out["config"]["T"]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, when, title in zip(axes, ("init", "trained"), ("at initialisation", "after training on adding")):
        for kind, r in out["runs"].items():
            ax.semilogy(np.arange(T + 1), r[when], label=kind)
        ax.set_title(f"||dL/dh_t||, {title} (T={T})")
        ax.set_xlabel("t (loss on h_T only)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("norm (log scale)")
    low = min(min(r[w]) for r in out["runs"].values() for w in ("init", "trained"))
    if low < 1e-45:  # keep the readable range; the JSON holds every value
        axes[0].set_ylim(bottom=1e-45)
        fig.text(0.99, 0.01, "values below 1e-45 are off the axis (all in the JSON)", ha="right", fontsize=7)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# -- experiment 2: the adding problem -----------------------------------------------


def adding(quick: bool = False, seed: int = 0, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """RNN and GRU on the adding problem, same budget: T in {50, 100, 200} (quick: T = 50, fewer steps)."""
    cfg: dict[str, Any] = (
        dict(Ts=[50], steps=400, batch_size=32, hidden_size=32, lr=1e-2, eval_every=25) if quick
        else dict(Ts=[50, 100, 200], steps=3000, batch_size=32, hidden_size=32, lr=1e-2, eval_every=50))
    out: dict[str, Any] = {"experiment": "adding", "quick": quick, "seed": seed, "config": cfg,
                           "baseline_mse": 1.0 / 6.0, "runs": []}
    for T in cfg["Ts"]:
        for kind in ("RNN", "GRU"):
            _, res = train_adding(kind, T, steps=cfg["steps"], batch_size=cfg["batch_size"],
                                  hidden_size=cfg["hidden_size"], lr=cfg["lr"], eval_every=cfg["eval_every"],
                                  seed=seed, log=log)
            if log:
                reach = res["steps_to_target"] if res["steps_to_target"] is not None else "never"
                log(f"{kind:>4} T={T:<4} test MSE {res['test_mse']:.4f}  steps to < 0.01: {reach}  "
                    f"({res['seconds']:.1f} s)")
            out["runs"].append(res)
    return out


def _plot_adding(out: dict[str, Any], path: str) -> bool:
    Figure = _figure_class()
    if Figure is None:
        return False
    Ts = out["config"]["Ts"]
    fig = Figure(figsize=(4 * len(Ts), 3.8))
    axes = fig.subplots(1, len(Ts), sharey=True)
    for ax, T in zip(np.atleast_1d(axes), Ts):
        for r in out["runs"]:
            if r["T"] == T:
                steps, mse = zip(*r["curve"])
                ax.semilogy(steps, mse, label=r["model"])
        ax.axhline(out["baseline_mse"], color="grey", ls="--", lw=1, label="predict 1 (MSE 1/6)")
        ax.axhline(0.01, color="grey", ls=":", lw=1, label="0.01")
        ax.set_title(f"adding problem, T={T}")
        ax.set_xlabel("training step")
        ax.grid(True, which="major", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("validation MSE (log scale)")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# -- experiment 3: the state Jacobian -----------------------------------------------

# Gate pre-activation offsets forcing the gates: σ(±12) is within 7e-6 of 1 or 0.
_FORCE = 12.0
JACOBIAN_CASES = {
    "z≈1 (keep)": {"z": _FORCE},
    "z≈0, r≈0": {"z": -_FORCE, "r": -_FORCE},
    "z≈0, r≈1": {"z": -_FORCE, "r": _FORCE},
}


def jacobian_by_backward(kind: str, params: dict[str, np.ndarray], x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """dh_t/dh_{t-1} (H, H) at input x (I,) and state h (H,), from the kernels'
    backward pass: H copies of the step, batched, with d_h_last the identity
    (row i of the Jacobian is the gradient of h_t[i])."""
    fwd, bwd = MODELS[kind](x.shape[0], h.shape[0], np.float64, 0)._kernels()
    H = h.shape[0]
    xs = np.broadcast_to(x, (1, H, x.shape[0])).copy()
    hs = np.broadcast_to(h, (H, H)).copy()
    w_ih, w_hh = params["weight_ih_l0"], params["weight_hh_l0"]
    _, _, cache = fwd(xs, hs, w_ih, w_hh, params["bias_ih_l0"], params["bias_hh_l0"], reverse=False, mask=None)
    _, dh0, _ = bwd(np.zeros((1, H, H)), np.eye(H), cache, w_ih, w_hh, bias=True)
    return dh0


def jacobian_closed_form(kind: str, params: dict[str, np.ndarray], x: np.ndarray, h: np.ndarray) -> dict[str, Any]:
    """The exact Jacobian by hand-derived formula, plus the gates for the case analysis.

    GRU (h' = (1 − z) n + z h, gate order r, z, n):
        dh'/dh = diag(z) + diag((h − n) z (1 − z)) W_hz + diag((1 − z)(1 − n²)) dA_n/dh
        dA_n/dh = diag(r) W_hn + diag(hn r (1 − r)) W_hr,  hn = W_hn h + b_hn   (reset_after)
        dA_n/dh = W_hn (diag(r) + diag(h r (1 − r)) W_hr)                      (reset_after=False)
    RNN: dh'/dh = diag(1 − h'²) W_hh.
    """
    w_ih, w_hh, b_ih, b_hh = (params[k] for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"))
    if kind == "RNN":
        hp = np.tanh(w_ih @ x + b_ih + w_hh @ h + b_hh)
        return {"J": (1 - hp**2)[:, None] * w_hh}
    H = h.shape[0]
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731  (|a| stays far below overflow here)
    gi = w_ih @ x + b_ih
    W_r, W_z, W_n = w_hh[:H], w_hh[H : 2 * H], w_hh[2 * H :]
    b_r, b_z, b_n = b_hh[:H], b_hh[H : 2 * H], b_hh[2 * H :]
    r = sig(gi[:H] + W_r @ h + b_r)
    z = sig(gi[H : 2 * H] + W_z @ h + b_z)
    if kind == "GRU":
        hn = W_n @ h + b_n
        n = np.tanh(gi[2 * H :] + r * hn)
        dAn = r[:, None] * W_n + (hn * r * (1 - r))[:, None] * W_r
    else:
        n = np.tanh(gi[2 * H :] + W_n @ (r * h) + b_n)
        dAn = W_n @ (np.diag(r) + (h * r * (1 - r))[:, None] * W_r)
    J = np.diag(z) + ((h - n) * z * (1 - z))[:, None] * W_z + ((1 - z) * (1 - n**2))[:, None] * dAn
    return {"J": J, "r": r, "z": z, "n": n}


def _case_limit(case: str, info: dict[str, Any], W_n: np.ndarray) -> np.ndarray:
    """The seeds' case analysis: z = 1 -> I; z = 0, r = 0 -> 0; z = 0, r = 1 -> diag(1 − n²) W_hn."""
    H = W_n.shape[0]
    if case.startswith("z≈1"):
        return np.eye(H)
    if "r≈0" in case:
        return np.zeros((H, H))
    return (1 - info["n"] ** 2)[:, None] * W_n


def jacobian(quick: bool = False, seed: int = 0, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Backward-pass Jacobian vs closed form (and vs the case limits) for forced gates."""
    H, I = 4, 3
    trials = 5 if quick else 500
    rng = np.random.default_rng([seed, 7])
    out: dict[str, Any] = {"experiment": "jacobian", "quick": quick, "seed": seed, "force": _FORCE,
                           "hidden_size": H, "trials": trials, "cases": []}
    specs = [(k, c) for k in ("GRU", "GRU (reset_after=False)") for c in JACOBIAN_CASES] + [("RNN", "plain tanh")]
    for kind, case in specs:
        worst_closed, worst_limit, shown = 0.0, 0.0, None
        for trial in range(trials):
            model = MODELS[kind](I, H, np.float64, int(rng.integers(2**31)))
            p = {k: v.copy() for k, v in model.params.items()}
            for gate, off in JACOBIAN_CASES.get(case, {}).items():
                i = "rz".index(gate)
                p["bias_ih_l0"][i * H : (i + 1) * H] += off
            x = rng.standard_normal(I)
            h = rng.uniform(-1, 1, H)
            J = jacobian_by_backward(kind, p, x, h)
            info = jacobian_closed_form(kind, p, x, h)
            worst_closed = max(worst_closed, float(np.max(np.abs(J - info["J"]))))
            limit = None if kind == "RNN" else _case_limit(case, info, p["weight_hh_l0"][2 * H :])
            if limit is not None:
                worst_limit = max(worst_limit, float(np.max(np.abs(J - limit))))
            if trial == 0:
                shown = {"backward": J.tolist(), "closed_form": info["J"].tolist(),
                         "limit": None if limit is None else limit.tolist(),
                         "spectral_norm": float(np.linalg.norm(J, 2))}
        row = {"model": kind, "case": case, "max_abs_diff_closed_form": worst_closed,
               "max_abs_diff_limit": worst_limit if kind != "RNN" else None, "example": shown}
        out["cases"].append(row)
        if log:
            log(_format_jacobian_case(row))
    return out


def _plot_jacobian(out: dict[str, Any], path: str) -> bool:
    Figure = _figure_class()
    if Figure is None:
        return False
    cases = out["cases"]
    fig = Figure(figsize=(2.0 * len(cases), 2.6), layout="constrained")
    axes = fig.subplots(1, len(cases))
    for ax, row in zip(axes, cases):
        J = np.array(row["example"]["backward"])
        im = ax.imshow(J, vmin=-1, vmax=1, cmap="RdBu_r")
        name = "GRU" if row["model"] == "GRU" else ("GRU (r.a.=False)" if row["model"].startswith("GRU") else "RNN")
        ax.set_title(f"{name}\n{row['case']}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.7)
    fig.suptitle("dh_t/dh_{t-1} from the backward pass", fontsize=9)
    fig.savefig(path, dpi=110)
    return True


def _format_jacobian_case(row: dict[str, Any]) -> str:
    ex = row["example"]
    head = f"{row['model']}, {row['case']}  (||J||_2 = {ex['spectral_norm']:.3f})"
    cols = [("backward pass", ex["backward"]), ("closed form", ex["closed_form"])]
    if ex["limit"] is not None:
        cols.append(("case limit", ex["limit"]))
    width = 8 * len(ex["backward"][0])
    lines = [head, "   ".join(f"{name:<{width}}" for name, _ in cols)]
    for i in range(len(ex["backward"])):
        lines.append("   ".join("".join(f"{v:8.4f}" for v in m[i]) for _, m in cols))
    tail = f"max |backward - closed form| = {row['max_abs_diff_closed_form']:.1e}"
    if row["max_abs_diff_limit"] is not None:
        tail += f", max |backward - case limit| = {row['max_abs_diff_limit']:.1e}"
    lines.append(tail + "\n")
    return "\n".join(lines)


# -- output -------------------------------------------------------------------------


def _figure_class() -> Any:
    """matplotlib's Figure (no pyplot, so no GUI backend is touched), or None if not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def format_flow_table(out: dict[str, Any]) -> str:
    rows = out["table"]
    keys = [k for k in rows[0] if k not in ("model", "when")]
    lines = ["| model | when | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['when']} | " + " | ".join(f"{r[k]:.2e}" for k in keys) + " |")
    return "\n".join(lines)


def format_adding_table(out: dict[str, Any]) -> str:
    lines = ["| T | model | test MSE | steps to MSE < 0.01 |", "|---|---|---|---|"]
    for r in out["runs"]:
        reach = r["steps_to_target"] if r["steps_to_target"] is not None else "never"
        mse = f"{r['test_mse']:.4f}" if r["test_mse"] >= 1e-3 else f"{r['test_mse']:.1e}"
        lines.append(f"| {r['T']} | {r['model']} | {mse} | {reach} |")
    return "\n".join(lines)


EXPERIMENTS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[[dict[str, Any], str], bool] | None,
                             Callable[[dict[str, Any]], str] | None]] = {
    "gradient-flow": (gradient_flow, _plot_flow, format_flow_table),
    "adding": (adding, _plot_adding, format_adding_table),
    "jacobian": (jacobian, _plot_jacobian, None),
}


def run_experiment(name: str, out_dir: str, *, quick: bool = False, seed: int = 0, overwrite: bool = False,
                   log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run experiment ``name`` and write ``NAME.json`` (and ``NAME.png``) into out_dir."""
    func, plot, table = EXPERIMENTS[name]
    stem = name + ("-quick" if quick else "")
    paths = [os.path.join(out_dir, stem + ".json")] + ([os.path.join(out_dir, stem + ".png")] if plot else [])
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(f"--out: {', '.join(existing)} already exists (pass --overwrite to replace)")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    # The products are small (B x H by H x 3H): BLAS threads only add synchronisation,
    # and on a busy machine slow a step down several times.
    with blas_threads(1):
        result = func(quick=quick, seed=seed, log=log)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if table is not None and log:
        log(table(result))
    if plot is not None:
        if plot(result, paths[1]):
            result["png"] = os.path.basename(paths[1])
        elif log:
            log("matplotlib is not installed: no plot written (pip install matplotlib)")
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    if log:
        log(f"wrote {', '.join(p for p in paths if os.path.exists(p))} in {result['seconds']} s")
    return result
