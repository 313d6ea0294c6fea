"""The language model's configuration: the model's shape and a training run's settings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from grumpy._util import check_dtype, check_positive_int, check_probability
from grumpy.optim import OPTIMIZERS


@dataclass(kw_only=True)
class Architecture:
    """What fixes a character model's shape besides its vocabulary: shared by
    :class:`ModelConfig` (the model's) and :class:`TrainConfig` (a run's)."""

    hidden_size: int = 256
    num_layers: int = 2
    embedding_dim: int = 64  # 0: feed one-hot vectors straight into the GRU, as seed 004 does
    # Regularisation, in training only (REGULARISATION: a resume or fine-tune may change them):
    # dropout between GRU layers and on the head's input; weight drop on the recurrent weights
    dropout: float = 0.0
    weight_drop: float = 0.0
    reset_after: bool = True
    dtype: str = "float32"


REGULARISATION = ("dropout", "weight_drop")
# The fields a resumed run must share with its checkpoint.
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(Architecture) if f.name not in REGULARISATION)


@dataclass(kw_only=True)
class ModelConfig(Architecture):
    """Everything that fixes the model's architecture (JSON round-trips via to_dict/from_dict)."""

    vocab_size: int

    def __post_init__(self) -> None:
        check_positive_int("vocab_size", self.vocab_size)
        check_positive_int("hidden_size", self.hidden_size)
        check_positive_int("num_layers", self.num_layers)
        if isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int) or self.embedding_dim < 0:
            raise ValueError(f"embedding_dim: expected an integer >= 0, got {self.embedding_dim!r}")
        for name in REGULARISATION:
            check_probability(name, getattr(self, name))
        check_dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**d)



# `grumpy train`'s weight decay when none is given: 0.1 for AdamW, measured for the 5-minute
# run (docs/lm.md); the library's AdamW keeps PyTorch's 0.01
RUN_WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.1}


@dataclass(kw_only=True)
class TrainConfig(Architecture):
    """Every setting of a training run (JSON round-trips via dataclasses.asdict / from_dict);
    the model's fields come from :class:`Architecture`. Field ``x_y`` is option ``--x-y``."""

    # A run's model: measured best for the 5-minute run on a 2-core machine at about 60k
    # characters/s (docs/lm.md, eighth search); the library's model keeps 256 and no dropout
    hidden_size: int = 384
    dropout: float = 0.25
    text_file: str | None = None  # None: the Shakespeare corpus shipped with grumpy
    out_dir: str | None = None  # None: runs/<text file stem>
    # data
    seq_len: int = 50
    batch_size: int = 64  # with lr 4e-3: measured best for the 5-minute run (docs/lm.md, third search)
    val_fraction: float = 0.1
    # optimisation
    optimizer: str = "adamw"  # AdamW with decay 0.1: measured best for the 5-minute run (docs/lm.md)
    lr: float = 4e-3
    weight_decay: float | None = None  # None: this run's default for the optimiser, RUN_WEIGHT_DECAY
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
    patience: int | None = None  # stop after this many evaluations without a better validation loss
    init_from: str | None = None  # a checkpoint whose weights start the run (fine-tuning)
    seed: int = 1337
    threads: int | None = None  # BLAS threads while training; None: BLAS's own setting (all cores)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def model_config(self, vocab_size: int) -> ModelConfig:
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(Architecture)}
        return ModelConfig(vocab_size=vocab_size, **arch)


def opt(name: str) -> str:
    """The command-line spelling of a TrainConfig field."""
    return "--" + name.replace("_", "-")


def check_train_config(cfg: TrainConfig) -> None:
    """Raise ValueError naming the option and value for anything out of range."""

    def positive_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
            want = "an integer >= 0" if allow_zero else "a positive integer"
            raise ValueError(f"{opt(name)}: expected {want}, got {v!r}")

    def positive_num(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (v == 0 and not allow_zero):
            want = "a number >= 0" if allow_zero else "a positive number"
            raise ValueError(f"{opt(name)}: expected {want}, got {v!r}")

    for n in ("hidden_size", "num_layers", "seq_len", "batch_size", "eval_every", "eval_batch_size",
              "sample_every", "log_every", "max_bad_steps"):
        positive_int(n)
    positive_int("threads", allow_none=True)
    positive_int("patience", allow_none=True)
    if cfg.init_from is not None and not isinstance(cfg.init_from, str):
        raise ValueError(f"--init-from: expected a checkpoint path, got {cfg.init_from!r}")
    positive_int("embedding_dim", allow_zero=True)
    positive_int("warmup_steps", allow_zero=True)
    positive_int("sample_length", allow_zero=True)
    positive_int("max_steps", allow_none=True)
    positive_num("lr")
    positive_num("time_budget", allow_none=True)
    positive_num("clip_norm", allow_none=True)
    positive_num("clip_value", allow_none=True)
    positive_num("weight_decay", allow_none=True, allow_zero=True)
    for name in REGULARISATION:
        check_probability(opt(name), getattr(cfg, name))
    if not isinstance(cfg.val_fraction, (int, float)) or not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"--val-fraction: expected a number in (0, 1), got {cfg.val_fraction!r}")
    if not isinstance(cfg.min_lr_ratio, (int, float)) or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio: expected a number in [0, 1], got {cfg.min_lr_ratio!r}")
    if not isinstance(cfg.momentum, (int, float)) or not 0.0 <= cfg.momentum < 1.0:
        raise ValueError(f"--momentum: expected a number in [0, 1), got {cfg.momentum!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"--schedule: expected 'constant' or 'cosine', got {cfg.schedule!r}")
    if cfg.clip_norm is not None and cfg.clip_value is not None:
        raise ValueError("--clip-norm and --clip-value: choose one way of clipping")
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype: expected float32 or float64, got {cfg.dtype!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"--seed: expected an integer >= 0, got {cfg.seed!r}")
