"""The benchmark harness (``python benchmarks/bench.py``, or ``grumpy bench`` in a source
checkout): grumpy's GRU against PyTorch's ``nn.GRU`` and a jit-compiled JAX/Flax GRU.

The workload is one step of a character language model: a one-layer GRU on
one-hot inputs of width 65, a linear head to 65 classes and softmax
cross-entropy over T = 100 steps, in float32. Each side runs in its own child
process (a "worker" that keeps its model between requests); the parent asks the
sides in turn, A B C A B C ..., for one timed sample each, and reports the
median sample. Before timing, every side runs warm-up steps (for JAX these
include the jit compilation, which is timed and reported on its own).

Measures, in tokens per second (B*T per second):

* train: forward + loss + backward + SGD update;
* infer: forward + loss (torch under ``no_grad``, JAX jit-compiled);
* gen: one character at a time from one stream (B = 1, T = 1 per call, the
  state fed back), the GRU step and the head's logits, as ``grumpy sample`` does;
* peak memory of one training step at the largest point, from the kernel's
  high-water mark of resident memory (``VmHWM`` in ``/proc/self/status``,
  reset through ``/proc/self/clear_refs`` after a warm-up step) minus the
  resident memory before that step, in a fresh process per side;
* the roofline: the float32 matrix-product rate of a large square product, and
  each training and inference point as a percentage of it, counting
  6 * 3H * (I + H) + 6 * H * V floating-point operations per token for training
  and a third of that, the forward's, for inference;
* precision: generation and inference (B = 1, 32, 128) at the generation grid's H
  with the GRU's weights in int8 and bfloat16 (``grumpy.quantize``), against torch's
  float32 ``nn.GRU`` and its dynamically quantized int8 GRU with the same weights
  (the sides of ``benchmarks/quantized.py``, in their own processes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

I_SIZE = 65  # input width (one-hot characters)
V_SIZE = 65  # classes
T_STEPS = 100
LR = 0.01
# "composed" is grumpy's GRU layer in a program whose other parts are plain NumPy (_composed_side).
SIDES = ("grumpy", "composed", "torch", "jax")
# An optional extra side: grumpy with its compiled path and MKL switched off
# (GRUMPY_NUMBA=0, GRUMPY_MKL=0), i.e. the pure NumPy kernels, as a baseline measured in the same run.
EXTRA_SIDES = ("numpy",)

MEASURES = ("train", "infer", "gen", "memory", "precision")
FULL = {"H": [64, 256, 1024], "B": [1, 32, 128], "gen_H": [256, 1024], "mem": (1024, 128)}
QUICK = {"H": [64], "B": [1, 32], "gen_H": [256], "mem": (64, 32)}


def flops_per_token(H: int, I: int = I_SIZE, V: int = V_SIZE, mode: str = "train") -> int:
    """Flops per token: the forward 2 per multiply-add of its products, training
    three times that (the backward twice the forward); generation is not counted."""
    forward = 2 * 3 * H * (I + H) + 2 * H * V
    return 3 * forward if mode == "train" else forward


def _cpu() -> str:
    """The CPU's model name and widest vector extension (Linux's /proc/cpuinfo; elsewhere
    what platform knows): runs on different machines are told apart by it."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    vec = next((v for f, v in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if f in flags), "no AVX")
    return f"{name or platform.processor() or 'unknown CPU'}, {vec}"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _data(T: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    """The same one-hot inputs (T, B, I) and targets (T, B) for every side."""
    rng = np.random.default_rng(1234)
    idx = rng.integers(0, I_SIZE, (T, B))
    x = np.zeros((T, B, I_SIZE), np.float32)
    np.put_along_axis(x, idx[..., None], 1.0, axis=-1)
    y = rng.integers(0, V_SIZE, (T, B))
    return x, y


# ---------------------------------------------------------------------------
# The three sides. Each builder returns a zero-argument callable doing one unit
# of work (one training step, one inference pass, or one generated character).
# ---------------------------------------------------------------------------


def _grumpy_side(mode: str, H: int, B: int, T: int) -> Callable[[], Any]:
    from grumpy.kernels import linear
    from grumpy.kernels.blas import column_sums, matmul
    from grumpy.layers import GRU
    from grumpy.lm.model import cross_entropy, nll

    gru = GRU(I_SIZE, H, dtype=np.float32, seed=0)
    rng = np.random.default_rng(1)
    k = 1.0 / math.sqrt(H)
    W = rng.uniform(-k, k, (V_SIZE, H)).astype(np.float32)
    b = rng.uniform(-k, k, V_SIZE).astype(np.float32)
    x, y = _data(T, B)
    h0 = np.zeros((1, B, H), np.float32)

    if mode == "gen":
        # The lean single-step path (no cache, no layer checks), as `grumpy sample` uses it.
        from grumpy.kernels import GRUStep

        p = gru.params
        step = GRUStep(p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"])
        x1 = x[0, 0]
        state = {"h": np.zeros(H, np.float32)}

        def gen() -> np.ndarray:
            h = step(x1, state["h"])
            state["h"] = h
            return matmul(W, h) + b

        return gen

    def logits_of(grad: bool = True) -> tuple[np.ndarray, np.ndarray]:
        out, _ = gru.forward(x, h0, grad=grad)
        out2 = out.reshape(T * B, H)
        logits = linear(out2, W)  # as grumpy.lm's head
        logits += b
        return logits, out2

    if mode == "infer":
        gru.eval()

        def infer() -> float:  # the loss alone: no softmax gradient
            return nll(logits_of(grad=False)[0], y)

        return infer

    def train() -> float:
        logits, out2 = logits_of()
        loss, d = cross_entropy(logits, y.reshape(-1))
        dW = matmul(d.T, out2)
        db = column_sums(d)
        d_out = matmul(d, W).reshape(T, B, H)
        gru.zero_grad()
        gru.backward(d_out, input_grad=False)  # the inputs are data, as torch's (no requires_grad)
        for name, prm in gru.params.items():
            prm -= LR * gru.grads[name]
        W[...] -= LR * dW
        b[...] -= LR * db
        return loss

    return train


def _composed_side(mode: str, H: int, B: int, T: int) -> Callable[[], Any]:
    """grumpy's GRU layer inside a program written the plain way: everything else (the
    head, softmax, its gradient, the SGD update) is ordinary NumPy, no grumpy helper."""
    from grumpy import GRU

    gru = GRU(I_SIZE, H, dtype=np.float32, seed=0)
    rng = np.random.default_rng(1)
    k = 1.0 / math.sqrt(H)
    W = rng.uniform(-k, k, (V_SIZE, H)).astype(np.float32)
    b = rng.uniform(-k, k, V_SIZE).astype(np.float32)
    x, y = _data(T, B)
    rows, targets = np.arange(T * B), y.reshape(-1)

    if mode == "gen":
        state = {"h": np.zeros((1, 1, H), np.float32)}
        x1 = x[:1, :1]

        def gen() -> np.ndarray:
            out, state["h"] = gru.forward(x1, state["h"], grad=False)
            return out[0, 0] @ W.T + b

        return gen

    def log_softmax(out: np.ndarray) -> np.ndarray:
        z = out.reshape(T * B, H) @ W.T + b
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    if mode == "infer":

        def infer() -> float:
            out, _ = gru.forward(x, grad=False)
            return float(-log_softmax(out)[rows, targets].mean())

        return infer

    def train() -> float:
        out, _ = gru.forward(x)
        logp = log_softmax(out)
        loss = float(-logp[rows, targets].mean())
        d = np.exp(logp)  # softmax, then its cross-entropy gradient
        d[rows, targets] -= 1.0
        d /= T * B
        out2 = out.reshape(T * B, H)
        dW, db = d.T @ out2, d.sum(axis=0)
        gru.zero_grad()
        gru.backward((d @ W).reshape(T, B, H))
        for name, prm in gru.params.items():
            prm -= LR * gru.grads[name]
        W[...] -= LR * dW
        b[...] -= LR * db
        return loss

    return train


def _torch_side(mode: str, H: int, B: int, T: int) -> Callable[[], Any]:
    import torch

    torch.manual_seed(0)
    gru = torch.nn.GRU(I_SIZE, H)
    head = torch.nn.Linear(H, V_SIZE)
    xn, yn = _data(T, B)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn).reshape(-1)
    if mode == "gen":
        x1 = x[:1, :1]
        state = {"h": torch.zeros(1, 1, H)}

        def gen() -> Any:
            with torch.no_grad():
                out, h = gru(x1, state["h"])
                state["h"] = h
                return head(out)

        return gen

    def forward_loss() -> Any:
        out, _ = gru(x)
        return torch.nn.functional.cross_entropy(head(out).reshape(T * B, V_SIZE), y)

    if mode == "infer":

        def infer() -> float:
            with torch.no_grad():
                return float(forward_loss())

        return infer

    opt = torch.optim.SGD(list(gru.parameters()) + list(head.parameters()), lr=LR)

    def train() -> float:
        opt.zero_grad()
        loss = forward_loss()
        loss.backward()
        opt.step()
        return loss.item()

    return train


def _jax_side(mode: str, H: int, B: int, T: int) -> Callable[[], Any]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class LM(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:  # x (B, T, I)
            out = nn.RNN(nn.GRUCell(features=H))(x)
            return nn.Dense(V_SIZE)(out)

    class Step(nn.Module):
        @nn.compact
        def __call__(self, h: Any, x: Any) -> Any:  # h (1, H), x (1, I)
            h, out = nn.GRUCell(features=H)(h, x)
            return h, nn.Dense(V_SIZE)(out)

    xn, yn = _data(T, B)
    x = jnp.asarray(xn.transpose(1, 0, 2))  # flax's RNN is batch-major
    y = jnp.asarray(yn.T)
    key = jax.random.PRNGKey(0)

    if mode == "gen":
        step = Step()
        h0 = jnp.zeros((1, H), jnp.float32)
        params = step.init(key, h0, x[:1, 0])
        fn = jax.jit(step.apply)
        x1 = x[:1, 0]
        fn(params, h0, x1)[0].block_until_ready()  # compile
        state = {"h": h0}

        def gen() -> Any:
            h, logits = fn(params, state["h"], x1)
            state["h"] = h
            return logits.block_until_ready()

        return gen

    model = LM()
    params = model.init(key, x)

    def loss_fn(p: Any) -> Any:
        logits = model.apply(p, x)
        lp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(lp, y[..., None], axis=-1))

    if mode == "infer":
        fwd = jax.jit(loss_fn)
        return lambda: fwd(params).block_until_ready()

    @jax.jit
    def train_step(p: Any) -> Any:
        loss, g = jax.value_and_grad(loss_fn)(p)
        return jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g), loss

    state = {"p": params}

    def train() -> Any:
        state["p"], loss = train_step(state["p"])
        return loss.block_until_ready()

    return train


BUILDERS = {"grumpy": _grumpy_side, "composed": _composed_side, "numpy": _grumpy_side, "torch": _torch_side,
            "jax": _jax_side}


def _matmul_gflops(side: str, n: int = 2048, reps: int = 5) -> float:
    """The best large float32 product rate (GFLOP/s) of this side's library."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    bm = rng.standard_normal((n, n)).astype(np.float32)
    if side == "torch":
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(bm)
        f: Callable[[], Any] = lambda: torch.mm(ta, tb)  # noqa: E731
    elif side == "jax":
        import jax
        import jax.numpy as jnp

        ja, jb = jnp.asarray(a), jnp.asarray(bm)
        mm = jax.jit(jnp.matmul)
        f = lambda: mm(ja, jb).block_until_ready()  # noqa: E731
    elif side == "composed":  # the user's own products: NumPy's
        f = lambda: a @ bm  # noqa: E731
    else:  # grumpy's products: MKL when installed, else NumPy's BLAS
        from grumpy.kernels.blas import matmul

        f = lambda: matmul(a, bm)  # noqa: E731
    f()
    best = min(_timed(f) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(f: Callable[[], Any], k: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t0) / k


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_memory(side: str, H: int, B: int, T: int) -> dict[str, Any]:
    """In a fresh process: the resident memory training needs beyond the model and data.

    Measured from before the first step, so that buffers a side keeps from one
    step to the next (grumpy's workspaces, allocator caches) count, as does
    compiled code (numba's, XLA's)."""
    import gc

    step = BUILDERS[side]("train", H, B, T)
    gc.collect()
    base = _status_kb("VmRSS")
    step()  # warm-up: lazy allocations, jit compilation
    gc.collect()
    how = "VmHWM after clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current resident size
    except OSError:
        how = "VmHWM (not resettable: includes set-up)"
    step()
    peak = _status_kb("VmHWM")
    return {"step_peak_mb": (peak - base) / 1024, "rss_mb": base / 1024, "how": how}


def _configure_threads(side: str, threads: int) -> Any:
    """Give the side all cores; returns an object to keep alive (threadpoolctl's limiter)."""
    if side == "composed":  # as a user runs it: nothing configured
        return None
    if side in ("grumpy", "numpy"):
        from grumpy.kernels.blas import blas_threads

        return blas_threads(threads)
    from threadpoolctl import threadpool_limits

    keep = threadpool_limits(limits=threads, user_api="blas")
    if side == "torch":
        import torch

        torch.set_num_threads(threads)
    return keep


def _worker() -> None:
    """The child: reads JSON requests from stdin, answers one JSON line each."""
    side, threads = sys.argv[2], int(sys.argv[3])
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries' chatter goes to stderr, the protocol keeps stdout
    keep = _configure_threads(side, threads)  # noqa: F841
    fn: Callable[[], Any] | None = None
    k = 1
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "setup":
                fn = None
                t0 = time.perf_counter()
                fn = BUILDERS[side](req["mode"], req["H"], req["B"], req["T"])
                fn()  # first call: jit compilation for JAX
                first = time.perf_counter() - t0
                for _ in range(req.get("warmup", 1)):
                    one = _timed(fn)
                k = max(1, math.ceil(req["sample_s"] / max(one, 1e-9)))
                reply: dict[str, Any] = {"first_s": first, "step_s": one, "k": k}
            elif op == "time":
                assert fn is not None
                reply = {"s": _timed(fn, k)}
            elif op == "matmul":
                reply = {"gflops": _matmul_gflops(side)}
            elif op == "memory":
                reply = _peak_memory(side, req["H"], req["B"], req["T"])
            else:
                reply = {"error": f"unknown op {op}"}
        except Exception as e:  # report, do not hang the parent
            reply = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


class Worker:
    """The parent's handle on one side's child process."""

    def __init__(self, side: str, threads: int, extra_env: dict[str, str] | None = None) -> None:
        env = dict(os.environ, **(extra_env or {}))
        env["PJRT_NPROC"] = str(threads)  # XLA's CPU thread count
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("NUMBA_NUM_THREADS", str(threads))
        env.setdefault("JAX_PLATFORMS", "cpu")
        self.side = side
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", side, str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )

    def ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def available_sides() -> dict[str, str | None]:
    """Side -> None if it can run here, else why not."""
    out: dict[str, str | None] = {"grumpy": None, "composed": None, "numpy": None}
    out["torch"] = None if importlib.util.find_spec("torch") else "torch not installed"
    missing = [m for m in ("jax", "flax") if importlib.util.find_spec(m) is None]
    out["jax"] = f"{' and '.join(missing)} not installed" if missing else None
    return out


def run(
    *,
    quick: bool = False,
    sides: list[str] | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    measures: tuple[str, ...] = MEASURES,
    hidden: list[int] | None = None,
    batch: list[int] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (see :func:`to_markdown`).
    ``hidden`` / ``batch`` replace the grid's H (train, infer, gen) / B (train, infer)."""
    grid = dict(QUICK if quick else FULL)
    if hidden:
        grid["H"] = grid["gen_H"] = hidden
    if batch:
        grid["B"] = batch
    threads = threads or _cores()
    repeats = repeats or (3 if quick else 5)
    sample_s = 0.05 if quick else 0.25
    settle_s = float(os.environ.get("GRUMPY_BENCH_SETTLE", "0.3"))  # MKL's threads spin 0.2 s
    avail = available_sides()
    wanted = sides or list(SIDES)
    active = [s for s in wanted if avail.get(s) is None]
    skipped = {s: avail.get(s) or "not requested" for s in SIDES if s not in active}
    extra = {"numpy": {"GRUMPY_NUMBA": "0", "GRUMPY_MKL": "0"}}
    result: dict[str, Any] = {
        "machine": {"cpu": _cpu(), "cores": _cores(), "threads": threads, "python": sys.version.split()[0]},
        "config": {"T": T_STEPS, "I": I_SIZE, "V": V_SIZE, "dtype": "float32", "quick": quick,
                   "repeats": repeats, "sample_s": sample_s},
        "sides": active, "skipped": skipped, "points": [], "compile_s": {}, "matmul_gflops": {},
        "memory": {},
    }
    workers = {s: Worker(s, threads, extra.get(s)) for s in active}
    try:
        versions = {}
        for s, w in workers.items():
            result["matmul_gflops"][s] = w.ask(op="matmul").get("gflops")
            versions[s] = _version(s)
        result["machine"]["versions"] = versions
        plan = [(m, H, B) for m in ("train", "infer") if m in measures for H in grid["H"] for B in grid["B"]]
        plan += [("gen", H, 1) for H in grid["gen_H"] if "gen" in measures]
        for mode, H, B in plan:
            T = 1 if mode == "gen" else T_STEPS
            point: dict[str, Any] = {"mode": mode, "H": H, "B": B, "T": T, "tok_s": {}, "error": {}}
            ok = []
            for s, w in workers.items():
                rep = w.ask(op="setup", mode=mode, H=H, B=B, T=T, sample_s=sample_s,
                            warmup=1 if quick else 2)
                if "error" in rep:
                    point["error"][s] = rep["error"]
                    continue
                ok.append(s)
                if s == "jax":
                    result["compile_s"][f"{mode} H={H} B={B}"] = rep["first_s"] - rep["step_s"]
            samples: dict[str, list[float]] = {s: [] for s in ok}
            for _ in range(repeats):
                for s in ok:  # alternate: A B C A B C ...
                    time.sleep(settle_s)  # let the previous side's spinning threads go idle
                    samples[s].append(workers[s].ask(op="time")["s"])
            for s in ok:
                point["tok_s"][s] = B * T / statistics.median(samples[s])
            result["points"].append(point)
            log(_point_line(point))
        for s, w in workers.items():  # again at the end: one busy moment must not set the roofline
            g = w.ask(op="matmul").get("gflops")
            if g and (result["matmul_gflops"].get(s) or 0) < g:
                result["matmul_gflops"][s] = g
    finally:
        for w in workers.values():
            w.close()
    mH, mB = grid["mem"]
    result["memory"]["point"] = {"H": mH, "B": mB}
    for s in active if "memory" in measures else []:  # a fresh process per side: nothing else in its heap
        w = Worker(s, threads, extra.get(s))
        try:
            result["memory"][s] = w.ask(op="memory", H=mH, B=mB, T=T_STEPS)
        finally:
            w.close()
        log(f"memory {s}: {result['memory'][s]}")
    rates = [g for g in result["matmul_gflops"].values() if g]
    result["roofline_gflops"] = max(rates) if rates else None
    if "precision" in measures:
        result["precision"] = _precision_rows(quick, threads, repeats, grid["gen_H"], log)
    return result


def _quantized_harness() -> Any:
    """benchmarks/quantized.py, the reduced-precision sides (its own workers and table)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quantized.py")
    spec = importlib.util.spec_from_file_location("grumpy_bench_quantized", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _precision_rows(quick: bool, threads: int, repeats: int, hidden: list[int],
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Generation and inference (B = 1, 32, 128) in grumpy float32, int8 and bfloat16 against
    torch float32 and torch's dynamic int8 GRU with the same weights (benchmarks/quantized.py)."""
    if importlib.util.find_spec("torch") is None:
        return {"skipped": "torch not installed"}
    q = _quantized_harness()
    points = [("gen", H, 1) for H in hidden]
    points += [("infer", H, B) for H in hidden for B in ((1, 32) if quick else (1, 32, 128))]
    log("reduced precision: " + ", ".join(f"{m} H={H} B={B}" for m, H, B in points))
    return {"points": q.run(points, max(repeats, 3), 0.05 if quick else 0.4, threads, 0.3)}


def _version(side: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = {"grumpy": ["numpy", "numba", "mkl"], "composed": ["numpy"], "numpy": ["numpy"], "torch": ["torch"],
             "jax": ["jax", "flax"]}[side]
    out = []
    for n in names:
        try:
            out.append(f"{n} {version(n)}")
        except PackageNotFoundError:
            out.append(f"no {n}")
    return ", ".join(out)


def _point_line(p: dict[str, Any]) -> str:
    vals = " ".join(f"{s}={v:,.0f}" for s, v in p["tok_s"].items())
    return f"{p['mode']} H={p['H']} B={p['B']}: {vals} tok/s {p['error'] or ''}"


def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def to_markdown(res: dict[str, Any]) -> str:
    """The result as a Markdown table (plus memory, roofline and compile lines)."""
    roof = res.get("roofline_gflops")
    base = "numpy" in res["sides"]
    lines = [
        "| measure | H | B | grumpy tok/s | composed tok/s | torch tok/s | JAX tok/s | grumpy/torch | grumpy/JAX "
        "| composed/torch | composed/JAX | % roofline |" + (" NumPy-path tok/s | grumpy/NumPy-path |" if base else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if base else ""),
    ]
    for p in res["points"]:
        r = p["tok_s"]
        g, c, t, j, n = r.get("grumpy"), r.get("composed"), r.get("torch"), r.get("jax"), r.get("numpy")
        pct = ("" if p["mode"] == "gen" or not (roof and g)
               else f"{100 * g * flops_per_token(p['H'], mode=p['mode']) / (roof * 1e9):.0f}%")
        lines.append(
            f"| {p['mode']} | {p['H']} | {p['B']} | {_fmt_rate(g)} | {_fmt_rate(c)} | {_fmt_rate(t)} | {_fmt_rate(j)} "
            f"| {_ratio(g, t)} | {_ratio(g, j)} | {_ratio(c, t)} | {_ratio(c, j)} | {pct} |"
            + (f" {_fmt_rate(n)} | {_ratio(g, n)} |" if base else "")
        )
    mem = res.get("memory", {})
    out = ["\n".join(lines), ""]
    if mem.get("point"):
        mp = mem["point"]
        parts = []
        for s in SIDES + EXTRA_SIDES:
            if s not in res["sides"] and s in EXTRA_SIDES:
                continue
            m = mem.get(s)
            parts.append(f"{s} {m['step_peak_mb']:.0f} MB" if m and "step_peak_mb" in m else f"{s} n/a")
        how = next((mem[s]["how"] for s in SIDES if s in mem and "how" in mem[s]), "")
        out.append(f"Peak memory of a training step at H={mp['H']}, B={mp['B']} ({how}, above the "
                   f"resident size before the first step): " + ", ".join(parts) + ".")
    mm = ", ".join(f"{s} {g:.0f}" for s, g in res.get("matmul_gflops", {}).items() if g)
    if roof:
        out.append(f"Roofline: large float32 matrix product {roof:.0f} GFLOP/s (best of: {mm}; each measured at the "
                   "start and the end); training counts 6*3H*(I+H) + 6*H*V flops per token, inference a third of that.")
    if res.get("compile_s"):
        cs = ", ".join(f"{k} {v:.1f}s" for k, v in res["compile_s"].items())
        out.append(f"JAX compile time (excluded above): {cs}.")
    for s, why in res.get("skipped", {}).items():
        out.append(f"{s}: n/a ({why}).")
    errs = [f"{p['mode']} H={p['H']} B={p['B']} {s}: {e}" for p in res["points"] for s, e in p["error"].items()]
    if errs:
        out.append("Errors: " + "; ".join(errs))
    prec = res.get("precision")
    if prec and "points" in prec:
        table = _quantized_harness().to_markdown(prec["points"])
        out.append("\nReduced precision (inference only; tokens/s, each side in its own process, medians of "
                   f"alternated samples; only the GRU is quantized):\n\n{table}\n")
    elif prec:
        out.append(f"Reduced precision: n/a ({prec['skipped']}).")
    m = res["machine"]
    vers = "; ".join(m.get("versions", {}).values())
    out.append(f"Machine: {m.get('cpu', 'CPU not recorded')}, {m['cores']} cores, {m['threads']} threads per side, "
               f"Python {m['python']}; {vers}. "
               f"T={res['config']['T']}, float32, median of {res['config']['repeats']} alternated samples.")
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a reduced grid (under a minute), e.g. as a smoke test")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--sides", default=",".join(SIDES),
                   help=f"comma-separated subset of {','.join(SIDES + EXTRA_SIDES)} (default: {','.join(SIDES)}, "
                   "those installed); 'numpy' is grumpy with its compiled path off, a baseline column")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per side and point (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=None, help="threads per side (default: all cores)")
    p.add_argument("--hidden", default=None, help="comma-separated hidden sizes replacing the grid's")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes replacing the grid's")
    p.add_argument("--measures", default=",".join(MEASURES),
                   help=f"comma-separated subset of {','.join(MEASURES)} (default: all); precision: the int8 and "
                   "bfloat16 rows against torch's float32 and dynamic int8 GRU")


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python benchmarks/bench.py [options]`` (``--help`` lists them)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker()
        return 0
    p = argparse.ArgumentParser(
        prog="grumpy bench", description="Train, inference and generation throughput of grumpy, torch.nn.GRU and "
        "JAX/Flax on a character language-model step (T=100, I=V=65, float32), each in its own process.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return _run_cli(args)
    except ValueError as e:
        print(f"grumpy bench: error: {e}", file=sys.stderr)
        return 2


def _run_cli(args: argparse.Namespace) -> int:
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES + EXTRA_SIDES]
    if bad or not sides:
        raise ValueError(
            f"--sides: expected a comma-separated subset of {','.join(SIDES + EXTRA_SIDES)}, got {args.sides!r}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats: expected a positive integer, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected a positive integer, got {args.threads}")
    measures = tuple(m.strip() for m in args.measures.split(",") if m.strip())
    if not measures or any(m not in MEASURES for m in measures):
        raise ValueError(
            f"--measures: expected a comma-separated subset of {','.join(MEASURES)}, got {args.measures!r}")
    sizes = {}
    for name in ("hidden", "batch"):
        text = getattr(args, name)
        try:
            sizes[name] = [int(v) for v in text.split(",")] if text else None
        except ValueError:
            raise ValueError(f"--{name}: expected comma-separated positive integers, got {text!r}") from None
        if sizes[name] is not None and min(sizes[name]) < 1:
            raise ValueError(f"--{name}: expected comma-separated positive integers, got {text!r}")
    t0 = time.perf_counter()
    res = run(quick=args.quick, sides=sides, repeats=args.repeats, threads=args.threads, measures=measures,
              hidden=sizes["hidden"], batch=sizes["batch"],
              log=lambda s: print(s, file=sys.stderr, flush=True))
    res["wall_s"] = time.perf_counter() - t0
    sys.stdout.write(to_markdown(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
