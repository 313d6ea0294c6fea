"""``grumpy export``: a trained character model as an ONNX graph (:mod:`grumpy.interop.onnx`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from grumpy.interop.onnx import OPSET, _onnx, export_char_model
from grumpy.lm.checkpoint import load_model


def _run_export(args: argparse.Namespace) -> int:
    try:
        _onnx()
    except ImportError as e:
        raise ValueError(str(e)) from e
    if os.path.exists(args.out) and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise ValueError(f"OUT.onnx: folder {folder} does not exist")
    try:
        model, meta = load_model(args.checkpoint)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load checkpoint {args.checkpoint!r}: {e}") from e
    vocab = meta.get("vocab") if isinstance(meta, dict) else None
    if vocab is None:
        raise ValueError(f"checkpoint {args.checkpoint!r} has no vocabulary; cannot export a decodable model")
    try:
        export_char_model(model, args.out, vocab=vocab, opset=args.opset)
    except ValueError as e:
        raise ValueError(str(e)) from e
    c = model.config
    print(
        f"wrote {args.out}: {c.num_layers}-layer GRU (hidden {c.hidden_size}, "
        f"reset_after={c.reset_after}, linear_before_reset={int(c.reset_after)}), vocabulary of {c.vocab_size}"
    )
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a trained character model as an ONNX graph",
        description="Write a grumpy checkpoint's character model as ONNX (GRU operators, float32). "
        "Inputs input_ids (T, B) and optional h0; outputs logits and h_n. The vocabulary is in the "
        "model's metadata under 'grumpy.vocab'.",
    )
    p.add_argument("checkpoint", help="a checkpoint written by grumpy train")
    p.add_argument("out", metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset version (default {OPSET})")
    p.add_argument("--force", action="store_true", help="overwrite OUT.onnx if it exists")
    p.set_defaults(func=_run_export)
