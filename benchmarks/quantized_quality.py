"""What int8 and bfloat16 cost in quality: bits per character of a trained character model,
float32 against its quantized copies, on the shipped corpus's validation split and on a
text the model never saw (English prose: Python's licence text and docs/experiments.md,
characters outside the model's vocabulary dropped).

    grumpy train --out runs/q                  # the default model, 5 minutes
    python benchmarks/quantized_quality.py runs/q/best.safetensors
"""

from __future__ import annotations

import argparse
import os
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint written by grumpy train (trained on the shipped corpus)")
    args = ap.parse_args()
    import grumpy
    from grumpy.lm import TrainConfig, estimate_loss
    from grumpy.lm.checkpoint import load_model
    from grumpy.lm.data import Vocab, load_text, split_text
    from grumpy.lm.model import LN2

    model, meta = load_model(args.checkpoint)
    vocab = Vocab(meta["vocab"])
    cfg = TrainConfig()
    _, val = split_text(vocab.encode(load_text(None)), cfg.val_fraction)
    with open(os.path.join(os.path.dirname(os.__file__), "LICENSE.txt"), encoding="utf-8") as f:
        raw = f.read()
    with open(os.path.join(ROOT, "docs", "experiments.md"), encoding="utf-8") as f:
        raw += f.read()
    unseen = vocab.encode("".join(c for c in raw if c in vocab))
    models: list[tuple[str, Any]] = [("float32", model)]
    models += [("int8", grumpy.quantize(model, "int8")), ("bfloat16", grumpy.quantize(model, "bfloat16"))]
    print(f"{args.checkpoint}: validation split {len(val):,} characters, unseen text {len(unseen):,}\n")
    print("| text | float32 | int8 | int8 - float32 | bfloat16 | bfloat16 - float32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ids in (("validation", val), ("unseen", unseen)):
        bits = {p: estimate_loss(m, ids, batch_size=cfg.eval_batch_size, seq_len=cfg.seq_len) / LN2 for p, m in models}
        f32 = bits["float32"]
        print(f"| {name} | {f32:.4f} | {bits['int8']:.4f} | {bits['int8'] - f32:+.4f} | {bits['bfloat16']:.4f} "
              f"| {bits['bfloat16'] - f32:+.4f} |")


if __name__ == "__main__":
    main()
