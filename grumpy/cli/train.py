"""``grumpy train``, ``grumpy sample`` and ``grumpy eval``: options in, plain functions called."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from typing import Any

from grumpy.cli.args import checkpoint, text_for
from grumpy.lm.config import ARCH_FIELDS, TrainConfig
from grumpy.lm.distributed import AgreedError, Team, world
from grumpy.lm.generate import evaluate, sample
from grumpy.lm.loop import TrainResult, train
from grumpy.lm.model import LN2
from grumpy.optim import OPTIMIZERS


def _train_cmd(args: argparse.Namespace) -> int:
    if not args.distributed:
        return _report(train(_config(args), resume=args.resume, progress=not args.no_progress))
    # Under MPI every rank runs this; set-up errors are agreed on (all ranks raise them
    # together), rank 0 prints, and all end MPI together so an exit code is not an abort.
    team = Team(world())
    try:
        cfg = team.agree(_config, args)
        res = train(cfg, resume=args.resume, progress=not args.no_progress, comm=team.comm)
        code = _report(res) if team.root else int(res.stopped == "non_finite")
    except AgreedError as e:
        if team.root:
            print(f"grumpy train: error: {e}", file=sys.stderr)
        code = 2
    team.finalize()
    return code


def _config(args: argparse.Namespace) -> TrainConfig:
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
        stored = checkpoint(args.resume, "--resume")[1].get("train_config")
        if isinstance(stored, dict):
            base = TrainConfig.from_dict(stored)
        if "out_dir" not in explicit:
            base.out_dir = None  # default to the checkpoint's directory
    elif args.init_from is not None:  # the model's shape is the checkpoint's, unless given
        stored = checkpoint(args.init_from, "--init-from")[0].config
        base = dataclasses.replace(base, **{f: getattr(stored, f) for f in ARCH_FIELDS})
    if explicit.get("max_steps") is not None and "time_budget" not in explicit:
        # An explicit step count replaces the default time limit.
        base.time_budget = None
    if "clip_value" in explicit:
        base.clip_norm = None
    if "clip_norm" in explicit:
        base.clip_value = None
    return dataclasses.replace(base, **explicit)


def _report(res: TrainResult) -> int:
    files = [p for p in (res.latest, res.best, res.metrics, res.plot) if p]
    print(f"\nstopped ({res.stopped.replace('_', ' ')}) at step {res.step}"
          + (f"; best validation loss {res.best_val_loss:.4f} nats/char = {res.best_val_loss / LN2:.4f} bits/char"
             if res.best_val_loss is not None else ""))
    print("files: " + ", ".join(files))
    written = res.best or res.latest
    if written:
        print("sample with:\n  grumpy sample " + shlex.quote(written) + " --length 500")
    return 1 if res.stopped == "non_finite" else 0


def _sample_cmd(args: argparse.Namespace) -> int:
    model, meta = checkpoint(args.checkpoint, precision=args.precision)
    # sample() checks its arguments before the first character is drawn; the
    # messages name the options as this command spells them.
    try:
        chars = sample(model, meta["vocab"], prime=args.prime, length=args.length, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        name, sep, why = str(e).partition(":")
        raise ValueError("--" + name.replace("_", "-") + sep + why) from None
    out = sys.stdout
    try:
        out.write(args.prime)
        for c in chars:
            out.write(c)
            out.flush()  # stream: each character appears as soon as it is drawn
        out.write("\n")
        out.flush()
    except BrokenPipeError:  # e.g. `grumpy sample ... | head`: the reader has had enough
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
    return 0


def _eval_cmd(args: argparse.Namespace) -> int:
    model, meta = checkpoint(args.checkpoint, precision=args.precision)
    text = text_for(args.text_file, meta["vocab"])
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
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
    g.add_argument("--embedding-dim", type=int, metavar="N",
                   help=f"character embedding size (default {d.embedding_dim})")
    g.add_argument("--one-hot", action="store_true", help="feed one-hot characters instead of an embedding")
    g.add_argument("--reset-before", action="store_true",
                   help="apply the reset gate before the recurrent product (Cho et al. 2014) instead of after")
    g.add_argument("--dropout", type=float, metavar="X", help=f"dropout between GRU layers and on the head's input "
                   f"(default {d.dropout})")
    g.add_argument("--weight-drop", type=float, metavar="X",
                   help=f"drop this share of the recurrent weights, a fresh mask per training step "
                        f"(default {d.weight_drop})")
    g.add_argument("--dtype", choices=("float32", "float64"), help=f"parameter type (default {d.dtype})")
    g = p.add_argument_group("data")
    g.add_argument("--seq-len", type=int, metavar="N",
                   help=f"characters per window (BPTT length) (default {d.seq_len})")
    g.add_argument("--batch-size", type=int, metavar="N", help=f"parallel streams (default {d.batch_size})")
    g.add_argument("--val-fraction", type=float, metavar="X",
                   help=f"share of the text held out (default {d.val_fraction})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"update rule (default {d.optimizer})")
    g.add_argument("--lr", type=float, metavar="X", help=f"peak learning rate (default {d.lr:g})")
    g.add_argument("--weight-decay", type=float, metavar="X",
                   help="weight decay: adam adds it to the gradient (default 0), adamw decays weights (default 0.1)")
    g.add_argument("--momentum", type=float, metavar="X", help=f"SGD momentum (default {d.momentum})")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--clip-norm", type=float, metavar="X",
                   help=f"clip the global gradient norm to this (default {d.clip_norm})")
    c.add_argument("--clip-value", type=float, metavar="X", help="clip each gradient entry to [-v, v] instead")
    g.add_argument("--schedule", choices=("cosine", "constant"),
                   help=f"learning rate after warm-up: cosine decay to --min-lr-ratio x lr, or constant "
                        f"(default {d.schedule})")
    g.add_argument("--warmup-steps", type=int, metavar="N", help=f"linear warm-up steps (default {d.warmup_steps})")
    g.add_argument("--min-lr-ratio", type=float, metavar="X",
                   help=f"final lr / peak lr for cosine (default {d.min_lr_ratio})")
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
    g.add_argument("--sample-every", type=int, metavar="N",
                   help=f"steps between printed samples (default {d.sample_every})")
    g.add_argument("--sample-length", type=int, metavar="N", help=f"characters per printed sample, 0 for none "
                                                      f"(default {d.sample_length})")
    g.add_argument("--log-every", type=int, metavar="N",
                   help=f"steps between metrics.jsonl lines (default {d.log_every})")
    g.add_argument("--seed", type=int, metavar="N", help=f"random seed (default {d.seed})")
    g.add_argument("--patience", type=int, metavar="N",
                   help="stop after N evaluations in a row without a better validation loss (default: never)")
    g.add_argument("--init-from", metavar="CHECKPOINT", default=None,
                   help="start from a trained model's weights (not its optimiser or data position): fine-tuning "
                        "on TEXT_FILE; characters the model lacks extend its vocabulary")
    g.add_argument("--resume", metavar="CHECKPOINT", default=None,
                   help="continue exactly from a checkpoint (settings not given default to the checkpoint's)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="BLAS threads while training (default 0: BLAS's own setting, all cores; with "
                        "--distributed, the cores per rank on each machine); 1 is faster when other work keeps "
                        "the cores busy")
    g.add_argument("--distributed", action="store_true",
                   help="train one model on the ranks of an MPI job, data-parallel, --batch-size being the "
                        "global batch: mpiexec -n N python -m mpi4py -m grumpy train ... --distributed "
                        "(needs the mpi extra; docs/distributed.md)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_cmd)

    p = subparsers.add_parser("sample", help="generate text from a checkpoint",
                              description="Stream text from a trained model to stdout.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors file written by grumpy train")
    p.add_argument("--prime", default="", metavar="TEXT", help="text to start from (printed first)")
    p.add_argument("--length", type=int, metavar="N", default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=float, metavar="X", default=0.8,
                   help="softmax temperature, 0 for greedy (default 0.8)")
    p.add_argument("--top-k", type=int, metavar="N", default=None, help="sample only from the k most likely characters")
    p.add_argument("--top-p", type=float, metavar="X", default=None,
                   help="nucleus sampling: the smallest set with probability p")
    p.add_argument("--seed", type=int, metavar="N", default=None, help="random seed (default: fresh each run)")
    _precision_option(p)
    p.set_defaults(func=_sample_cmd)

    p = subparsers.add_parser("eval", help="loss of a checkpoint on a text",
                              description="Loss in nats and bits per character of a model over a text file.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors file written by grumpy train")
    p.add_argument("text_file", metavar="TEXT_FILE", help="UTF-8 text to score")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="streams the text is cut into (default 32)")
    _precision_option(p)
    p.set_defaults(func=_eval_cmd)


def _precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="weights for inference: float32 (default, exact), or a bfloat16 or int8 copy "
                        "(smaller and faster to read; see README, 'Reduced precision')")
