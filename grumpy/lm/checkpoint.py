"""Checkpoints: one .safetensors file, written atomically, read defensively.

Tensors:
    <param name>                  the model's parameters ("gru.weight_ih_l0", "head.weight", ...)
    optim.<state>.<param name>    optimiser state ("optim.exp_avg.head.weight", ...)
    train.hidden                  the hidden state carried between training windows (L, B, H)

String metadata: one key, "grumpy", holding a JSON object with at least
"format", "config" (ModelConfig.to_dict()), "vocab" (the characters in index
order) and "step", plus whatever the trainer adds (optimiser name and step
counter, best validation loss, random generator states, data position, the
training configuration).

No pickle anywhere: a checkpoint is data, never code. Loading checks the
header by hand before any array is allocated, so a truncated, corrupted,
foreign or hostile file gives a ValueError, not a crash, a hang or a huge
allocation.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grumpy._util import atomic_write_bytes, reading
from grumpy.lm.config import ModelConfig
from grumpy.lm.model import CharModel, model_shapes

META_KEY = "grumpy"
FORMAT = "grumpy.charmodel/1"
OPTIM_PREFIX = "optim."
HIDDEN_KEY = "train.hidden"

# safetensors' own cap on the JSON header; real grumpy headers are a few kB.
_MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "U8": np.uint8, "I8": np.int8, "U32": np.uint32, "U64": np.uint64, "I16": np.int16,
           "U16": np.uint16, "BOOL": np.bool_}


def _jsonable(obj: Any) -> Any:
    """Turn NumPy scalars and tuples inside ``obj`` into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def save_checkpoint(
    path: str | os.PathLike[str],
    model: CharModel,
    *,
    vocab: str,
    optimizer: Any = None,
    meta: dict[str, Any] | None = None,
    hidden: np.ndarray | None = None,
) -> None:
    """Save the model (and optionally optimiser state and carried hidden state (L, B, H)) atomically.

    ``meta`` entries are stored in the JSON metadata next to "config", "vocab"
    and "step" (default 0). Non-finite parameters are refused with ValueError,
    so a diverged model never overwrites a good checkpoint.
    """
    from safetensors.numpy import save

    if not isinstance(vocab, str) or len(vocab) != model.config.vocab_size:
        raise ValueError(f"vocab: expected a string of {model.config.vocab_size} characters, got {vocab!r:.80}")
    tensors: dict[str, np.ndarray] = {}
    for name, arr in model.params.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"save_checkpoint: parameter {name} contains non-finite values; not saving")
        tensors[name] = arr
    info: dict[str, Any] = {"format": FORMAT, "step": 0}
    info.update(_jsonable(meta or {}))
    info["config"] = model.config.to_dict()
    info["vocab"] = vocab
    if optimizer is not None:
        for key, arr in optimizer.state_dict().items():
            tensors[OPTIM_PREFIX + key] = arr
        info["optimizer"] = {"name": optimizer.name, "t": optimizer.t, "lr": optimizer.lr,
                             "hparams": _jsonable(optimizer.hparams())}
    if hidden is not None:
        tensors[HIDDEN_KEY] = hidden
    # safetensors 0.8.0 writes the raw buffer of a non-contiguous array (a transpose,
    # a slice) with wrong values, so hand it contiguous copies only.
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    data = save(tensors, metadata={META_KEY: json.dumps(info, allow_nan=False)})
    atomic_write_bytes(path, data)


@dataclass
class Checkpoint:
    """Everything in a checkpoint file: the model, its metadata, optimiser state and hidden state."""

    model: CharModel
    meta: dict[str, Any]
    optim_state: dict[str, np.ndarray] = field(default_factory=dict)
    hidden: np.ndarray | None = None


def _read_header(path: str) -> tuple[dict[str, Any], int, int]:
    """Parse and sanity-check the safetensors header: (header, data start, file size)."""
    with reading(path, "a checkpoint file"):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors checkpoint (file is {size} bytes, too short)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise ValueError(
                    f"{path}: not a valid safetensors file (header length {n} does not fit a file of {size} bytes;"
                    " truncated or corrupted?)"
                )
            raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: not a valid safetensors file (header is not JSON; corrupted?)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    return header, 8 + n, size


def _check_tensor_entries(path: str, header: dict[str, Any], data_len: int) -> None:
    """Every tensor entry must be well formed and lie inside the file's data section."""
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(t, dict) and t.get("dtype") in _DTYPES and isinstance(t.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t["shape"])
              and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in t["data_offsets"]))
        if not ok:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry")
        begin, end = t["data_offsets"]
        nbytes = math.prod(t["shape"]) * np.dtype(_DTYPES[t["dtype"]]).itemsize
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise ValueError(
                f"{path}: tensor {name!r} (shape {t['shape']}) does not fit in the file's data "
                f"({data_len} bytes); truncated or corrupted?"
            )


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load everything from a checkpoint written by :func:`save_checkpoint`.

    Any problem with the file (missing, truncated, corrupted, random bytes,
    another program's safetensors, absurd shapes, non-finite weights) raises
    ValueError naming the file and what is wrong.
    """
    path = os.fspath(path)
    header, data_start, size = _read_header(path)
    md = header.get("__metadata__")
    if not isinstance(md, dict) or META_KEY not in md or not isinstance(md[META_KEY], str):
        raise ValueError(f"{path}: a safetensors file, but not a grumpy checkpoint (no {META_KEY!r} metadata)")
    _check_tensor_entries(path, header, size - data_start)
    try:
        meta = json.loads(md[META_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: the grumpy metadata is not valid JSON (corrupted?)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: unknown checkpoint format {found!r}, expected {FORMAT!r}")
    try:
        if not isinstance(meta.get("config"), dict):
            raise ValueError("missing model config")
        config = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model config in checkpoint: {e}") from None
    vocab = meta.get("vocab")
    if not isinstance(vocab, str) or len(vocab) != config.vocab_size or len(set(vocab)) != len(vocab):
        raise ValueError(f"{path}: bad vocabulary in checkpoint (expected {config.vocab_size} distinct characters)")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path}: bad step in checkpoint: {step!r}")
    want = model_shapes(config)
    dtype_tag = {"float32": "F32", "float64": "F64"}[np.dtype(config.dtype).name]
    for name, shape in want.items():
        t = header.get(name)
        if not isinstance(t, dict):
            raise ValueError(f"{path}: parameter {name} is missing from the checkpoint")
        if tuple(t["shape"]) != shape or t["dtype"] != dtype_tag:
            raise ValueError(f"{path}: parameter {name} is {t['dtype']} {tuple(t['shape'])}, "
                             f"expected {dtype_tag} {shape} for the stored config")
    # Only now, with every shape bounded by the file's size, read the arrays.
    try:
        from safetensors.numpy import load_file

        arrays = load_file(path)
    except Exception as e:  # safetensors raises its own error types; report them uniformly
        raise ValueError(f"{path}: cannot read the checkpoint's tensors ({e})") from None
    model = CharModel(config)
    try:
        model.load_state_dict({k: arrays[k] for k in want})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    optim = {k[len(OPTIM_PREFIX):]: v for k, v in arrays.items() if k.startswith(OPTIM_PREFIX)}
    hidden = arrays.get(HIDDEN_KEY)
    if hidden is not None:
        if hidden.ndim != 3 or hidden.shape[0] != config.num_layers or hidden.shape[2] != config.hidden_size \
                or not np.all(np.isfinite(hidden)):
            raise ValueError(f"{path}: bad carried hidden state {hidden.shape} in checkpoint")
        hidden = hidden.astype(model.dtype)
    return Checkpoint(model=model, meta=meta, optim_state=optim, hidden=hidden)


def load_model(path: str | os.PathLike[str]) -> tuple[CharModel, dict[str, Any]]:
    """The model stored in a checkpoint, in evaluation mode (no dropout: call
    ``.train()`` to train it), and its metadata dict (with at least "config", "vocab"
    and "step"). Raises ValueError for any bad file."""
    ck = load_checkpoint(path)
    return ck.model.eval(), ck.meta
