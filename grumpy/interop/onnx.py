"""Export a grumpy.GRU or a character model as a standard ONNX graph.

Each GRU layer becomes one ONNX ``GRU`` operator. ONNX orders the gates z, r, h
(grumpy: r, z, n) and writes the update as H_t = (1 − z) ⊙ h + z ⊙ H_{t−1},
as grumpy does, so the weights need only their first two gate blocks swapped.
``linear_before_reset`` is grumpy's ``reset_after``: 1 applies r to
(R_h H + Rb_h), 0 applies it to H before R_h. docs/interop.md has the mapping.

The hidden state is an input with a default (an initializer of zeros of batch
size 1 sharing its name, broadcast to the batch), so a runtime may leave it out
for a fresh start or feed back the previous step's ``h_n`` to generate step by
step. ``sequence_lens`` (int32 (B,), the GRU operator's own input) is optional
the same way: fed, each sequence b stops at step sequence_lens[b] as with
grumpy's ``lengths`` (zero outputs after it, h_n from its last valid step, the
reverse direction starting there); left out, every sequence runs all T steps.

``onnx`` is imported only inside these functions.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from grumpy.interop.gates import swap_rz
from grumpy.layers import GRU

OPSET = 17  # widely supported; 15 is the least this graph needs (Shape with start/end)

_ONNX_DTYPES = {np.dtype(np.float32): "FLOAT", np.dtype(np.float64): "DOUBLE"}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the 'onnx' package: pip install 'grumpy[interop]'") from e
    return onnx


class _Graph:
    """Collects nodes and initializers; names are prefixed so that graphs compose."""

    def __init__(self, dtype: np.dtype) -> None:
        self.onnx = _onnx()
        self.dtype = dtype
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def weight(self, name: str, value: np.ndarray) -> str:
        return self.const(name, np.asarray(value, dtype=self.dtype))

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> None:
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), list(outputs), name=outputs[0], **attrs))


def _gru_stack(g: _Graph, gru: GRU, params: dict[str, np.ndarray], prefix: str, x: str, h0: str,
               lens: str = "") -> tuple[str, str]:
    """ONNX GRU nodes for a time-major stack: x (T, B, I), h0 (L*D, B, H), lens the name
    of the sequence lengths (B,) int32 or "" -> names of output (T, B, D*H) and h_n (L*D, B, H)."""
    D, H = gru.num_directions, gru.hidden_size
    sfxs = ["", "_reverse"][:D]
    h_n_parts = []
    inp = x
    for layer in range(gru.num_layers):
        p = f"{prefix}l{layer}."

        def stacked(kind: str, layer: int = layer) -> np.ndarray:
            return np.stack([swap_rz(params[f"{kind}_l{layer}{s}"], 0) for s in sfxs])

        W = g.weight(p + "W", stacked("weight_ih"))  # (D, 3H, in)
        R = g.weight(p + "R", stacked("weight_hh"))  # (D, 3H, H)
        B = ""
        if gru.bias:
            # ONNX's B is [Wb; Rb] per direction: (D, 6H)
            B = g.weight(p + "B", np.concatenate([stacked("bias_ih"), stacked("bias_hh")], axis=1))
        starts = g.const(p + "h0_start", np.array([layer * D], np.int64))
        ends = g.const(p + "h0_end", np.array([(layer + 1) * D], np.int64))
        axes = g.const(p + "h0_axes", np.array([0], np.int64))
        g.node("Slice", [h0, starts, ends, axes], [p + "h0"])
        g.node(
            "GRU", [inp, W, R, B, lens, p + "h0"], [p + "Y", p + "Y_h"],
            hidden_size=H, linear_before_reset=int(gru.reset_after),
            direction="bidirectional" if D == 2 else "forward",
        )
        # Y is (T, D, B, H); the next layer and the caller want (T, B, D*H), forward first.
        g.node("Transpose", [p + "Y"], [p + "Y_tbdh"], perm=[0, 2, 1, 3])
        shape = g.const(p + "out_shape", np.array([0, 0, D * H], np.int64))
        g.node("Reshape", [p + "Y_tbdh", shape], [p + "out"])
        inp = p + "out"
        h_n_parts.append(p + "Y_h")
    if len(h_n_parts) == 1:
        g.node("Identity", h_n_parts, [prefix + "h_n"])
    else:
        g.node("Concat", h_n_parts, [prefix + "h_n"], axis=0)
    return inp, prefix + "h_n"


def _state_input(g: _Graph, name: str, batch_of: str, layers: int, H: int) -> str:
    """The optional state input ``name`` (layers, B, H): its default is zeros of
    batch 1, broadcast to the batch size of tensor ``batch_of`` (axis 1)."""
    g.const(name, np.zeros((layers, 1, H), g.dtype))
    g.node("Shape", [batch_of], [name + ".batch"], start=1, end=2)
    lead = g.const(name + ".layers", np.array([layers], np.int64))
    tail = g.const(name + ".hidden", np.array([H], np.int64))
    g.node("Concat", [lead, name + ".batch", tail], [name + ".shape"], axis=0)
    g.node("Expand", [name, name + ".shape"], [name + ".full"])
    return name + ".full"


def _lengths_input(g: _Graph, name: str, x: str) -> str:
    """The optional lengths input ``name`` (B,) int32 for time-major tensor x (T, B, ...).
    Its default, one huge length, is cut to T and broadcast to the batch; a fed (B,)
    vector goes through the same two nodes unchanged (its values are at most T)."""
    g.const(name, np.array([np.iinfo(np.int32).max], np.int32))
    g.node("Shape", [x], [name + ".T64"], start=0, end=1)
    g.node("Cast", [name + ".T64"], [name + ".T"], to=g.onnx.TensorProto.INT32)
    g.node("Min", [name, name + ".T"], [name + ".cut"])
    g.node("Shape", [x], [name + ".batch"], start=1, end=2)
    g.node("Expand", [name + ".cut", name + ".batch"], [name + ".full"])
    return name + ".full"


def _finish(
    g: _Graph, name: str, doc: str, inputs: list[Any], outputs: list[Any], metadata: dict[str, str], opset: int
) -> Any:
    onnx = g.onnx
    graph = onnx.helper.make_graph(g.nodes, name, inputs, outputs, g.inits, doc_string=doc)
    opsets = [onnx.helper.make_opsetid("", opset)]
    # The lowest IR version for the opset, so that older runtimes can read the file too.
    model = onnx.helper.make_model(
        graph, opset_imports=opsets, ir_version=onnx.helper.find_min_ir_version_for(opsets),
        producer_name="grumpy", doc_string=doc,
    )
    from grumpy import __version__

    model.producer_version = __version__
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def _check_opset(opset: Any) -> int:
    newest = _onnx().defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 15 <= opset <= newest:
        raise ValueError(f"opset: expected an integer in [15, {newest}], got {opset!r}")
    return opset


def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _ONNX_DTYPES:
        raise ValueError(f"dtype: expected float32 or float64 for the ONNX graph, got {dt}")
    return dt


def _save(model: Any, path: str | os.PathLike[str] | None) -> None:
    """Write to a temporary file beside ``path`` and rename, so a failed write
    never leaves a truncated file where a good one was."""
    if path is None:
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".grumpy-export-", suffix=".onnx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_gru(
    gru: GRU, path: str | os.PathLike[str] | None = None, *, dtype: Any = np.float32, opset: int = OPSET
) -> Any:
    """Export a ``grumpy.GRU`` (inference: no dropout) as an ONNX model; returns
    the ``onnx.ModelProto`` and writes it to ``path`` unless that is None.

    Graph inputs: ``x`` (T, B, I), or (B, T, I) if the GRU is batch_first; ``h0``
    (L*D, B, H), optional (zeros when not fed); ``sequence_lens`` int32 (B,), optional
    (as grumpy's ``lengths``; all T steps when not fed). Outputs: ``y`` shaped like the
    GRU's output, ``h_n`` (L*D, B, H). ``dtype`` is the graph's float type:
    float32 by default, which onnxruntime's GRU requires (the weights are
    rounded to it); float64 is valid ONNX for runtimes that support it.
    """
    onnx = _onnx()
    dt = _check_dtype(dtype)
    opset = _check_opset(opset)
    if not isinstance(gru, GRU):
        raise ValueError(f"export_gru: expected a grumpy.GRU, got {type(gru).__name__}")
    g = _Graph(dt)
    LD, H = gru.num_layers * gru.num_directions, gru.hidden_size
    x = "x"
    if gru.batch_first:
        g.node("Transpose", ["x"], ["x.tbi"], perm=[1, 0, 2])
        x = "x.tbi"
    h0 = _state_input(g, "h0", x, LD, H)
    lens = _lengths_input(g, "sequence_lens", x)
    y, h_n = _gru_stack(g, gru, gru.params, "gru.", x, h0, lens)
    g.node("Transpose" if gru.batch_first else "Identity", [y], ["y"],
           **({"perm": [1, 0, 2]} if gru.batch_first else {}))
    g.node("Identity", [h_n], ["h_n"])
    T_B = ["B", "T"] if gru.batch_first else ["T", "B"]
    et = getattr(onnx.TensorProto, _ONNX_DTYPES[dt])
    vi = onnx.helper.make_tensor_value_info
    inputs = [vi("x", et, T_B + [gru.input_size]), vi("h0", et, [LD, "B", H]),
              vi("sequence_lens", onnx.TensorProto.INT32, ["B"])]
    outputs = [vi("y", et, T_B + [gru.num_directions * H]), vi("h_n", et, [LD, "B", H])]
    meta = {
        "grumpy.kind": "gru",
        "grumpy.config": json.dumps({
            "input_size": gru.input_size, "hidden_size": H, "num_layers": gru.num_layers,
            "bidirectional": gru.bidirectional, "bias": gru.bias, "batch_first": gru.batch_first,
            "reset_after": gru.reset_after,
        }),
    }
    doc = ("grumpy GRU: inputs x, optional h0 (zeros if absent), optional sequence_lens int32 (B,) "
           "(all T steps if absent); outputs y, h_n.")
    model = _finish(g, "grumpy_gru", doc, inputs, outputs, meta, opset)
    _save(model, path)
    return model


def export_char_model(
    model: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    vocab: Sequence[str] | None = None,
    dtype: Any = np.float32,
    opset: int = OPSET,
) -> Any:
    """Export a ``grumpy.lm.model.CharModel`` (inference: no dropout) as ONNX; returns
    the ``onnx.ModelProto`` and writes it to ``path`` unless that is None.

    Inputs: ``input_ids`` int64 (T, B); ``h0`` (L, B, H), optional (zeros when
    not fed); ``sequence_lens`` int32 (B,), optional (each sequence's length for a
    padded batch; past it the GRU outputs zeros, so the logits are the head's bias,
    and h_n is the state at its last step). Outputs: ``logits`` (T, B, V), ``h_n``
    (L, B, H). To generate, run with T = 1 and feed each step's ``h_n`` back as ``h0``.

    ``vocab`` (V characters in index order) is stored as JSON under the
    metadata key ``grumpy.vocab`` so a runtime can decode; the model's config
    is under ``grumpy.config``.
    """
    onnx = _onnx()
    from grumpy.lm.model import CharModel

    if not isinstance(model, CharModel):
        raise ValueError(f"export_char_model: expected a grumpy.lm.model.CharModel, got {type(model).__name__}")
    c = model.config
    V, L, H = c.vocab_size, c.num_layers, c.hidden_size
    if vocab is not None:
        vocab = list(vocab)
        if len(vocab) != V or not all(isinstance(ch, str) for ch in vocab):
            raise ValueError(f"vocab: expected {V} strings (one per index), got {len(vocab)} items")
    dt = _check_dtype(dtype)
    opset = _check_opset(opset)
    params = model.params
    g = _Graph(dt)
    if c.embedding_dim:
        g.node("Gather", [g.weight("embedding.weight", params["embedding.weight"]), "input_ids"], ["x"], axis=0)
    else:
        # OneHot writes float32 (onnxruntime has no double OneHot); Cast only if the graph is double.
        depth = g.const("onehot.depth", np.array(V, np.int64))
        values = g.const("onehot.values", np.array([0.0, 1.0], np.float32))
        onehot_out = "x" if dt == np.float32 else "x.f32"
        g.node("OneHot", ["input_ids", depth, values], [onehot_out], axis=-1)
        if dt != np.float32:
            g.node("Cast", [onehot_out], ["x"], to=getattr(onnx.TensorProto, _ONNX_DTYPES[dt]))
    h0 = _state_input(g, "h0", "x", L, H)
    lens = _lengths_input(g, "sequence_lens", "x")
    gru_params = {k[4:]: v for k, v in params.items() if k.startswith("gru.")}
    out, h_n = _gru_stack(g, model.gru, gru_params, "gru.", "x", h0, lens)
    # (H, V): the head multiplies from the right in the graph, so its weight is stored transposed.
    g.node("MatMul", [out, g.weight("head.weight_t", params["head.weight"].T)], ["head.mm"])
    g.node("Add", ["head.mm", g.weight("head.bias", params["head.bias"])], ["logits"])
    g.node("Identity", [h_n], ["h_n"])
    et = getattr(onnx.TensorProto, _ONNX_DTYPES[dt])
    vi = onnx.helper.make_tensor_value_info
    inputs = [vi("input_ids", onnx.TensorProto.INT64, ["T", "B"]), vi("h0", et, [L, "B", H]),
              vi("sequence_lens", onnx.TensorProto.INT32, ["B"])]
    outputs = [vi("logits", et, ["T", "B", V]), vi("h_n", et, [L, "B", H])]
    meta = {"grumpy.kind": "char_model", "grumpy.config": json.dumps(c.to_dict())}
    if vocab is not None:
        meta["grumpy.vocab"] = json.dumps(vocab)
    doc = (
        "grumpy character model: input_ids int64 (T, B), optional h0 (L, B, H; zeros if absent), optional "
        "sequence_lens int32 (B,) -> "
        "logits (T, B, V), h_n (L, B, H). Vocabulary (index -> character) in metadata 'grumpy.vocab' as JSON."
    )
    onnx_model = _finish(g, "grumpy_char_model", doc, inputs, outputs, meta, opset)
    _save(onnx_model, path)
    return onnx_model
