"""Training a character-level language model: :func:`train` reads top to bottom.

One step is :func:`train_step` (forward, loss, backward, clipping, update); the
run's state and checkpoints are :mod:`grumpy.lm.run`'s, what it shows and
records :mod:`grumpy.lm.report`'s.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from grumpy.lm.config import TrainConfig
from grumpy.lm.data import text_digest
from grumpy.lm.distributed import Team, columns, thread_limit
from grumpy.lm.generate import loss_sums, sample
from grumpy.lm.model import CharModel, cross_entropy
from grumpy.lm.report import Reporter, plot_losses
from grumpy.lm.run import Run, open_run
from grumpy.optim import Optimizer, clip_grad_norm, clip_grad_value, grad_norm, lr_at


@dataclass
class TrainResult:
    out_dir: str
    step: int
    best_val_loss: float | None
    latest: str | None
    best: str | None
    metrics: str
    plot: str | None
    stopped: str  # "max_steps", "time_budget", "interrupted", "stop_after", "patience", "non_finite"


def train(
    cfg: TrainConfig,
    *,
    resume: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    comm: Any = None,
) -> TrainResult:
    """Train a character-level language model as ``cfg`` says; returns where everything was written.

    ``resume``: a checkpoint to continue exactly (model, optimiser, data position,
    hidden state, random state, elapsed time). ``cfg.max_steps`` and
    ``cfg.time_budget`` count the whole run, resumed parts included.
    ``stop_after``: pause after this many steps in this call (checkpoint and
    return), for chunked runs. ``log``: where messages go (default: printed).
    Bad input raises ValueError naming the option or file.

    ``comm``: an mpi4py communicator (or a :class:`~grumpy.lm.distributed.Team`) whose
    every rank calls train() alike: one model trained data-parallel, each rank on its
    share of the ``cfg.batch_size`` streams (docs/distributed.md). Bad input on any
    rank raises ValueError on every rank; rank 0 alone prints and writes the files.
    """
    team = comm if isinstance(comm, Team) else Team(comm)
    rep = Reporter(log if team.root else _silent)
    run = _open(cfg, resume, rep, team)
    done = _nothing_to_do(run, rep)
    if done is not None:
        return _result(run, done, None)
    threads = team.threads(cfg.threads)
    rep.say(_describe(run, resumed=resume is not None, threads=threads))
    b0, b1 = team.streams(cfg.batch_size)
    # A short run should not spend itself warming up.
    warmup = min(cfg.warmup_steps, cfg.max_steps // 10) if cfg.max_steps else cfg.warmup_steps
    by_steps = cfg.max_steps is not None and cfg.time_budget is None  # the bar counts steps, else seconds
    start_step, bad_in_a_row, eval_s = run.step, 0, 0.0
    run.t_start = time.perf_counter()
    rep.open(run.metrics if team.root else None, progress=progress and team.root, by_steps=by_steps,
             total=(cfg.max_steps if by_steps else cfg.time_budget) or 0,
             initial=run.step if by_steps else run.elapsed_before)
    try:
        with _StopFlag() as stop, thread_limit(threads, compiled=not team.alone):
            while True:
                # 1. Stop at the step limit, at the time budget less the closing evaluation,
                #    on Ctrl-C, or when the caller's stop_after steps are done. Over MPI the
                #    ranks agree first on Ctrl-C and on one clock (rank by rank they differ).
                interrupted, now, eval_s = team.agree_to_stop(stop.set, run.elapsed(), eval_s)
                stopped = _why_stop(run, interrupted, stop_after, start_step, now + eval_s)
                if stopped is not None:
                    break
                # 2. The next window of every stream (this rank's streams of them); a new
                #    epoch starts from a zero state.
                x, y, new_epoch = run.batcher.next()
                x, y = columns(x, b0, b1), columns(y, b0, b1)
                if new_epoch:
                    run.h = run.zero_state()
                # 3. One step (over MPI, with the gradients averaged over the ranks). A
                #    non-finite loss or gradient on any rank rejects it (weights unchanged).
                lr = _learning_rate(run, warmup, now)
                loss, gnorm, h_n = train_step(run.model, run.optimizer, cfg, x, y, run.h, lr, team)
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    bad_in_a_row += 1
                    rep.say(_rejected(run.step + 1, loss, gnorm, bad_in_a_row, cfg.max_bad_steps))
                    run.h = run.zero_state()
                    if bad_in_a_row < cfg.max_bad_steps:
                        continue
                    stopped = "non_finite"
                    break
                if not all(np.isfinite(p).all() for p in run.model.params.values()):
                    # Finite gradients, yet the update overflowed (a diverging run): these
                    # weights are lost; the last checkpoint on disk is the last good state.
                    rep.say(f"step {run.step + 1}: the update made weights non-finite (lr {lr:g}); stopping")
                    stopped = "non_finite"
                    break
                bad_in_a_row, run.h, run.step = 0, h_n, run.step + 1
                # 4. Report; every eval_every steps evaluate and checkpoint, now and then sample;
                #    stop when --patience evaluations in a row brought no better validation loss.
                rep.step(run.step, loss, lr, gnorm, cfg.batch_size * cfg.seq_len, run.elapsed(),
                         run.step if by_steps else run.elapsed(), log_now=run.step % cfg.log_every == 0)
                if run.step % cfg.eval_every == 0:
                    t_eval = time.perf_counter()
                    eval_s = evaluate_and_save(run, rep)
                    if cfg.sample_length and run.step % cfg.sample_every == 0:
                        _show_sample(run, rep, cfg.sample_length)
                    rep.exclude(time.perf_counter() - t_eval)
                    if cfg.patience is not None and run.stale_evals >= cfg.patience:
                        rep.say(f"no better validation loss in {run.stale_evals} evaluations (--patience "
                                f"{cfg.patience}): stopping; best.safetensors holds the best model")
                        stopped = "patience"
                        break
            # 5. Close: a last evaluation, checkpoint and sample, or why there are none.
            _finish(run, rep, stopped, start_step)
    finally:
        rep.close()
    return _result(run, stopped, _plot(run, rep) if run.step > start_step and team.root else None)


def _open(cfg: TrainConfig, resume: str | None, rep: Reporter, team: Team) -> Run:
    """open_run on every rank; over MPI, bad input on any rank fails them all, and every
    rank must have read the same text and checkpoint. One model: rank 0's weights."""
    run = team.agree(open_run, cfg, resume, rep.say, team)
    team.same_everywhere(f"text {run.digest}, vocabulary {text_digest(run.vocab.chars)}, step {run.step}",
                         "the text or checkpoint")
    team.broadcast_params(run.model.params)
    return run


def train_step(model: CharModel, optimizer: Optimizer, cfg: TrainConfig, x: np.ndarray, y: np.ndarray,
               h: np.ndarray, lr: float, team: Team | None = None) -> tuple[float, float, np.ndarray]:
    """Forward, loss, backward, clipping and update on windows x, y (T, B) from state h
    (L, B, H) -> (loss, gradient norm, h_n). With a ``team`` of ranks, the gradients
    and the loss are averaged over them between backward and clipping. A non-finite
    loss or gradient norm is returned as it is and nothing is updated; the caller decides."""
    model.zero_grad()
    # Overflow is detected from the loss and gradient norm; NumPy need not warn about it too.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        loss, h_n = local_gradients(model, x, y, h)
        if team is not None:
            loss = team.average_gradients(model.grads, loss)
        if not math.isfinite(loss):
            return loss, float("nan"), h_n
        return loss, apply_gradients(model, optimizer, cfg, lr), h_n


def local_gradients(model: CharModel, x: np.ndarray, y: np.ndarray, h: np.ndarray) -> tuple[float, np.ndarray]:
    """Forward, mean loss over these windows and backward (skipped when the loss is not
    finite): the gradients land in ``model.grads``. -> (loss, h_n)"""
    logits, h_n = model.forward(x, h)
    loss, d_logits = cross_entropy(logits, y)
    if math.isfinite(loss):
        model.backward(d_logits)
    return loss, h_n


def apply_gradients(model: CharModel, optimizer: Optimizer, cfg: TrainConfig, lr: float) -> float:
    """Clipping and the update from ``model.grads``; returns the gradient norm before
    clipping (when it is not finite, nothing is updated)."""
    grads = model.grads
    gnorm = grad_norm(grads)
    if not math.isfinite(gnorm):
        return gnorm
    if cfg.clip_norm is not None:
        clip_grad_norm(grads, cfg.clip_norm)
    elif cfg.clip_value is not None:
        clip_grad_value(grads, cfg.clip_value)
    optimizer.step(model.params, grads, lr)
    return gnorm


def evaluate_and_save(run: Run, rep: Reporter) -> float:
    """Validation loss; latest.safetensors, and best.safetensors when it improved.
    Returns the seconds the evaluation took."""
    t0 = time.perf_counter()
    team = run.team  # over MPI each rank evaluates a share of the streams
    total, count = team.sum_floats(*loss_sums(run.model, run.val_ids, batch_size=run.cfg.eval_batch_size,
                                              seq_len=run.cfg.seq_len, share=(team.rank, team.size)))
    val = total / count
    eval_s = time.perf_counter() - t0
    improved = run.best_val is None or val < run.best_val
    if improved:
        run.best_val = val
    run.stale_evals = 0 if improved else run.stale_evals + 1
    run.save(run.latest)
    if improved:
        run.save(run.best, full=False)
    rep.evaluation(run.step, val, run.best_val if run.best_val is not None else val, run.elapsed(),
                   run.cfg.time_budget)
    return eval_s


def _why_stop(run: Run, interrupted: bool, stop_after: int | None, start_step: int, end: float) -> str | None:
    """``end``: the run's seconds so far plus the closing validation run's."""
    cfg = run.cfg
    if cfg.max_steps is not None and run.step >= cfg.max_steps:
        return "max_steps"
    # Leave room for the closing validation run, so the whole run ends near the budget.
    if cfg.time_budget is not None and end >= cfg.time_budget:
        return "time_budget"
    if interrupted:
        return "interrupted"
    if stop_after is not None and run.step - start_step >= stop_after:
        return "stop_after"
    return None


def _learning_rate(run: Run, warmup: int, elapsed: float) -> float:
    """The schedule's rate now; its progress is the larger of steps and time done."""
    cfg = run.cfg
    fractions = []
    if cfg.max_steps:
        fractions.append(run.step / cfg.max_steps)
    if cfg.time_budget:
        fractions.append(elapsed / cfg.time_budget)
    return lr_at(run.step, cfg.lr, schedule=cfg.schedule, warmup_steps=warmup, progress=max(fractions),
                 min_ratio=cfg.min_lr_ratio)


def _finish(run: Run, rep: Reporter, stopped: str, start_step: int) -> None:
    if stopped == "non_finite":
        rep.say("stopping on non-finite values (try a lower --lr or clipping); the last good checkpoint is kept"
                + (f": {run.latest}" if os.path.exists(run.latest) else " (none was written yet)"))
    elif stopped == "interrupted":
        run.save(run.latest)  # no validation run: the user wants out
        rep.say(f"interrupted at step {run.step}; checkpoint written. Continue with: grumpy train --resume "
                f"{shlex.quote(run.latest)}")
    elif run.step > start_step:
        if run.step % run.cfg.eval_every != 0:
            evaluate_and_save(run, rep)
        else:
            run.save(run.latest)
        if run.cfg.sample_length:
            _show_sample(run, rep, 2 * run.cfg.sample_length)
    if not run.team.alone:  # one model on every rank, to the last bit
        run.team.check_identical(run.model.params)
        rep.say(f"the {run.team.size} ranks end with bit-identical parameters (checked)")


def _show_sample(run: Run, rep: Reporter, length: int) -> None:
    if not run.team.root:
        return
    txt = "".join(sample(run.model, run.vocab.chars, length=length, temperature=0.8, seed=run.cfg.seed + run.step))
    rep.say("---- sample ----\n" + txt + "\n----------------")


def _rejected(step: int, loss: float, gnorm: float, bad: int, max_bad: int) -> str:
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", gnorm)
    msg = f"step {step}: non-finite {what} ({value}); step rejected, weights unchanged ({bad}/{max_bad})"
    return msg + (f"\n{max_bad} rejected steps in a row" if bad >= max_bad else "")


def _nothing_to_do(run: Run, rep: Reporter) -> str | None:
    cfg = run.cfg
    if cfg.max_steps is not None and run.step >= cfg.max_steps:
        rep.say(f"already at step {run.step}, --max-steps {cfg.max_steps}: nothing to do")
        return "max_steps"
    if cfg.time_budget is not None and run.elapsed_before >= cfg.time_budget:
        rep.say(f"already used {run.elapsed_before:.0f} s of --time-budget {cfg.time_budget:g}: nothing to do "
                f"(pass a larger --time-budget to continue)")
        return "time_budget"
    return None


def _describe(run: Run, resumed: bool, threads: int | None) -> str:
    cfg = run.cfg
    n_params = sum(p.size for p in run.model.params.values())
    n_train, n_val = len(run.batcher.ids), len(run.val_ids)
    until = " or ".join(([f"until step {cfg.max_steps}"] if cfg.max_steps else [])
                        + ([f"{cfg.time_budget:g} s"] if cfg.time_budget else []))
    return (f"{'resuming' if resumed else 'training'} on {run.name}: {n_train + n_val:,} characters, vocabulary "
            f"{len(run.vocab)}, {n_train:,} train / {n_val:,} validation; model {cfg.num_layers}x{cfg.hidden_size} "
            f"GRU, {n_params:,} parameters; {cfg.optimizer} lr {cfg.lr:g}; {until}; writing to {run.out}"
            + ("" if run.team.alone else f"; {run.team.size} MPI ranks of {cfg.batch_size // run.team.size} "
               f"streams each, {threads} thread(s) per rank"))


def _silent(msg: str) -> None:
    """Where the messages of ranks other than 0 go."""


def _plot(run: Run, rep: Reporter) -> str | None:
    png = os.path.join(run.out, "loss.png")
    try:
        return plot_losses(run.metrics, png)
    except Exception as e:  # a plotting problem must not spoil a finished run
        rep.say(f"note: could not draw {png} ({e})")
        return None


def _result(run: Run, stopped: str, plot: str | None) -> TrainResult:
    def existing(p: str) -> str | None:
        return p if os.path.exists(p) else None

    return TrainResult(run.out, run.step, run.best_val, existing(run.latest), existing(run.best), run.metrics, plot,
                       stopped)


class _StopFlag:
    """Set by the first Ctrl-C; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> _StopFlag:
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
