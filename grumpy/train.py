"""Train, sample and evaluate character-level GRU language models.

``train()``, ``sample()`` and ``evaluate()`` are plain functions; the
``grumpy train|sample|eval`` subcommands registered by :func:`register` only
parse arguments and call them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from grumpy.data import (
    Position,
    StreamBatcher,
    Vocab,
    eval_windows,
    load_text,
    min_text_length,
    split_text,
    text_digest,
)
from grumpy.model import CharModel, ModelConfig, cross_entropy, nll, sample_next
from grumpy.optim import OPTIMIZERS, clip_grad_norm, clip_grad_value, grad_norm, lr_at, make_optimizer

if TYPE_CHECKING:
    from grumpy.checkpoint import Checkpoint

# grumpy.checkpoint (and with it safetensors) is imported inside the functions that
# need it, so building the command-line parser imports nothing beyond NumPy.

LN2 = math.log(2.0)
ARCH_FIELDS = ("hidden_size", "num_layers", "embedding_dim", "reset_after", "dtype")


class ConfigError(ValueError):
    """Bad training input (option value, text file, output directory): the CLI reports it as a usage error."""


@dataclass
class TrainConfig:
    """Every setting of a training run (JSON round-trips via dataclasses.asdict / from_dict)."""

    text_file: str | None = None  # None: the Shakespeare corpus shipped with grumpy
    out_dir: str | None = None  # None: runs/<text file stem>
    # model
    hidden_size: int = 256
    num_layers: int = 2
    embedding_dim: int = 64
    reset_after: bool = True
    dropout: float = 0.0
    dtype: str = "float32"
    # data
    seq_len: int = 50
    batch_size: int = 32
    val_fraction: float = 0.1
    # optimisation
    optimizer: str = "adam"
    lr: float = 4e-3
    weight_decay: float | None = None  # None: the optimiser's own default
    momentum: float = 0.9  # sgd only
    clip_norm: float | None = 1.0
    clip_value: float | None = None
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    # run length and reporting
    max_steps: int | None = None
    time_budget: float | None = 300.0  # seconds of wall time for the whole run; None: no limit
    eval_every: int = 500
    eval_batch_size: int = 32
    sample_every: int = 1000
    sample_length: int = 200
    log_every: int = 10
    max_bad_steps: int = 5
    seed: int = 1337
    threads: int | None = None  # BLAS threads while training; None: BLAS's own setting (all cores)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            embedding_dim=self.embedding_dim, dropout=self.dropout, reset_after=self.reset_after, dtype=self.dtype,
        )


def opt(name: str) -> str:
    """The command-line spelling of a TrainConfig field."""
    return "--" + name.replace("_", "-")


def check_train_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the option and value for anything out of range."""

    def positive_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
            want = "an integer >= 0" if allow_zero else "a positive integer"
            raise ConfigError(f"{opt(name)}: expected {want}, got {v!r}")

    def positive_num(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (v == 0 and not allow_zero):
            want = "a number >= 0" if allow_zero else "a positive number"
            raise ConfigError(f"{opt(name)}: expected {want}, got {v!r}")

    for n in ("hidden_size", "num_layers", "seq_len", "batch_size", "eval_every", "eval_batch_size",
              "sample_every", "log_every", "max_bad_steps"):
        positive_int(n)
    positive_int("threads", allow_none=True)
    positive_int("embedding_dim", allow_zero=True)
    positive_int("warmup_steps", allow_zero=True)
    positive_int("sample_length", allow_zero=True)
    positive_int("max_steps", allow_none=True)
    positive_num("lr")
    positive_num("time_budget", allow_none=True)
    positive_num("clip_norm", allow_none=True)
    positive_num("clip_value", allow_none=True)
    positive_num("weight_decay", allow_none=True, allow_zero=True)
    if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"--dropout: expected a probability in [0, 1), got {cfg.dropout!r}")
    if not isinstance(cfg.val_fraction, (int, float)) or not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction: expected a number in (0, 1), got {cfg.val_fraction!r}")
    if not isinstance(cfg.min_lr_ratio, (int, float)) or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"--min-lr-ratio: expected a number in [0, 1], got {cfg.min_lr_ratio!r}")
    if not isinstance(cfg.momentum, (int, float)) or not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"--momentum: expected a number in [0, 1), got {cfg.momentum!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.schedule not in ("constant", "cosine"):
        raise ConfigError(f"--schedule: expected 'constant' or 'cosine', got {cfg.schedule!r}")
    if cfg.clip_norm is not None and cfg.clip_value is not None:
        raise ConfigError("--clip-norm and --clip-value: choose one way of clipping")
    if cfg.dtype not in ("float32", "float64"):
        raise ConfigError(f"--dtype: expected float32 or float64, got {cfg.dtype!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"--seed: expected an integer >= 0, got {cfg.seed!r}")


# -- evaluation -----------------------------------------------------------------


def estimate_loss(model: CharModel, ids: np.ndarray, *, batch_size: int = 32, seq_len: int = 100) -> float:
    """Mean loss (nats/char) of predicting every character of ``ids`` (N,) from the ones before it.

    The text is cut into ``batch_size`` contiguous streams read in windows of
    ``seq_len`` with the state carried, so every prediction (bar the first
    few of each stream) sees a long context. Dropout is off while evaluating.
    """
    was_training = model.gru.training
    model.eval()
    total, count = 0.0, 0
    h: np.ndarray | None = None
    try:
        for x, y, reset in eval_windows(ids, batch_size, seq_len):
            if reset or h is None:
                h = model.init_state(x.shape[1])
            elif x.shape[1] != h.shape[1]:  # the leftover continues the last stream
                h = np.ascontiguousarray(h[:, -1:])
            logits, h = model.forward(x, h, grad=False)
            total += nll(logits, y, reduction="sum")
            count += y.size
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("estimate_loss: need at least two characters")
    return total / count


def evaluate(
    model: CharModel | str | os.PathLike[str],
    text: str,
    *,
    vocab: str | None = None,
    batch_size: int = 32,
    seq_len: int = 100,
) -> dict[str, Any]:
    """Loss of ``model`` (a CharModel with ``vocab``, or a checkpoint path) over ``text``.

    Returns {"loss_nats", "bits_per_char", "chars"} where chars is the number
    of characters predicted (len(text) - 1). Characters outside the
    vocabulary raise ValueError listing them.
    """
    if not isinstance(model, CharModel):
        from grumpy.checkpoint import load_model

        model, meta = load_model(model)
        vocab = meta["vocab"]
    if vocab is None:
        raise ValueError("evaluate: pass vocab with a CharModel")
    v = Vocab(vocab)
    if len(text) < 2:
        raise ValueError(f"evaluate: need at least 2 characters of text, got {len(text)}")
    ids = v.encode(text)
    loss = estimate_loss(model, ids, batch_size=batch_size, seq_len=seq_len)
    return {"loss_nats": loss, "bits_per_char": loss / LN2, "chars": int(len(ids) - 1)}


# -- sampling -------------------------------------------------------------------


def sample(
    model: CharModel,
    vocab: str,
    *,
    prime: str = "",
    length: int = 500,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield ``length`` generated characters, one at a time, continuing ``prime``.

    temperature 0 is greedy. Without a prime the model starts from a zero state
    and a newline (or the first vocabulary character if the text had none).
    A prime with characters outside the vocabulary raises ValueError listing them.
    """
    v = Vocab(vocab)
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length: expected an integer >= 0, got {length!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a positive integer, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    bad = v.missing(prime)
    if bad:
        raise ValueError(f"prime: characters not in the model's vocabulary: {' '.join(repr(c) for c in bad)}")
    return _sample_iter(model, v, prime, int(length), float(temperature), top_k, top_p, seed)


def _sample_iter(model: CharModel, v: Vocab, prime: str, length: int, temperature: float,
                 top_k: int | None, top_p: float | None, seed: int | None) -> Iterator[str]:
    rng = np.random.default_rng(seed)
    start = prime or ("\n" if "\n" in v else v.chars[0])
    was_training = model.gru.training
    model.eval()
    try:
        logits, h_n = model.forward(v.encode(start)[:, None], grad=False)
        last, h = logits[-1, 0], h_n[:, 0]
        step = model.stepper()  # the lean one-character path: no cache, weights prepared once
        for _ in range(length):
            i = sample_next(last, rng, temperature=temperature, top_k=top_k, top_p=top_p)
            yield v.chars[i]
            last, h = step(i, h)
    finally:
        model.train(was_training)


# -- training -------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: str
    step: int
    best_val_loss: float | None
    latest: str | None
    best: str | None
    metrics: str
    plot: str | None
    stopped: str  # "max_steps", "time_budget", "interrupted", "stop_after", "non_finite", "done"


class _StopFlag:
    """Set by the first Ctrl-C; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def blas_threads(n: int | None) -> Any:
    """A context limiting BLAS to ``n`` threads (via threadpoolctl, when installed).

    On a quiet 2-core machine the default model trains about 1.5x faster with both
    cores (23k vs 15k chars/s); when the other core is busy with other work, a
    multi-threaded step can be several times slower, and ``--threads 1`` helps.
    """
    import contextlib

    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def default_out_dir(text_file: str | None) -> str:
    """runs/<text stem>, or runs/<stem>-2, -3, ... when earlier runs are there: a second
    `grumpy train` must neither fail nor touch the first one's files."""
    stem = "shakespeare" if text_file is None else os.path.splitext(os.path.basename(text_file))[0] or "run"
    base = os.path.join("runs", stem)
    out, n = base, 1
    while os.path.exists(out) and os.listdir(out):
        n += 1
        out = f"{base}-{n}"
    return out


def _prepare_out_dir(out: str, resuming_from: str | None) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the directory ({e.strerror or e})") from None
    probe = os.path.join(out, f".grumpy-write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--out {out}: the directory is not writable ({e.strerror or e})") from None
    existing = [n for n in ("latest.safetensors", "best.safetensors", "metrics.jsonl")
                if os.path.exists(os.path.join(out, n))]
    if existing and resuming_from is None:
        raise ConfigError(
            f"--out {out}: already holds a run ({', '.join(existing)}); continue it with "
            f"--resume {shlex.quote(os.path.join(out, 'latest.safetensors'))} or choose another --out"
        )
    if existing and resuming_from is not None:
        if os.path.realpath(os.path.dirname(os.path.abspath(resuming_from))) != os.path.realpath(out):
            raise ConfigError(
                f"--out {out}: already holds another run ({', '.join(existing)}); choose an empty --out "
                f"to continue {resuming_from} there"
            )


def _read_metrics(path: str) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
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
    import io

    from grumpy.checkpoint import atomic_write_bytes

    rows = _read_metrics(metrics_path)
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


def train(
    cfg: TrainConfig,
    *,
    resume: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a character-level language model as ``cfg`` says; returns where everything was written.

    ``resume``: a checkpoint to continue exactly (model, optimiser, data
    position, hidden state, random state, elapsed time). ``cfg.max_steps`` and
    ``cfg.time_budget`` count the whole run, resumed parts included.
    ``stop_after``: pause after this many steps in this call (checkpoint and
    return), for chunked runs. Bad input raises :class:`ConfigError`.
    """
    from grumpy.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint

    check_train_config(cfg)
    bar: Any = None

    def say(msg: str) -> None:
        if log is not None:
            log(msg)
        elif bar is not None and not bar.disable:
            bar.write(msg)
        else:
            print(msg, flush=True)

    ck: "Checkpoint | None" = None
    if resume is not None:
        try:
            ck = load_checkpoint(resume)
        except ValueError as e:
            raise ConfigError(f"--resume {e}") from None
    try:
        text = load_text(cfg.text_file)
    except ValueError as e:
        raise ConfigError(f"TEXT_FILE {e}" if cfg.text_file is not None else str(e)) from None
    name = cfg.text_file or "the shipped corpus"
    need = min_text_length(cfg.batch_size, cfg.seq_len, cfg.val_fraction)
    if len(text) < need:
        raise ConfigError(
            f"TEXT_FILE {name}: {len(text)} characters is too short for --batch-size {cfg.batch_size} x "
            f"--seq-len {cfg.seq_len}: need at least {need} (one window per stream in the "
            f"{1 - cfg.val_fraction:.0%} training split); use a longer text or smaller sizes"
        )
    vocab = Vocab.from_text(text)
    digest = text_digest(text)
    if ck is not None:
        if ck.meta["vocab"] != vocab.chars:
            raise ConfigError(
                f"--resume {resume}: the checkpoint's vocabulary ({len(ck.meta['vocab'])} characters) differs from "
                f"{name}'s ({len(vocab)} characters); resume on the same text"
            )
        stored = ck.model.config
        for f in ARCH_FIELDS:
            if getattr(stored, f) != getattr(cfg, f):
                raise ConfigError(f"{opt(f)} {getattr(cfg, f)}: differs from the checkpoint's {getattr(stored, f)}")
        opt_meta = ck.meta.get("optimizer") if isinstance(ck.meta.get("optimizer"), dict) else {}
        saved_opt = opt_meta.get("name")
        if saved_opt is not None and saved_opt != cfg.optimizer:
            raise ConfigError(f"--optimizer {cfg.optimizer}: differs from the checkpoint's {saved_opt}")
        if ck.hidden is not None and ck.hidden.shape[1] != cfg.batch_size:
            raise ConfigError(f"--batch-size {cfg.batch_size}: differs from the checkpoint's {ck.hidden.shape[1]}")
    out = cfg.out_dir or (os.path.dirname(os.path.abspath(resume)) if resume else default_out_dir(cfg.text_file))
    _prepare_out_dir(out, resume)
    latest = os.path.join(out, "latest.safetensors")
    best_path = os.path.join(out, "best.safetensors")
    metrics_path = os.path.join(out, "metrics.jsonl")
    png_path = os.path.join(out, "loss.png")

    ids = vocab.encode(text)
    train_ids, val_ids = split_text(ids, cfg.val_fraction)
    batcher = StreamBatcher(train_ids, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    hp: dict[str, Any] = {}
    if cfg.optimizer == "sgd":
        hp["momentum"] = cfg.momentum
    if cfg.weight_decay is not None and cfg.optimizer in ("adam", "adamw"):
        hp["weight_decay"] = cfg.weight_decay
    optimizer = make_optimizer(cfg.optimizer, cfg.lr, **hp)

    step, elapsed_before, best_val, bad_in_a_row, last_eval_s = 0, 0.0, None, 0, 0.0
    if ck is None:
        model = CharModel(cfg.model_config(len(vocab)), seed=cfg.seed)
        h = model.init_state(cfg.batch_size)
    else:
        model = ck.model
        # Dropout is not architecture: it may change on resume.
        model.config = dataclasses.replace(model.config, dropout=cfg.dropout)
        model.gru.dropout = float(cfg.dropout)
        m = ck.meta
        step = int(m["step"])
        try:
            optimizer.load_state_dict(ck.optim_state, int(opt_meta.get("t", 0)), model.params)
            if not ck.optim_state:
                say(f"note: {resume} holds no optimiser state (resume from latest.safetensors to continue "
                    "exactly); the optimiser starts afresh")
            if "dropout_rng" in m:
                model.gru.rng.bit_generator.state = m["dropout_rng"]
            best_val = m.get("best_val_loss")
            elapsed_before = float(m.get("elapsed", 0.0))
            if m.get("text_digest") == digest and "data_position" in m:
                batcher.pos = Position(**m["data_position"])
                h = ck.hidden if ck.hidden is not None else model.init_state(cfg.batch_size)
            else:
                say(f"note: {name} differs from the text the checkpoint was trained on; starting at its beginning")
                h = model.init_state(cfg.batch_size)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"--resume {resume}: cannot restore the training state ({e})") from None
        # Drop metrics logged after the checkpoint, which the resumed run will redo.
        rows = [r for r in _read_metrics(metrics_path) if r.get("step", 0) <= step]
        atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def meta() -> dict[str, Any]:
        return {
            "step": step, "best_val_loss": best_val, "elapsed": elapsed_before + (time.perf_counter() - t_start),
            "dropout_rng": model.gru.rng.bit_generator.state, "data_position": dataclasses.asdict(batcher.pos),
            "text_digest": digest, "train_config": dataclasses.asdict(cfg),
        }

    def save(path: str, full: bool = True) -> None:
        save_checkpoint(path, model, vocab=vocab.chars, optimizer=optimizer if full else None, meta=meta(),
                        hidden=h if full else None)

    def run_eval() -> float:
        nonlocal best_val, last_eval_s
        t0 = time.perf_counter()
        val = estimate_loss(model, val_ids, batch_size=cfg.eval_batch_size, seq_len=cfg.seq_len)
        last_eval_s = time.perf_counter() - t0
        improved = best_val is None or val < best_val
        if improved:
            best_val = val
        save(latest)
        if improved:
            save(best_path, full=False)
        mf.write(json.dumps({"step": step, "val_loss": val, "val_bpc": val / LN2,
                             "elapsed": round(elapsed_before + time.perf_counter() - t_start, 3)}) + "\n")
        mf.flush()
        spent = elapsed_before + time.perf_counter() - t_start
        say(f"step {step}: val loss {val:.4f} nats/char = {val / LN2:.4f} bits/char"
            + (" (best)" if improved else f" (best {best_val:.4f})")
            + (f"; train loss {loss_avg:.4f}" if loss_avg is not None else "")
            + (f", {chars_per_s / 1000:.1f}k chars/s" if chars_per_s else "")
            + f", {spent:.0f} s" + (f" of {budget:g}" if budget else ""))
        return val

    chars_per_step = cfg.batch_size * cfg.seq_len
    budget = cfg.time_budget
    if cfg.max_steps is not None and step >= cfg.max_steps:
        say(f"already at step {step}, --max-steps {cfg.max_steps}: nothing to do")
        return TrainResult(out, step, best_val, latest if os.path.exists(latest) else None,
                           best_path if os.path.exists(best_path) else None, metrics_path, None, "max_steps")
    if budget is not None and elapsed_before >= budget:
        say(f"already used {elapsed_before:.0f} s of --time-budget {budget:g}: nothing to do "
            f"(pass a larger --time-budget to continue)")
        return TrainResult(out, step, best_val, latest if os.path.exists(latest) else None,
                           best_path if os.path.exists(best_path) else None, metrics_path, None, "time_budget")

    n_params = sum(p.size for p in model.params.values())
    say(f"{'resuming' if ck else 'training'} on {name}: {len(text):,} characters, vocabulary {len(vocab)}, "
        f"{len(train_ids):,} train / {len(val_ids):,} validation; model {cfg.num_layers}x{cfg.hidden_size} GRU, "
        f"{n_params:,} parameters; {cfg.optimizer} lr {cfg.lr:g}; "
        + (f"until step {cfg.max_steps}" if cfg.max_steps else "")
        + (" or " if cfg.max_steps and budget else "")
        + (f"{budget:g} s" if budget else "") + f"; writing to {out}")

    # A short run should not spend itself warming up.
    warmup = min(cfg.warmup_steps, cfg.max_steps // 10) if cfg.max_steps else cfg.warmup_steps
    stopped = "done"
    start_step = step
    t_start = time.perf_counter()
    mf = open(metrics_path, "a", encoding="utf-8")
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but keep training without it
        tqdm = None
    by_steps = cfg.max_steps is not None and budget is None
    if progress and tqdm is not None:
        bar = tqdm(total=cfg.max_steps if by_steps else int(budget or 0), initial=step if by_steps else
                   int(elapsed_before), unit="step" if by_steps else "s", dynamic_ncols=True, leave=True,
                   file=sys.stderr, desc="train", disable=None,  # None: no bar when stderr is not a terminal
                   # seconds per second says nothing: show progress, elapsed, ETA and the postfix only
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} " + ("steps" if by_steps else "s")
                   + " [{elapsed}<{remaining}{postfix}]")
    rate_t, rate_steps, chars_per_s = time.perf_counter(), 0, 0.0
    loss_avg: float | None = None
    try:
        with _StopFlag() as stop, blas_threads(cfg.threads):
            while True:
                elapsed = elapsed_before + time.perf_counter() - t_start
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stopped = "max_steps"
                    break
                # Leave room for the closing validation run, so the whole run ends near the budget.
                if budget is not None and elapsed + last_eval_s >= budget:
                    stopped = "time_budget"
                    break
                if stop.set:
                    stopped = "interrupted"
                    break
                if stop_after is not None and step - start_step >= stop_after:
                    stopped = "stop_after"
                    break
                x, y, new_epoch = batcher.next()
                if new_epoch:
                    h = model.init_state(cfg.batch_size)
                fractions = []
                if cfg.max_steps:
                    fractions.append(step / cfg.max_steps)
                if budget:
                    fractions.append(elapsed / budget)
                lr = lr_at(step, cfg.lr, schedule=cfg.schedule, warmup_steps=warmup,
                           progress=max(fractions), min_ratio=cfg.min_lr_ratio)
                model.zero_grad()
                # Overflow here is detected and handled below; don't let NumPy warn about it too.
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    logits, h_n = model.forward(x, h)
                    loss, d_logits = cross_entropy(logits, y)
                    grads = model.grads
                    if math.isfinite(loss):
                        model.backward(d_logits)
                        gnorm = grad_norm(grads)
                    else:
                        gnorm = float("nan")
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    bad_in_a_row += 1
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    say(f"step {step + 1}: non-finite {what} ({loss if what == 'loss' else gnorm}); "
                        f"step rejected, weights unchanged ({bad_in_a_row}/{cfg.max_bad_steps})")
                    h = model.init_state(cfg.batch_size)
                    if bad_in_a_row >= cfg.max_bad_steps:
                        say(f"{cfg.max_bad_steps} rejected steps in a row")
                        stopped = "non_finite"
                        break
                    continue
                bad_in_a_row = 0
                if cfg.clip_norm is not None:
                    clip_grad_norm(grads, cfg.clip_norm)
                elif cfg.clip_value is not None:
                    clip_grad_value(grads, cfg.clip_value)
                with np.errstate(over="ignore", invalid="ignore"):
                    optimizer.step(model.params, grads, lr)
                if not all(np.isfinite(p).all() for p in model.params.values()):
                    # Finite gradients, yet the update overflowed (a diverging run): these weights
                    # are lost, the last checkpoint on disk is the last good state.
                    say(f"step {step + 1}: the update made weights non-finite (lr {lr:g}); stopping")
                    stopped = "non_finite"
                    break
                h = h_n
                step += 1
                rate_steps += 1
                loss_avg = loss if loss_avg is None else 0.9 * loss_avg + 0.1 * loss
                if step % cfg.log_every == 0:
                    now = time.perf_counter()
                    chars_per_s = rate_steps * chars_per_step / max(now - rate_t, 1e-9)
                    rate_t, rate_steps = now, 0
                    mf.write(json.dumps({"step": step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(gnorm, 5),
                                         "chars_per_s": round(chars_per_s),
                                         "elapsed": round(elapsed_before + now - t_start, 3)}) + "\n")
                    mf.flush()
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss_avg:.3f}, {chars_per_s / 1000:.1f}k chars/s, lr {lr:.2e}",
                                        refresh=False)
                    if by_steps:
                        bar.update(1)
                    else:
                        bar.update(int(elapsed_before + time.perf_counter() - t_start) - bar.n)
                if step % cfg.eval_every == 0:
                    t_eval = time.perf_counter()
                    run_eval()
                    if cfg.sample_length and step % cfg.sample_every == 0:
                        txt = "".join(sample(model, vocab.chars, length=cfg.sample_length, temperature=0.8,
                                             seed=cfg.seed + step))
                        say("---- sample ----\n" + txt + "\n----------------")
                    rate_t += time.perf_counter() - t_eval  # keep chars/s about training only
            if stopped == "non_finite":
                say("stopping on non-finite values (try a lower --lr or clipping); the last good checkpoint is kept"
                    + (f": {latest}" if os.path.exists(latest) else " (none was written yet)"))
            elif stopped == "interrupted":
                save(latest)  # no validation run: the user wants out
            elif step > start_step:
                if step % cfg.eval_every != 0:
                    run_eval()
                else:
                    save(latest)
                if cfg.sample_length:
                    txt = "".join(sample(model, vocab.chars, length=2 * cfg.sample_length, temperature=0.8,
                                         seed=cfg.seed + step))
                    say("---- sample ----\n" + txt + "\n----------------")
            if stopped == "interrupted":
                say(f"interrupted at step {step}; checkpoint written. Continue with: grumpy train --resume "
                    f"{shlex.quote(latest)}")
    finally:
        if bar is not None:
            bar.close()
        mf.close()
    plot = None
    if step > start_step:
        try:
            plot = plot_losses(metrics_path, png_path)
        except Exception as e:  # a plotting problem must not spoil a finished run
            say(f"note: could not draw {png_path} ({e})")
    return TrainResult(out, step, best_val, latest if os.path.exists(latest) else None,
                       best_path if os.path.exists(best_path) else None, metrics_path, plot, stopped)


# -- command line ---------------------------------------------------------------


def _train_cmd(args: argparse.Namespace) -> int:
    from grumpy.checkpoint import load_model
    from grumpy.cli import UsageError

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    explicit = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.reset_before:
        explicit["reset_after"] = False
    if args.one_hot:
        explicit["embedding_dim"] = 0
    if explicit.get("threads") == 0:
        explicit["threads"] = None  # 0: BLAS's own default
    if explicit.get("time_budget") == 0:
        explicit["time_budget"] = None  # 0 means no limit
    base = TrainConfig()
    if args.resume is not None:
        try:
            ck_meta = load_model(args.resume)[1]
        except ValueError as e:
            raise UsageError(f"--resume {e}") from None
        stored = ck_meta.get("train_config")
        if isinstance(stored, dict):
            base = TrainConfig.from_dict(stored)
        if "out_dir" not in explicit:
            base.out_dir = None  # default to the checkpoint's directory
    if explicit.get("max_steps") is not None and "time_budget" not in explicit:
        # An explicit step count replaces the default time limit.
        base.time_budget = None
    if "clip_value" in explicit:
        base.clip_norm = None
    if "clip_norm" in explicit:
        base.clip_value = None
    cfg = dataclasses.replace(base, **explicit)
    try:
        res = train(cfg, resume=args.resume, progress=not args.no_progress)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    files = [p for p in (res.latest, res.best, res.metrics, res.plot) if p]
    print(f"\nstopped ({res.stopped.replace('_', ' ')}) at step {res.step}"
          + (f"; best validation loss {res.best_val_loss:.4f} nats/char = {res.best_val_loss / LN2:.4f} bits/char"
             if res.best_val_loss is not None else ""))
    print("files: " + ", ".join(files))
    if res.best or res.latest:
        print("sample with:\n  grumpy sample " + shlex.quote(res.best or res.latest) + " --length 500")
    return 1 if res.stopped == "non_finite" else 0


def _sample_cmd(args: argparse.Namespace) -> int:
    from grumpy.checkpoint import load_model
    from grumpy.cli import UsageError

    try:
        model, meta = load_model(args.checkpoint)
    except ValueError as e:
        raise UsageError(f"CHECKPOINT {e}") from None
    for name, val, ok, want in (
        ("--length", args.length, args.length >= 0, "an integer >= 0"),
        ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0, "a number >= 0"),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, "a positive integer"),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "a number in (0, 1]"),
    ):
        if not ok:
            raise UsageError(f"{name}: expected {want}, got {val}")
    bad = Vocab(meta["vocab"]).missing(args.prime)
    if bad:
        raise UsageError(f"--prime: characters not in the model's vocabulary: {' '.join(repr(c) for c in bad)}")
    out = sys.stdout
    try:
        out.write(args.prime)
        for c in sample(model, meta["vocab"], prime=args.prime, length=args.length, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed):
            out.write(c)
            out.flush()  # stream: each character appears as soon as it is drawn
        out.write("\n")
        out.flush()
    except BrokenPipeError:  # e.g. `grumpy sample ... | head`: the reader has had enough
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
    return 0


def _eval_cmd(args: argparse.Namespace) -> int:
    from grumpy.checkpoint import load_model
    from grumpy.cli import UsageError

    try:
        model, meta = load_model(args.checkpoint)
    except ValueError as e:
        raise UsageError(f"CHECKPOINT {e}") from None
    try:
        text = load_text(args.text_file)
    except ValueError as e:
        raise UsageError(f"TEXT_FILE {e}") from None
    bad = Vocab(meta["vocab"]).missing(text)
    if bad:
        shown = " ".join(repr(c) for c in bad[:30]) + (" ..." if len(bad) > 30 else "")
        raise UsageError(f"TEXT_FILE {args.text_file}: {len(bad)} character(s) not in the model's vocabulary: {shown}")
    if len(text) < 2:
        raise UsageError(f"TEXT_FILE {args.text_file}: need at least 2 characters, got {len(text)}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    r = evaluate(model, text, vocab=meta["vocab"], batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "text_file": args.text_file, **r}))
    else:
        print(f"{r['loss_nats']:.4f} nats/char = {r['bits_per_char']:.4f} bits/char over {r['chars']:,} characters")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``train``, ``sample`` and ``eval`` subcommands."""
    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train a character-level language model",
        description="Train a GRU character-level language model. Without TEXT_FILE it trains on the Shakespeare "
                    "corpus shipped with grumpy and stops after 5 minutes.",
    )
    p.add_argument("text_file", nargs="?", metavar="TEXT_FILE", default=None,
                   help="UTF-8 text to learn (default: the shipped Shakespeare corpus)")
    p.add_argument("--out", dest="out_dir", metavar="DIR", default=None,
                   help="output directory (default: runs/<TEXT_FILE stem>, or the --resume checkpoint's directory)")
    g = p.add_argument_group("model")
    g.add_argument("--hidden-size", type=int, metavar="N", help=f"GRU units per layer (default {d.hidden_size})")
    g.add_argument("--num-layers", type=int, metavar="N", help=f"stacked GRU layers (default {d.num_layers})")
    g.add_argument("--embedding-dim", type=int, metavar="N", help=f"character embedding size (default {d.embedding_dim})")
    g.add_argument("--one-hot", action="store_true", help="feed one-hot characters instead of an embedding")
    g.add_argument("--reset-before", action="store_true",
                   help="apply the reset gate before the recurrent product (Cho et al. 2014) instead of after")
    g.add_argument("--dropout", type=float, metavar="X", help=f"dropout between GRU layers (default {d.dropout})")
    g.add_argument("--dtype", choices=("float32", "float64"), help=f"parameter type (default {d.dtype})")
    g = p.add_argument_group("data")
    g.add_argument("--seq-len", type=int, metavar="N", help=f"characters per window (BPTT length) (default {d.seq_len})")
    g.add_argument("--batch-size", type=int, metavar="N", help=f"parallel streams (default {d.batch_size})")
    g.add_argument("--val-fraction", type=float, metavar="X", help=f"share of the text held out (default {d.val_fraction})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"update rule (default {d.optimizer})")
    g.add_argument("--lr", type=float, metavar="X", help=f"peak learning rate (default {d.lr:g})")
    g.add_argument("--weight-decay", type=float, metavar="X", help="weight decay for adam/adamw (default 0 / 0.01)")
    g.add_argument("--momentum", type=float, metavar="X", help=f"SGD momentum (default {d.momentum})")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--clip-norm", type=float, metavar="X", help=f"clip the global gradient norm to this (default {d.clip_norm})")
    c.add_argument("--clip-value", type=float, metavar="X", help="clip each gradient entry to [-v, v] instead")
    g.add_argument("--schedule", choices=("cosine", "constant"),
                   help=f"learning rate after warm-up: cosine decay to --min-lr-ratio x lr, or constant "
                        f"(default {d.schedule})")
    g.add_argument("--warmup-steps", type=int, metavar="N", help=f"linear warm-up steps (default {d.warmup_steps})")
    g.add_argument("--min-lr-ratio", type=float, metavar="X", help=f"final lr / peak lr for cosine (default {d.min_lr_ratio})")
    g = p.add_argument_group("run")
    g.add_argument("--max-steps", type=int, metavar="N",
                   help="stop at this step, counting steps before a --resume (default: none; giving it "
                        "turns off the default time budget unless --time-budget is also given)")
    g.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help=f"stop after this much wall time, resumed parts included; 0 for no limit "
                        f"(default {d.time_budget:g})")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help=f"steps between validation runs and checkpoints (default {d.eval_every})")
    g.add_argument("--eval-batch-size", type=int, metavar="N",
                   help=f"streams the whole validation split is cut into (default {d.eval_batch_size})")
    g.add_argument("--sample-every", type=int, metavar="N", help=f"steps between printed samples (default {d.sample_every})")
    g.add_argument("--sample-length", type=int, metavar="N", help=f"characters per printed sample, 0 for none "
                                                      f"(default {d.sample_length})")
    g.add_argument("--log-every", type=int, metavar="N", help=f"steps between metrics.jsonl lines (default {d.log_every})")
    g.add_argument("--seed", type=int, metavar="N", help=f"random seed (default {d.seed})")
    g.add_argument("--resume", metavar="CHECKPOINT", default=None,
                   help="continue exactly from a checkpoint (settings not given default to the checkpoint's)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="BLAS threads while training (default 0: BLAS's own setting, all cores); "
                        "1 is faster when other work keeps the cores busy")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_cmd)

    p = subparsers.add_parser("sample", help="generate text from a checkpoint",
                              description="Stream text from a trained model to stdout.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors file written by grumpy train")
    p.add_argument("--prime", default="", metavar="TEXT", help="text to start from (printed first)")
    p.add_argument("--length", type=int, metavar="N", default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=float, metavar="X", default=0.8, help="softmax temperature, 0 for greedy (default 0.8)")
    p.add_argument("--top-k", type=int, metavar="N", default=None, help="sample only from the k most likely characters")
    p.add_argument("--top-p", type=float, metavar="X", default=None, help="nucleus sampling: the smallest set with probability p")
    p.add_argument("--seed", type=int, metavar="N", default=None, help="random seed (default: fresh each run)")
    p.set_defaults(func=_sample_cmd)

    p = subparsers.add_parser("eval", help="loss of a checkpoint on a text",
                              description="Loss in nats and bits per character of a model over a text file.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors file written by grumpy train")
    p.add_argument("text_file", metavar="TEXT_FILE", help="UTF-8 text to score")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="streams the text is cut into (default 32)")
    p.set_defaults(func=_eval_cmd)
