"""Moving GRU weights between grumpy, PyTorch and Keras.

grumpy keeps PyTorch's layout, so PyTorch needs only names and tensors. Keras
differs in three ways, all handled here and nowhere guessed:

* gate order: Keras stacks the gates z, r, h; grumpy and PyTorch r, z, n.
* orientation: Keras kernels are (in, 3H) and multiply from the right; grumpy's
  weights are (3H, in) and multiply from the left, so each is the other's transpose.
* biases: with ``reset_after=True`` Keras keeps an input and a recurrent bias,
  ``bias`` (2, 3H); with ``reset_after=False`` it keeps one, ``bias`` (3H,).

Both libraries write the update as h' = z ⊙ h + (1 − z) ⊙ candidate, so z maps
to z with no sign change. docs/interop.md gives the full mapping.

torch, keras and safetensors are imported only inside the functions that need
them: ``import grumpy.interop`` costs nothing beyond NumPy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from grumpy._util import check_dtype
from grumpy.interop.gates import swap_rz
from grumpy.layers import GRU, param_names

_DIRECTIONS = ("forward", "backward")


# -- shared helpers ----------------------------------------------------------

def _to_numpy(name: str, v: Any) -> np.ndarray:
    """A torch tensor, Keras variable or array-like as a NumPy array of real numbers."""
    if hasattr(v, "detach"):  # torch tensor; no torch import needed
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            raise ValueError(f"{name}: dtype torch.bfloat16 has no NumPy equivalent; convert it with .float() first")
        v = v.numpy()
    arr = np.asarray(v)
    if arr.dtype.kind != "f":
        raise ValueError(f"{name}: expected a floating-point array, got dtype {arr.dtype}")
    return arr


def _pick_dtype(dtype: Any, arrays: Sequence[np.ndarray]) -> np.dtype:
    """The requested dtype, or the weights' own when it is float32 or float64."""
    if dtype is not None:
        return check_dtype(dtype)
    found = sorted({str(a.dtype) for a in arrays})
    if len(found) != 1 or np.dtype(found[0]) not in (np.float32, np.float64):
        raise ValueError(
            f"weights have dtype(s) {found}; grumpy computes in float32 or float64: "
            f"pass dtype=np.float32 (or np.float64) to convert"
        )
    return np.dtype(found[0])


def _gru_from_state(
    state: Mapping[str, np.ndarray],
    *,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    bias: bool,
    bidirectional: bool,
    reset_after: bool,
    dtype: np.dtype,
    batch_first: bool = False,
    dropout: float = 0.0,
) -> GRU:
    gru = GRU(
        input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
        bidirectional=bidirectional, reset_after=reset_after, dtype=dtype,
    )
    gru.load_state_dict(state)  # checks every name and shape
    return gru


# -- PyTorch -----------------------------------------------------------------

_TORCH_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")


def _structure_from_state(state: Mapping[str, Any], where: str) -> tuple[int, bool, bool]:
    """(num_layers, bidirectional, bias) read from torch.nn.GRU parameter names.

    The names must then be exactly the set torch.nn.GRU would have for that
    structure; anything else is an error rather than a best guess.
    """
    matches = [m for m in map(_TORCH_KEY.match, state) if m is not None]
    bad = [k for k in state if not _TORCH_KEY.match(k)]
    if bad:
        raise ValueError(
            f"{where}: unexpected keys {bad}; expected torch.nn.GRU parameter names "
            f"such as 'weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0' (and '_reverse' variants)"
        )
    if "weight_ih_l0" not in state:
        raise ValueError(f"{where}: no 'weight_ih_l0' found among keys {list(state)}; is this a GRU state dict?")
    num_layers = 1 + max(int(m.group(2)) for m in matches)
    bidirectional = any(m.group(3) for m in matches)
    bias = any(m.group(1).startswith("bias") for m in matches)
    expected = param_names(num_layers, bidirectional, bias)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"{where}: keys {missing} are missing for a {num_layers}-layer "
            f"{'bidirectional ' if bidirectional else ''}GRU{'' if bias else ' without bias'} "
            f"(expected exactly {expected}, found {list(state)})"
        )
    return num_layers, bidirectional, bias


def from_torch_state_dict(
    state: Mapping[str, Any], *, dtype: Any = None, batch_first: bool = False, dropout: float = 0.0
) -> GRU:
    """A ``grumpy.GRU`` (reset_after=True, PyTorch's form) from a ``torch.nn.GRU`` state dict.

    ``state`` maps PyTorch's names (``weight_ih_l0`` (3H, I), ``weight_hh_l0``
    (3H, H), ``bias_ih_l0`` (3H,), ``bias_hh_l0`` (3H,), ``..._reverse``) to
    tensors or arrays. The layer count, directions and bias are read from the
    names; sizes from the shapes. ``dtype`` None keeps the weights' dtype
    (float32 or float64). The values are copied exactly.
    """
    arrays = {k: _to_numpy(k, v) for k, v in state.items()}
    num_layers, bidirectional, bias = _structure_from_state(arrays, "from_torch_state_dict")
    w = arrays["weight_ih_l0"]
    u = arrays["weight_hh_l0"]
    if u.ndim != 2 or u.shape[0] != 3 * u.shape[1]:
        raise ValueError(f"from_torch_state_dict: weight_hh_l0 has shape {u.shape}, expected (3H, H)")
    if w.ndim != 2 or w.shape[0] != u.shape[0]:
        raise ValueError(
            f"from_torch_state_dict: weight_ih_l0 has shape {w.shape}, expected (3H, I) = ({u.shape[0]}, I) "
            f"(H={u.shape[1]} from weight_hh_l0)"
        )
    return _gru_from_state(
        arrays, input_size=w.shape[1], hidden_size=u.shape[1], num_layers=num_layers, bias=bias,
        bidirectional=bidirectional, reset_after=True, dtype=_pick_dtype(dtype, list(arrays.values())),
        batch_first=batch_first, dropout=dropout,
    )


def from_torch(module: Any, *, dtype: Any = None) -> GRU:
    """A ``grumpy.GRU`` equal to a ``torch.nn.GRU`` module: same weights, sizes,
    layers, directions, bias, batch_first and dropout. ``dtype`` None keeps the
    module's (float32 or float64)."""
    import torch

    if not isinstance(module, torch.nn.GRU):
        raise ValueError(
            f"from_torch: expected a torch.nn.GRU, got {type(module).__name__} "
            f"(for a state dict use from_torch_state_dict)"
        )
    gru = from_torch_state_dict(
        module.state_dict(), dtype=dtype, batch_first=module.batch_first, dropout=module.dropout
    )
    want = (module.input_size, module.hidden_size, module.num_layers, module.bidirectional, module.bias)
    got = (gru.input_size, gru.hidden_size, gru.num_layers, gru.bidirectional, gru.bias)
    if want != got:  # only a module with hand-edited parameters could get here
        raise ValueError(f"from_torch: module attributes {want} disagree with its parameters {got}")
    return gru


def to_torch_state_dict(gru: GRU) -> dict[str, Any]:
    """The GRU's parameters as ``torch.Tensor`` s under ``torch.nn.GRU``'s names,
    ready for ``nn.GRU.load_state_dict``. Only reset_after=True GRUs: PyTorch
    has no reset-before form, and loading one would silently change the model."""
    import torch

    if not gru.reset_after:
        raise ValueError(
            "to_torch_state_dict: this GRU has reset_after=False, but torch.nn.GRU computes only "
            "the reset-after form (r applied to W_hn h + b_hn); the weights would mean a different model"
        )
    return {k: torch.from_numpy(v.copy()) for k, v in gru.params.items()}


def to_torch(gru: GRU) -> Any:
    """A new ``torch.nn.GRU`` with this GRU's sizes, options and weights (same dtype)."""
    import torch

    state = to_torch_state_dict(gru)
    module = torch.nn.GRU(
        gru.input_size, gru.hidden_size, gru.num_layers, bias=gru.bias, batch_first=gru.batch_first,
        dropout=gru.dropout, bidirectional=gru.bidirectional,
        dtype=torch.float64 if gru.dtype == np.float64 else torch.float32,
    )
    module.load_state_dict(state)
    return module


def load_torch_safetensors(path: str | os.PathLike[str], *, prefix: str | None = None, dtype: Any = None) -> GRU:
    """A ``grumpy.GRU`` from a PyTorch GRU's weights saved in a ``.safetensors`` file.

    The file may hold a whole model; the GRU's tensors are those named
    ``prefix + "weight_ih_l0"`` etc. (e.g. ``prefix="rnn."``). With ``prefix``
    None the file must hold exactly one GRU, whose prefix is then unambiguous.
    Reading needs only the ``safetensors`` package (not torch).
    """
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_torch_safetensors needs the 'safetensors' package: pip install safetensors") from e
    try:
        tensors = load_file(os.fspath(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"load_torch_safetensors: {os.fspath(path)!r} is not a readable safetensors file ({e})") from e
    if prefix is None:
        prefixes = sorted({k[: -len("weight_ih_l0")] for k in tensors if k.endswith("weight_ih_l0")})
        if len(prefixes) != 1:
            raise ValueError(
                f"load_torch_safetensors: expected exactly one GRU (one key ending in 'weight_ih_l0') "
                f"when prefix is None, found {len(prefixes)}: prefixes {prefixes}; pass prefix=..."
            )
        prefix = prefixes[0]
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(
            f"load_torch_safetensors: no tensor names start with prefix {prefix!r} (found {sorted(tensors)})")
    # Everything under the prefix must be a GRU parameter; _structure_from_state names any stranger.
    return from_torch_state_dict(state, dtype=dtype)


# -- Keras -------------------------------------------------------------------

def _keras_direction_to_state(
    ws: Sequence[Any], *, where: str, in_size: int | None, bias: bool, reset_after: bool
) -> tuple[dict[str, np.ndarray], int, int]:
    """One Keras GRU direction's [kernel, recurrent_kernel(, bias)] -> grumpy names
    (without the layer suffix), input size, hidden size."""
    kernel = _to_numpy(f"{where} kernel", ws[0])
    rec = _to_numpy(f"{where} recurrent_kernel", ws[1])
    if rec.ndim != 2 or rec.shape[1] != 3 * rec.shape[0]:
        raise ValueError(f"{where}: recurrent_kernel has shape {rec.shape}, expected (H, 3H)")
    H = rec.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != 3 * H or (in_size is not None and kernel.shape[0] != in_size):
        want = f"({'I' if in_size is None else in_size}, {3 * H})"
        raise ValueError(f"{where}: kernel has shape {kernel.shape}, expected (input size, 3H) = {want}")
    out = {"weight_ih": swap_rz(kernel.T), "weight_hh": swap_rz(rec.T)}
    if bias:
        b = _to_numpy(f"{where} bias", ws[2])
        if reset_after:
            if b.shape != (2, 3 * H):
                hint = " (that is a reset_after=False layer's bias)" if b.shape == (3 * H,) else ""
                raise ValueError(
                    f"{where}: bias has shape {b.shape}, expected (2, {3 * H}) for reset_after=True{hint}"
                )
            out["bias_ih"], out["bias_hh"] = swap_rz(b[0]), swap_rz(b[1])
        else:
            if b.shape != (3 * H,):
                hint = " (that is a reset_after=True layer's bias)" if b.shape == (2, 3 * H) else ""
                raise ValueError(
                    f"{where}: bias has shape {b.shape}, expected ({3 * H},) for reset_after=False{hint}"
                )
            # Keras' reset-before GRU has no recurrent bias: it is the input bias alone.
            out["bias_ih"], out["bias_hh"] = swap_rz(b), np.zeros_like(b)
    return out, kernel.shape[0], H


def from_keras_weights(
    weights: Sequence[Sequence[Any]],
    *,
    reset_after: bool,
    bidirectional: bool = False,
    bias: bool = True,
    dtype: Any = None,
) -> GRU:
    """A ``grumpy.GRU`` from Keras GRU weights, one list per stacked layer.

    ``weights[k]`` is layer k's ``get_weights()``: ``[kernel (I, 3H),
    recurrent_kernel (H, 3H), bias]`` with bias (2, 3H) for ``reset_after=True``
    or (3H,) for ``reset_after=False`` and left out for ``use_bias=False``; a
    ``Bidirectional`` layer's list is the forward layer's followed by the
    backward layer's. ``reset_after``, ``bidirectional`` and ``bias`` say what
    the Keras layers were; they are checked against the arrays, never inferred.
    """
    reset_after, bidirectional, bias = bool(reset_after), bool(bidirectional), bool(bias)
    if isinstance(weights, np.ndarray) or not isinstance(weights, Sequence) or not weights:
        raise ValueError(
            "from_keras_weights: expected a non-empty list with one list of arrays per layer "
            f"(each layer's get_weights()), got {type(weights).__name__}"
        )
    D = 2 if bidirectional else 1
    per_dir = 3 if bias else 2
    state: dict[str, np.ndarray] = {}
    input_size: int | None = None
    hidden: int | None = None
    for layer, ws in enumerate(weights):
        if isinstance(ws, np.ndarray) or not isinstance(ws, Sequence) or len(ws) != D * per_dir:
            listed = isinstance(ws, Sequence) and not isinstance(ws, np.ndarray)
            found = f"{len(ws)} arrays" if listed else type(ws).__name__
            parts = "kernel, recurrent_kernel" + (", bias" if bias else "")
            raise ValueError(
                f"from_keras_weights: layer {layer}: expected {D * per_dir} arrays "
                f"({parts}{' for the forward then the backward layer' if D == 2 else ''}; "
                f"bidirectional={bidirectional}, bias={bias}), found {found}"
                + (" (wrap a single layer's get_weights() in a list)" if isinstance(ws, np.ndarray) else "")
            )
        for d in range(D):
            where = f"from_keras_weights: layer {layer}" + (f" ({_DIRECTIONS[d]})" if D == 2 else "")
            in_size = None if layer == 0 or hidden is None else D * hidden
            part, i_size, H = _keras_direction_to_state(
                ws[d * per_dir : (d + 1) * per_dir], where=where, in_size=in_size, bias=bias, reset_after=reset_after,
            )
            if hidden is not None and H != hidden:
                raise ValueError(f"{where}: hidden size {H} differs from layer 0's {hidden}; grumpy stacks equal sizes")
            if layer == 0 and input_size is not None and i_size != input_size:
                raise ValueError(
                    f"{where}: kernel input size {i_size} differs from the forward direction's {input_size}")
            hidden = H
            if layer == 0:
                input_size = i_size
            sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
            state.update({k + sfx: v for k, v in part.items()})
    assert input_size is not None and hidden is not None
    return _gru_from_state(
        state, input_size=input_size, hidden_size=hidden, num_layers=len(weights), bias=bias,
        bidirectional=bidirectional, reset_after=reset_after, dtype=_pick_dtype(dtype, list(state.values())),
    )


def to_keras_weights(gru: GRU) -> list[list[np.ndarray]]:
    """The GRU's weights as Keras wants them: one list per layer, for that
    layer's ``set_weights`` (a Bidirectional layer's: forward's then backward's).

    Keras' reset_after=False GRU has a single bias, so grumpy's two biases are
    summed into it. That is the same model: in the reset-before form every
    recurrent bias is added outside the reset gate, next to the input bias. When
    the recurrent biases are all zero the input bias is passed through unchanged.
    """
    out = []
    for layer in range(gru.num_layers):
        ws: list[np.ndarray] = []
        for d in range(gru.num_directions):
            sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
            p = gru.params
            ws += [np.ascontiguousarray(swap_rz(p["weight_ih" + sfx]).T),
                   np.ascontiguousarray(swap_rz(p["weight_hh" + sfx]).T)]
            if gru.bias:
                b_ih, b_hh = p["bias_ih" + sfx], p["bias_hh" + sfx]
                if gru.reset_after:
                    ws.append(np.stack([swap_rz(b_ih), swap_rz(b_hh)]))
                else:
                    ws.append(swap_rz(b_ih + b_hh if np.any(b_hh) else b_ih))
        out.append(ws)
    return out


def _keras_layers(layers: Any) -> list[Any]:
    import keras

    if isinstance(layers, keras.layers.Layer):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers:
        raise ValueError(
            f"expected a Keras GRU or Bidirectional(GRU) layer or a non-empty list of them "
            f"(for a model pass model.layers), got {type(layers).__name__}"
        )
    return list(layers)


def _check_keras_gru(layer: Any, where: str, *, go_backwards: bool) -> None:
    import keras

    if not isinstance(layer, keras.layers.GRU):
        raise ValueError(f"{where}: expected a keras.layers.GRU, got {type(layer).__name__}")
    acts = (layer.activation.__name__, layer.recurrent_activation.__name__)
    if acts != ("tanh", "sigmoid"):
        raise ValueError(
            f"{where}: activation, recurrent_activation are {acts}, expected ('tanh', 'sigmoid') "
            f"(grumpy computes only the standard GRU)"
        )
    if bool(layer.go_backwards) != go_backwards:
        raise ValueError(
            f"{where}: go_backwards={layer.go_backwards}, expected {go_backwards} "
            f"(a lone reversed GRU has no grumpy equivalent; use Bidirectional)"
        )


def _describe_keras(layers: Sequence[Any]) -> tuple[list[list[Any]], bool, bool, bool]:
    """Check a Keras stack and return (the GRU layers per stacked layer, reset_after, bidirectional, bias)."""
    import keras

    grus, forms = [], set()
    for i, layer in enumerate(layers):
        where = f"Keras layer {i} ({getattr(layer, 'name', '?')})"
        if isinstance(layer, keras.layers.Bidirectional):
            if layer.merge_mode != "concat":
                raise ValueError(f"{where}: merge_mode={layer.merge_mode!r}, expected 'concat' (as grumpy stacks)")
            _check_keras_gru(layer.forward_layer, where + " forward", go_backwards=False)
            _check_keras_gru(layer.backward_layer, where + " backward", go_backwards=True)
            pair = [layer.forward_layer, layer.backward_layer]
        else:
            _check_keras_gru(layer, where, go_backwards=False)
            pair = [layer]
        for g in pair:
            forms.add((bool(g.reset_after), len(pair) == 2, bool(g.use_bias)))
        grus.append(pair)
    if len(forms) != 1:
        raise ValueError(
            "Keras layers mix forms (reset_after, bidirectional, use_bias): "
            f"{sorted(forms)}; a grumpy.GRU stack has one form"
        )
    reset_after, bidirectional, bias = forms.pop()
    return grus, reset_after, bidirectional, bias


def from_keras(layers: Any, *, dtype: Any = None) -> GRU:
    """A ``grumpy.GRU`` from built Keras 3 layers: one ``keras.layers.GRU`` or
    ``Bidirectional(GRU)``, or a list of them as stacked in a model (each but the
    last with ``return_sequences=True``). The form (reset_after, use_bias,
    bidirectional) is read from the layers, which must all agree."""
    layers = _keras_layers(layers)
    grus, reset_after, bidirectional, bias = _describe_keras(layers)
    for i, pair in enumerate(grus):
        if not all(g.built for g in pair):
            raise ValueError(f"from_keras: Keras layer {i} is not built yet (call it on an input first)")
    # Each variable's backend tensor (v.value), not get_weights(): Keras' own
    # NumPy conversion of variables warns under NumPy 2 with the torch backend.
    weights = [[v.value for g in pair for v in g.weights] for pair in grus]
    return from_keras_weights(weights, reset_after=reset_after, bidirectional=bidirectional, bias=bias, dtype=dtype)


def to_keras(gru: GRU, layers: Any) -> None:
    """Copy the GRU's weights into Keras 3 layers of the same form: a list with
    one ``keras.layers.GRU`` (or ``Bidirectional(GRU)`` when the GRU is
    bidirectional) per stacked layer, with matching units, reset_after and
    use_bias. Unbuilt layers are built for the right input size."""
    layers = _keras_layers(layers)
    grus, reset_after, bidirectional, bias = _describe_keras(layers)
    want = (gru.num_layers, gru.reset_after, gru.bidirectional, gru.bias)
    got = (len(layers), reset_after, bidirectional, bias)
    if want != got:
        raise ValueError(
            f"to_keras: the GRU has (num_layers, reset_after, bidirectional, bias) = {want}, "
            f"the Keras layers have {got}"
        )
    weights = to_keras_weights(gru)
    for i, (layer, pair) in enumerate(zip(layers, grus)):
        units = {int(g.units) for g in pair}
        if units != {gru.hidden_size}:
            raise ValueError(f"to_keras: Keras layer {i} has units {sorted(units)}, expected {gru.hidden_size}")
        in_size = gru.input_size if i == 0 else gru.num_directions * gru.hidden_size
        if not layer.built:
            layer.build((None, None, in_size))
        layer.set_weights(weights[i])  # Keras checks the shapes itself as well
