"""Reading the arguments several subcommands share: a checkpoint, and a text it must cover."""

from __future__ import annotations

from typing import Any

from grumpy.lm.checkpoint import load_model
from grumpy.lm.data import Vocab, load_text


def checkpoint(path: str, what: str = "CHECKPOINT", precision: str = "float32") -> tuple[Any, dict[str, Any]]:
    """(model, metadata) of a checkpoint argument; a bad file is an error naming the argument.
    ``precision`` "bfloat16" or "int8": an inference-only copy (:func:`grumpy.quantize`)."""
    try:
        model, meta = load_model(path)
    except ValueError as e:
        raise ValueError(f"{what} {e}") from None
    if precision == "float32":
        return model, meta
    from grumpy.quantized import quantize

    return quantize(model, "int8" if precision == "int8" else "bfloat16"), meta


def text_for(path: str, vocab: str) -> str:
    """The TEXT_FILE argument, every character of which the model's vocabulary must hold."""
    try:
        text = load_text(path)
    except ValueError as e:
        raise ValueError(f"TEXT_FILE {e}") from None
    bad = Vocab(vocab).missing(text)
    if bad:
        shown = " ".join(repr(c) for c in bad[:30]) + (" ..." if len(bad) > 30 else "")
        raise ValueError(f"TEXT_FILE {path}: {len(bad)} character(s) not in the model's vocabulary: {shown}")
    if len(text) < 2:
        raise ValueError(f"TEXT_FILE {path}: need at least 2 characters, got {len(text)}")
    return text
