"""What a training run shows and records: messages, the progress bar, metrics.jsonl, loss.png."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from grumpy.lm.model import LN2


class Reporter:
    """Messages go to ``log`` if given, else above the progress bar, else to stdout.
    Metrics are appended to ``metrics.jsonl`` one JSON line at a time, flushed, so a
    crash loses at most the line being written."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log = log
        self.bar: Any = None
        self.metrics: TextIO | None = None
        self.chars_per_s = 0.0  # training alone: evaluation time is left out (see exclude)
        self.loss_avg: float | None = None  # exponential average of the training loss
        self._rate_t = time.perf_counter()
        self._rate_steps = 0

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)
        elif self.bar is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def open(self, metrics_path: str | None, *, progress: bool, total: float, initial: float, by_steps: bool) -> None:
        """Start appending to metrics_path (None: record nothing, as ranks other than 0
        do) and, with ``progress``, show a bar counting steps (``by_steps``) or seconds up to ``total``."""
        self.metrics = open(metrics_path, "a", encoding="utf-8") if metrics_path is not None else None
        self._rate_t = time.perf_counter()
        if not progress:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is a dependency, but train on without it
            return
        unit = "steps" if by_steps else "s"
        self.bar = tqdm(total=int(total), initial=int(initial), unit=unit, dynamic_ncols=True, leave=True,
                        file=sys.stderr, desc="train", disable=None,  # None: no bar when stderr is not a terminal
                        # seconds per second says nothing: progress, elapsed, ETA and the postfix only
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} " + unit
                        + " [{elapsed}<{remaining}{postfix}]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()

    def record(self, **row: Any) -> None:
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation) out of the characters per second."""
        self._rate_t += seconds

    def step(self, step: int, loss: float, lr: float, gnorm: float, chars: int, elapsed: float, progress: float,
             log_now: bool) -> None:
        """After each training step of ``chars`` characters: the running loss, the rate and
        a metrics line when ``log_now``, the bar moved to ``progress`` (steps or seconds)."""
        self.loss_avg = loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * loss
        self._rate_steps += 1
        if log_now:
            now = time.perf_counter()
            self.chars_per_s = self._rate_steps * chars / max(now - self._rate_t, 1e-9)
            self._rate_t, self._rate_steps = now, 0
            self.record(step=step, loss=round(loss, 5), lr=lr, grad_norm=round(gnorm, 5),
                        chars_per_s=round(self.chars_per_s), elapsed=round(elapsed, 3))
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {self.loss_avg:.3f}, {self.chars_per_s / 1000:.1f}k chars/s, lr {lr:.2e}",
                                     refresh=False)
            self.bar.update(int(progress) - self.bar.n)

    def evaluation(self, step: int, val: float, best: float, elapsed: float, budget: float | None) -> None:
        self.record(step=step, val_loss=val, val_bpc=val / LN2, elapsed=round(elapsed, 3))
        self.say(f"step {step}: val loss {val:.4f} nats/char = {val / LN2:.4f} bits/char"
                 + (" (best)" if val <= best else f" (best {best:.4f})")
                 + (f"; train loss {self.loss_avg:.4f}" if self.loss_avg is not None else "")
                 + (f", {self.chars_per_s / 1000:.1f}k chars/s" if self.chars_per_s else "")
                 + f", {elapsed:.0f} s" + (f" of {budget:g}" if budget else ""))


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file ([] if there is none); a line cut short by a crash is skipped."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return rows


def plot_losses(metrics_path: str, png_path: str) -> str | None:
    """Draw training and validation loss against step into ``png_path``; None if matplotlib is missing."""
    try:
        # Figure without pyplot: no global backend switch, no GUI, safe inside notebooks.
        from matplotlib.figure import Figure
    except ImportError:
        return None
    from grumpy.lm.checkpoint import atomic_write_bytes

    rows = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if tr:
        ax.plot(*zip(*tr), lw=0.8, alpha=0.7, label="train")
    if va:
        ax.plot(*zip(*va), "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(png_path, buf.getvalue())
    return png_path
