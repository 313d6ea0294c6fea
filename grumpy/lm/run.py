"""A training run's state and its two ends: starting one (fresh or from a checkpoint)
and saving it. Everything a checkpoint must hold to continue exactly lives in :class:`Run`."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grumpy.lm.checkpoint import Checkpoint, atomic_write_bytes, load_checkpoint, save_checkpoint
from grumpy.lm.config import ARCH_FIELDS, RUN_WEIGHT_DECAY, TrainConfig, check_train_config, opt
from grumpy.lm.data import Position, StreamBatcher, Vocab, load_text, min_text_length, split_text, text_digest
from grumpy.lm.distributed import Team, columns
from grumpy.lm.model import CharModel
from grumpy.lm.report import read_metrics
from grumpy.optim import Optimizer, make_optimizer


@dataclass
class Run:
    """What changes as training goes (model, optimiser, data position, carried state
    ``h`` (L, B, H), step, best validation loss, time spent) and where it is written.

    Over MPI (``team`` of several ranks) each rank holds the whole model and the data
    position, ``h`` only for its own streams (L, B/N, H); rank 0 writes the files."""

    cfg: TrainConfig
    out: str
    name: str  # the text, as messages call it
    vocab: Vocab
    digest: str  # of the text: a resume on another text starts at its beginning
    model: CharModel
    optimizer: Optimizer
    batcher: StreamBatcher
    val_ids: np.ndarray
    h: np.ndarray
    step: int = 0
    best_val: float | None = None
    stale_evals: int = 0  # evaluations since the best one (for --patience)
    elapsed_before: float = 0.0  # seconds spent before this process took over
    t_start: float = field(default_factory=time.perf_counter)
    team: Team = field(default_factory=Team)

    def zero_state(self) -> np.ndarray:
        """A zero carried state for this rank's streams."""
        b0, b1 = self.team.streams(self.cfg.batch_size)
        return self.model.init_state(b1 - b0)

    @property
    def latest(self) -> str:
        return os.path.join(self.out, "latest.safetensors")

    @property
    def best(self) -> str:
        return os.path.join(self.out, "best.safetensors")

    @property
    def metrics(self) -> str:
        return os.path.join(self.out, "metrics.jsonl")

    def elapsed(self) -> float:
        """Seconds of the whole run, resumed parts included."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def save(self, path: str, full: bool = True) -> None:
        """A checkpoint; ``full=False`` leaves out the optimiser and the carried state (best.safetensors).
        Over MPI every rank calls it (the carried state is gathered from all of them); rank 0 writes."""
        hidden = None
        if full:
            hidden = self.team.gather_streams(self.h)
            self.team.check_identical(self.model.params)
        if not self.team.root:
            return
        meta = {
            "step": self.step, "best_val_loss": self.best_val, "stale_evals": self.stale_evals,
            "elapsed": self.elapsed(),
            "dropout_rng": self.model.gru.rng.bit_generator.state,
            "data_position": dataclasses.asdict(self.batcher.pos), "text_digest": self.digest,
            "train_config": dataclasses.asdict(self.cfg),
        }
        save_checkpoint(path, self.model, vocab=self.vocab.chars, optimizer=self.optimizer if full else None,
                        meta=meta, hidden=hidden)


def open_run(cfg: TrainConfig, resume: str | None, say: Callable[[str], None], team: Team | None = None) -> Run:
    """Check ``cfg``, read the text, prepare the output directory and build the run:
    fresh, or everything the checkpoint ``resume`` holds. Bad input raises ValueError
    naming the option or file. With a ``team`` of several ranks, this rank's share of
    the streams (a batch they do not divide is a ValueError); only rank 0 touches the
    output directory."""
    team = team or Team()
    check_train_config(cfg)
    b0, b1 = team.streams(cfg.batch_size)
    if resume is not None and cfg.init_from is not None:
        raise ValueError("--init-from and --resume: --resume continues a run, --init-from starts a new one "
                         "from another's weights; choose one")
    ck = _load(resume, "--resume")
    init = _load(cfg.init_from, "--init-from")
    try:
        text = load_text(cfg.text_file)
    except ValueError as e:
        raise ValueError(f"TEXT_FILE {e}" if cfg.text_file is not None else str(e)) from None
    name = cfg.text_file or "the shipped corpus"
    need = min_text_length(cfg.batch_size, cfg.seq_len, cfg.val_fraction)
    if len(text) < need:
        raise ValueError(
            f"TEXT_FILE {name}: {len(text)} characters is too short for --batch-size {cfg.batch_size} x "
            f"--seq-len {cfg.seq_len}: need at least {need} (one window per stream in the "
            f"{1 - cfg.val_fraction:.0%} training split); use a longer text or smaller sizes"
        )
    if ck is not None:  # the checkpoint's vocabulary, which must cover the text
        vocab = _covering(Vocab(ck.meta["vocab"]), text, name, f"--resume {resume}")
        _check_resumable(cfg, ck)
    elif init is not None:  # the model's characters first, then the text's new ones
        vocab = Vocab(init.meta["vocab"] + "".join(Vocab(init.meta["vocab"]).missing(text)))
        _check_architecture(cfg, init, "--init-from")
    else:
        vocab = Vocab.from_text(text)
    out = cfg.out_dir or (os.path.dirname(os.path.abspath(resume)) if resume else default_out_dir(cfg.text_file))
    if team.root:
        prepare_out_dir(out, resume)

    train_ids, val_ids = split_text(vocab.encode(text), cfg.val_fraction)
    hp: dict[str, Any] = {}
    if cfg.optimizer == "sgd":
        hp["momentum"] = cfg.momentum
    if cfg.optimizer in RUN_WEIGHT_DECAY:
        hp["weight_decay"] = RUN_WEIGHT_DECAY[cfg.optimizer] if cfg.weight_decay is None else cfg.weight_decay
    if ck is not None:
        model = ck.model
    elif init is not None:  # its weights, not its optimiser, position or state
        model = init.model.with_vocab_size(len(vocab), seed=cfg.seed)
        model.regularise(cfg.dropout, cfg.weight_drop)
        if len(vocab) > init.model.config.vocab_size:
            say(f"note: {len(vocab) - init.model.config.vocab_size} character(s) of {name} are new to "
                f"{cfg.init_from}: {' '.join(repr(c) for c in vocab.chars[init.model.config.vocab_size:])}; "
                "their embedding and output rows start fresh")
    else:
        model = CharModel(cfg.model_config(len(vocab)), seed=cfg.seed)
    run = Run(cfg, out, name, vocab, text_digest(text), model, make_optimizer(cfg.optimizer, cfg.lr, **hp),
              StreamBatcher(train_ids, cfg.batch_size, cfg.seq_len, seed=cfg.seed), val_ids,
              model.init_state(b1 - b0), team=team)
    if ck is not None:
        _restore(run, ck, resume, say)
    if not team.alone and (model.gru.dropout > 0 or model.gru.weight_drop > 0):  # each rank its own masks
        model.gru.rng = np.random.default_rng([cfg.seed, run.step, team.rank])
    return run


def _load(path: str | None, option: str) -> Checkpoint | None:
    if path is None:
        return None
    try:
        return load_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"{option} {e}") from None


def _covering(vocab: Vocab, text: str, name: str, what: str) -> Vocab:
    missing = vocab.missing(text)
    if missing:
        shown = " ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise ValueError(f"{what}: the checkpoint's vocabulary ({len(vocab)} characters) lacks {len(missing)} "
                         f"character(s) of {name}: {shown}; resume on the same text")
    return vocab


def _check_architecture(cfg: TrainConfig, ck: Checkpoint, option: str) -> None:
    for f in ARCH_FIELDS:
        if getattr(ck.model.config, f) != getattr(cfg, f):
            raise ValueError(f"{opt(f)} {getattr(cfg, f)}: differs from the {option} checkpoint's "
                             f"{getattr(ck.model.config, f)}")


def _check_resumable(cfg: TrainConfig, ck: Checkpoint) -> None:
    _check_architecture(cfg, ck, "--resume")
    saved_opt = _optimizer_meta(ck).get("name")
    if saved_opt is not None and saved_opt != cfg.optimizer:
        raise ValueError(f"--optimizer {cfg.optimizer}: differs from the checkpoint's {saved_opt}")
    if ck.hidden is not None and ck.hidden.shape[1] != cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size}: differs from the checkpoint's {ck.hidden.shape[1]}")


def _optimizer_meta(ck: Checkpoint) -> dict[str, Any]:
    m = ck.meta.get("optimizer")
    return m if isinstance(m, dict) else {}


def _restore(run: Run, ck: Checkpoint, resume: str | None, say: Callable[[str], None]) -> None:
    """Continue where ``ck`` stopped: optimiser, step, random state, data position and
    carried state (when the text is the same), time spent."""
    cfg, m = run.cfg, ck.meta
    # Regularisation is not architecture: it may change on resume.
    run.model.regularise(cfg.dropout, cfg.weight_drop)
    run.step = int(m["step"])
    try:
        run.optimizer.load_state_dict(ck.optim_state, int(_optimizer_meta(ck).get("t", 0)), run.model.params)
        if not ck.optim_state:
            say(f"note: {resume} holds no optimiser state (resume from latest.safetensors to continue "
                "exactly); the optimiser starts afresh")
        if "dropout_rng" in m:
            run.model.gru.rng.bit_generator.state = m["dropout_rng"]
        run.best_val = m.get("best_val_loss")
        run.stale_evals = int(m.get("stale_evals", 0))
        run.elapsed_before = float(m.get("elapsed", 0.0))
        if m.get("text_digest") == run.digest and "data_position" in m:
            run.batcher.pos = Position(**m["data_position"])
            if ck.hidden is not None:  # the whole batch's: this rank takes its streams
                run.h = columns(ck.hidden, *run.team.streams(cfg.batch_size))
        else:
            say(f"note: {run.name} differs from the text the checkpoint was trained on; starting at its beginning")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"--resume {resume}: cannot restore the training state ({e})") from None
    # Drop metrics logged after the checkpoint, which the resumed run will redo.
    if not run.team.root:
        return
    rows = [r for r in read_metrics(run.metrics) if r.get("step", 0) <= run.step]
    atomic_write_bytes(run.metrics, "".join(json.dumps(r) + "\n" for r in rows).encode())


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


def prepare_out_dir(out: str, resuming_from: str | None) -> None:
    """Create ``out`` and check it is writable and holds no other run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the directory ({e.strerror or e})") from None
    probe = os.path.join(out, f".grumpy-write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out}: the directory is not writable ({e.strerror or e})") from None
    existing = [n for n in ("latest.safetensors", "best.safetensors", "metrics.jsonl")
                if os.path.exists(os.path.join(out, n))]
    if existing and resuming_from is None:
        raise ValueError(
            f"--out {out}: already holds a run ({', '.join(existing)}); continue it with "
            f"--resume {shlex.quote(os.path.join(out, 'latest.safetensors'))} or choose another --out"
        )
    if existing and resuming_from is not None:
        if os.path.realpath(os.path.dirname(os.path.abspath(resuming_from))) != os.path.realpath(out):
            raise ValueError(
                f"--out {out}: already holds another run ({', '.join(existing)}); choose an empty --out "
                f"to continue {resuming_from} there"
            )
