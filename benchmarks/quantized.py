"""Reduced-precision inference: grumpy float32, int8 and bfloat16 against torch's float32
``nn.GRU`` and its dynamically quantized int8 GRU, with the same weights, in the same run.

    python benchmarks/quantized.py                 # the full grid, about 10 minutes
    python benchmarks/quantized.py --quick         # H=256 only, fewer rounds
    python benchmarks/quantized.py --json out.json

The model is the language-model step of ``grumpy bench``: a one-layer GRU, one-hot input
of width 65, a linear head to 65 classes. ``gen``: one character of one stream per
call (T = 1, B = 1), tokens per second; ``infer``: forward, head and loss over T = 100
steps of B streams, tokens (T * B) per second. Only the GRU is quantized, on both sides
(torch: ``torch.ao.quantization.quantize_dynamic`` on the ``nn.GRU``; the head stays
float32, as in grumpy's quantized character model).

Each side runs in its own process with the same thread count (2 by default); the
parent asks them in turn, one timed sample each, rotating who goes first, for
``--rounds`` rounds, and reports medians. On a shared machine the other load moves
every side alike within a round, not the ratios' medians much.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

I_SIZE = V_SIZE = 65
T_STEPS = 100
SIDES = ("grumpy-f32", "grumpy-int8", "grumpy-bf16", "torch-f32", "torch-int8")


def _data(T: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    idx = rng.integers(0, I_SIZE, (T, B))
    x = np.zeros((T, B, I_SIZE), np.float32)
    np.put_along_axis(x, idx[..., None], 1.0, axis=-1)
    return x, rng.integers(0, V_SIZE, (T, B))


def _torch_model(H: int) -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    return torch.nn.GRU(I_SIZE, H), torch.nn.Linear(H, V_SIZE)


def _build_grumpy(precision: str, mode: str, H: int, B: int, T: int) -> Callable[[], Any]:
    import grumpy
    from grumpy.kernels import linear
    from grumpy.kernels.blas import matmul
    from grumpy.lm.model import nll

    gru_t, head_t = _torch_model(H)  # the same weights as the torch sides
    gru = grumpy.GRU(I_SIZE, H).eval()
    gru.load_state_dict(gru_t.state_dict())
    W = head_t.weight.detach().numpy().copy()
    b = head_t.bias.detach().numpy().copy()
    x, y = _data(T, B)
    wanted: Any = precision  # "int8" or "bfloat16" here
    model: Any = gru if precision == "float32" else grumpy.quantize(gru, wanted)
    if mode == "gen":
        x1 = x[0]  # (1, I)
        if precision == "float32":  # the lean path `grumpy sample` uses
            from grumpy.kernels import GRUStep

            p = gru.params
            step = GRUStep(p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"])
            state = {"h": np.zeros(H, np.float32)}

            def gen32() -> np.ndarray:
                state["h"] = step(x1[0], state["h"])
                return matmul(W, state["h"]) + b

            return gen32
        hstate = {"h": model.initial_state(1)}

        def gen() -> np.ndarray:
            out, hstate["h"] = model.step(x1, hstate["h"])
            return matmul(W, out[0]) + b

        return gen

    def infer() -> float:
        out, _ = model.forward(x, grad=False)
        logits = linear(out.reshape(T * B, H), W)  # as grumpy.lm's head
        logits += b
        return nll(logits, y)

    return infer


def _build_torch(precision: str, mode: str, H: int, B: int, T: int) -> Callable[[], Any]:
    import torch

    gru, head = _torch_model(H)
    if precision == "int8":
        gru = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(gru), {torch.nn.GRU}, dtype=torch.qint8)[0]
    xn, yn = _data(T, B)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn).reshape(-1)
    if mode == "gen":
        x1 = x[:1, :1]
        state = {"h": torch.zeros(1, 1, H)}

        def gen() -> Any:
            with torch.no_grad():
                out, state["h"] = gru(x1, state["h"])
                return head(out)

        return gen

    def infer() -> float:
        with torch.no_grad():
            out, _ = gru(x)
            return float(torch.nn.functional.cross_entropy(head(out).reshape(T * B, V_SIZE), y))

    return infer


def build(side: str, mode: str, H: int, B: int, T: int) -> Callable[[], Any]:
    lib, precision = side.split("-")
    precision = {"f32": "float32", "bf16": "bfloat16"}.get(precision, precision)
    return (_build_grumpy if lib == "grumpy" else _build_torch)(precision, mode, H, B, T)


def _timed(f: Callable[[], Any], k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t0) / k


def worker(side: str, threads: int) -> None:
    """The child: one JSON request per line on stdin, one JSON answer per line."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries' chatter to stderr
    if side.startswith("torch"):
        import torch

        torch.set_num_threads(threads)
    else:
        import grumpy.kernels.blas  # noqa: F401  (loads MKL so that threadpoolctl limits it)
    from threadpoolctl import threadpool_limits

    keep = threadpool_limits(limits=threads, user_api="blas")  # noqa: F841
    fn: Callable[[], Any] | None = None
    k = 1
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "setup":
                fn = build(side, req["mode"], req["H"], req["B"], req["T"])
                for _ in range(3):  # compilation, caches, MKL's buffers
                    one = _timed(fn, 1)
                k = max(1, math.ceil(req["sample_s"] / max(one, 1e-9)))
                reply: dict[str, Any] = {"k": k}
            else:
                assert fn is not None
                reply = {"s": _timed(fn, k)}
        except Exception as e:  # report it, do not hang the parent
            reply = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


class Worker:
    def __init__(self, side: str, threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.side = side
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", side,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)

    def ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run(points: list[tuple[str, int, int]], rounds: int, sample_s: float, threads: int,
        pause: float) -> list[dict[str, Any]]:
    workers = {s: Worker(s, threads) for s in SIDES}
    results = []
    try:
        for mode, H, B in points:
            T = 1 if mode == "gen" else T_STEPS
            errors = {}
            for s, w in workers.items():
                r = w.ask(op="setup", mode=mode, H=H, B=B, T=T, sample_s=sample_s)
                if "error" in r:
                    errors[s] = r["error"]
            live = [s for s in SIDES if s not in errors]
            times: dict[str, list[float]] = {s: [] for s in live}
            for i in range(rounds):  # A B C D E, then B C D E A, ...
                for s in live[i % len(live):] + live[: i % len(live)]:
                    time.sleep(pause)  # the last side's spinning threads (OpenMP, MKL) go to sleep
                    times[s].append(workers[s].ask(op="time")["s"])
            rate = {s: (T * B) / statistics.median(v) for s, v in times.items()}
            results.append({"mode": mode, "H": H, "B": B, "T": T, "tok_s": rate, "errors": errors,
                            "samples_s": times})
            print(_line(results[-1]), file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    return results


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _line(p: dict[str, Any]) -> str:
    return f"{p['mode']} H={p['H']} B={p['B']}: " + ", ".join(f"{s} {_fmt(v)}" for s, v in p["tok_s"].items())


def to_markdown(results: list[dict[str, Any]]) -> str:
    head = ("| measure | H | B | grumpy f32 | grumpy int8 | grumpy bf16 | torch f32 | torch int8 "
            "| int8 / torch int8 | int8 / torch f32 | int8 / grumpy f32 | bf16 / grumpy f32 |")
    rows = [head, "|---|---:|---:|" + "---:|" * 9]
    for p in results:
        r = p["tok_s"]
        g = [r.get(s) for s in SIDES]
        rows.append(f"| {p['mode']} | {p['H']} | {p['B']} | " + " | ".join(_fmt(v) for v in g) + " | "
                    + " | ".join([_ratio(g[1], g[4]), _ratio(g[1], g[3]), _ratio(g[1], g[0]), _ratio(g[2], g[0])])
                    + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help="threads for every side (default 2)")
    ap.add_argument("--rounds", type=int, default=7, help="timed samples per side and point (default 7)")
    ap.add_argument("--sample-s", type=float, default=0.4, help="seconds per timed sample (default 0.4)")
    ap.add_argument("--pause", type=float, default=0.3,
                    help="seconds between samples, so one side's spinning threads do not slow the next (0.3)")
    ap.add_argument("--quick", action="store_true", help="H=256 only, 3 rounds")
    ap.add_argument("--hidden", type=int, nargs="*", help="hidden sizes (default 256 1024)")
    ap.add_argument("--modes", nargs="*", default=["gen", "infer"], help="gen, infer or both (default)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.threads)
        return
    Hs = args.hidden or ([256] if args.quick else [256, 1024])
    rounds = 3 if args.quick else args.rounds
    points = [("gen", H, 1) for H in Hs if "gen" in args.modes]
    points += [("infer", H, B) for H in Hs for B in (1, 32, 128) if "infer" in args.modes]
    import platform

    import torch

    t0 = time.time()
    results = run(points, rounds, args.sample_s, args.threads, args.pause)
    print(f"Tokens per second, medians of {rounds} alternated samples per side; {args.threads} threads per side; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - t0:.0f} s.\n")
    print(to_markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rounds": rounds, "points": results}, f, indent=1)


if __name__ == "__main__":
    main()
