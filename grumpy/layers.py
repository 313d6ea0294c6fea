"""Recurrent layers: stacking, directions, variable lengths, dropout, parameters.

The per-direction arithmetic lives in :mod:`grumpy.kernels`; this module wires
layers and directions together, checks arguments, and holds parameters and
gradients under the names ``torch.nn.GRU`` uses, so state dicts move between
the two unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cache, partial
from typing import Any, NamedTuple

import numpy as np

from grumpy._util import (
    check_dtype,
    check_positive_int,
    check_probability,
    dropout_mask,
    orthogonal_blocks,
    uniform_init,
)
from grumpy.kernels import ROUTES, Route, choose, gru_sequence_backward, gru_sequence_forward, state_views
from grumpy.kernels.step import step_into

# A kernel runs one direction of one layer over a sequence:
#   forward(x, h0, w_ih, w_hh, b_ih, b_hh, *, reverse, mask, keep_cache, workspace) -> (out, h_last, cache or None)
#   backward(d_out, d_h_last, cache, w_ih, w_hh, *, bias, consume, need_dx) -> (dx or None, dh0, grads)
# where workspace is None or a dict the kernel may keep its large buffers in between
# calls, and consume=True lets the backward overwrite the cache (usable once).
ForwardKernel = Callable[..., tuple[np.ndarray, np.ndarray, Any]]
BackwardKernel = Callable[..., tuple[np.ndarray | None, np.ndarray, dict[str, np.ndarray]]]
# A step kernel runs one direction of one layer for one step of one stream, in inference:
#   step(x (I,), h (H,), w_ih, w_hh, b_ih, b_hh, out (H,)) -> out, the new state
# with x and h contiguous, of the layer's dtype (checked by the caller).
StepKernel = Callable[..., np.ndarray]

_SUFFIXES = ("", "_reverse")


def param_shapes(
    input_size: int, hidden_size: int, num_layers: int, *, bidirectional: bool, bias: bool, num_gates: int = 3
) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a stack's parameters in PyTorch's order (num_gates 3 for a GRU, 1 for a tanh RNN)."""
    G, H, D = num_gates, hidden_size, 2 if bidirectional else 1
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(num_layers):
        for suffix in _SUFFIXES[:D]:
            shapes[f"weight_ih_l{layer}{suffix}"] = (G * H, input_size if layer == 0 else D * H)
            shapes[f"weight_hh_l{layer}{suffix}"] = (G * H, H)
            if bias:
                shapes[f"bias_ih_l{layer}{suffix}"] = (G * H,)
                shapes[f"bias_hh_l{layer}{suffix}"] = (G * H,)
    return shapes


def param_names(num_layers: int, bidirectional: bool, bias: bool) -> list[str]:
    """PyTorch's parameter names, in PyTorch's order."""
    return list(param_shapes(1, 1, num_layers, bidirectional=bidirectional, bias=bias))


class StackCache(NamedTuple):
    caches: list[list[Any]]  # [layer][direction] kernel caches
    dropout_masks: list[np.ndarray | None]  # [layer] mask applied to that layer's input


@cache
def _names(layer: int, d: int) -> tuple[str, str, str, str]:
    """The names of (weight_ih, weight_hh, bias_ih, bias_hh) of one layer and direction
    (cached: formatting them at every call cost a generation step about 0.2 us)."""
    sfx = f"_l{layer}{_SUFFIXES[d]}"
    return "weight_ih" + sfx, "weight_hh" + sfx, "bias_ih" + sfx, "bias_hh" + sfx


def stack_forward(
    forward_kernel: ForwardKernel,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    h0: np.ndarray,
    *,
    num_layers: int,
    bidirectional: bool,
    mask: np.ndarray | None = None,
    dropout_masks: Sequence[np.ndarray | None] | None = None,
    keep_cache: bool = True,
    workspaces: Sequence[dict[str, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray, StackCache | None]:
    """Run a stack of recurrent layers, time-major.

    x (T, B, I), h0 (L*D, B, H), mask (T, B, 1) or None, dropout_masks: for each
    layer None or a (T, B, D*H) array multiplying that layer's input (layer 0's
    entry is ignored). Returns output (T, B, D*H), h_n (L*D, B, H) and the cache,
    or None with ``keep_cache=False`` (inference: less memory, faster).
    ``workspaces``: one dict per layer and direction (index layer * D + d) in
    which the kernels keep buffers between calls; see :class:`RecurrentStack`.
    """
    D = 2 if bidirectional else 1
    masks: list[np.ndarray | None] = list(dropout_masks) if dropout_masks is not None else [None] * num_layers
    masks[0] = None
    h_n = np.empty_like(h0)
    caches: list[list[Any]] = []
    inp = x
    for layer in range(num_layers):
        if masks[layer] is not None:
            inp = inp * masks[layer]
        outs, layer_caches = [], []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh = _names(layer, d)
            out, h_last, c = forward_kernel(
                inp, h0[layer * D + d], params[w_ih], params[w_hh], params.get(b_ih), params.get(b_hh),
                reverse=d == 1, mask=mask, keep_cache=keep_cache,
                workspace=None if workspaces is None else workspaces[layer * D + d],
            )
            outs.append(out)
            layer_caches.append(c)
            h_n[layer * D + d] = h_last
        inp = outs[0] if D == 1 else np.concatenate(outs, axis=-1)
        caches.append(layer_caches)
    return inp, h_n, StackCache(caches, masks) if keep_cache else None


def stack_step(
    step_kernel: StepKernel, params: Mapping[str, np.ndarray], x: np.ndarray, h0: np.ndarray, *,
    num_layers: int, bidirectional: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`stack_forward` for one step of one stream without a mask, dropout or cache:
    x (1, 1, I), h0 (L*D, 1, H) -> output (1, 1, D*H), h_n (L*D, 1, H), one kernel call
    per layer and direction and nothing else (a user's generation loop calls forward
    once a token, and the sequence kernels' set-up cost more than the step at small H).
    A reverse direction over one step is the forward one."""
    D = 2 if bidirectional else 1
    h0 = np.ascontiguousarray(h0)
    h_n = np.empty_like(h0)
    inp = np.ascontiguousarray(x[0, 0])
    for layer in range(num_layers):
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh = _names(layer, d)
            step_kernel(inp, h0[layer * D + d, 0], params[w_ih], params[w_hh], params.get(b_ih), params.get(b_hh),
                        h_n[layer * D + d, 0])
        if layer + 1 < num_layers:
            inp = h_n[layer * D : (layer + 1) * D, 0].reshape(-1)
    return (h_n[-1:] if D == 1 else h_n[-2:].reshape(1, 1, -1)).copy(), h_n


def stack_backward(
    backward_kernel: BackwardKernel,
    params: Mapping[str, np.ndarray],
    cache: StackCache,
    d_output: np.ndarray,
    d_h_n: np.ndarray | None,
    *,
    bias: bool,
    consume: bool = False,
    input_grad: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, dict[str, np.ndarray]]:
    """Backward of :func:`stack_forward`: d_output (T, B, D*H) -> dx (T, B, I), dh0, grads.
    ``consume=True``: the kernels may overwrite the cache, which then cannot be used again.
    ``input_grad=False``: dx is None, and the first layer skips its product for it."""
    num_layers = len(cache.caches)
    D = len(cache.caches[0])
    H = d_output.shape[-1] // D
    grads: dict[str, np.ndarray] = {}
    dh0 = np.empty((num_layers * D,) + d_output.shape[1:2] + (H,), d_output.dtype)
    d_out: np.ndarray | None = d_output
    for layer in reversed(range(num_layers)):
        assert d_out is not None  # only the first layer may skip its input gradient
        dx: np.ndarray | None = None
        for d in range(D):
            sfx = f"_l{layer}{_SUFFIXES[d]}"
            dh_last = None if d_h_n is None else d_h_n[layer * D + d]
            dx_d, dh0_d, g = backward_kernel(
                d_out[..., d * H : (d + 1) * H], dh_last, cache.caches[layer][d],
                params["weight_ih" + sfx], params["weight_hh" + sfx], bias=bias, consume=consume,
                need_dx=input_grad or layer > 0,
            )
            if dx_d is not None:
                dx = dx_d if dx is None else dx + dx_d
            dh0[layer * D + d] = dh0_d
            for k, v in g.items():
                grads[k + sfx] = v
        if dx is not None and cache.dropout_masks[layer] is not None:
            dx *= cache.dropout_masks[layer]
        d_out = dx
    return d_out, dh0, grads


def lengths_mask(lengths: Any, T: int, B: int, dtype: np.dtype) -> np.ndarray:
    """Check ``lengths`` and turn it into a (T, B, 1) mask of ones and zeros."""
    arr = np.asarray(lengths)
    if arr.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},), one length per sequence, got {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"lengths: expected integers, got dtype {arr.dtype}")
    bad = (arr < 1) | (arr > T)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"lengths: expected values in [1, {T}] (T={T}), got lengths[{i}] = {arr[i]}")
    return (np.arange(T)[:, None] < arr[None, :]).astype(dtype)[..., None]


class RecurrentStack:
    """Parameters, gradients, argument checks and the train/eval switch of a
    stack of recurrent layers; subclasses name the kernels and the gate count."""

    num_gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: Any = np.float32,
        seed: int | None = None,
        init: str = "uniform",
        weight_drop: float = 0.0,
    ) -> None:
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        if init not in ("uniform", "orthogonal"):
            raise ValueError(f"init: expected 'uniform' or 'orthogonal', got {init!r}")
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = check_probability("dropout", dropout)
        self.weight_drop = check_probability("weight_drop", weight_drop)
        self.bidirectional = bool(bidirectional)
        self.dtype = check_dtype(dtype)
        self.training = True
        self.rng = np.random.default_rng(seed)
        self.params = self._init_params(init)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._cache: StackCache | None = None
        # With weight_drop, in training: the weights the last forward used and their masks, for backward
        self._dropped: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
        self._no_grad = False  # whether the last forward ran with grad=False
        self._spent = False  # whether backward already ran for the last forward
        # Training buffers kept from one step to the next, one dict per layer and direction.
        self._workspaces: list[dict[str, np.ndarray]] = [{} for _ in range(self.num_layers * self.num_directions)]

    # -- the parts a subclass provides -------------------------------------
    def _kernels(self) -> tuple[ForwardKernel, BackwardKernel]:
        raise NotImplementedError

    def _step_kernel(self) -> StepKernel | None:
        """The kernel for one step of one stream in inference, where the layer has one."""
        return None

    # -- parameters ---------------------------------------------------------
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return param_shapes(self.input_size, self.hidden_size, self.num_layers, bidirectional=self.bidirectional,
                            bias=self.bias, num_gates=self.num_gates)

    def _init_params(self, init: str) -> dict[str, np.ndarray]:
        params = {}
        for name, shape in self.param_shapes().items():
            if init == "orthogonal" and name.startswith("weight_hh"):
                params[name] = orthogonal_blocks(self.rng, self.num_gates, self.hidden_size, self.dtype)
            else:
                params[name] = uniform_init(self.rng, shape, self.hidden_size, self.dtype)
        return params

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the parameters under ``torch.nn`` names, in PyTorch's order."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace all parameters. Every key of :meth:`state_dict` must be present
        with its shape; values are converted to the layer's dtype."""
        shapes = self.param_shapes()
        missing = [k for k in shapes if k not in state]
        extra = [k for k in state if k not in shapes]
        if missing or extra:
            raise ValueError(
                f"load_state_dict: missing keys {missing}, unexpected keys {extra} "
                f"(expected exactly {list(shapes)})"
            )
        new = {}
        for k, shape in shapes.items():
            v = state[k]
            if hasattr(v, "detach"):  # a torch tensor: no torch import needed to read it
                v = v.detach().cpu().numpy()
            arr = np.asarray(v)
            if arr.dtype.kind not in "fiu":
                raise ValueError(f"load_state_dict: {k} has dtype {arr.dtype}, expected a real number type")
            if arr.shape != shape:
                raise ValueError(f"load_state_dict: {k} has shape {arr.shape}, expected {shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"load_state_dict: {k} contains non-finite values (NaN or inf)")
            new[k] = np.array(arr, dtype=self.dtype)
        self.params = new
        self.grads = {k: np.zeros_like(v) for k, v in new.items()}

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def train(self, mode: bool = True) -> RecurrentStack:
        """Dropout on (training) or off (inference). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> RecurrentStack:
        return self.train(False)

    # -- forward / backward -------------------------------------------------
    def _check_array(self, name: str, a: Any, shape: tuple[int, ...], layout: str) -> np.ndarray:
        a = np.asarray(a)
        if a.dtype != self.dtype:
            raise ValueError(
                f"{name}: expected dtype {self.dtype}, got {a.dtype} (convert with .astype, "
                f"or build the layer with dtype={a.dtype} if that is a float type)"
            )
        if a.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} {layout}, got {a.shape}")
        return a

    def forward(
        self, x: np.ndarray, h0: np.ndarray | None = None, *, lengths: Any = None, grad: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """x (T, B, I), or (B, T, I) with batch_first; h0 (L*D, B, H) or None for zeros.

        Returns output (T, B, D*H) (or (B, T, D*H)) and h_n (L*D, B, H). With
        ``lengths`` (B,), steps at or past ``lengths[b]`` leave sequence b's
        state unchanged and output zeros; the reverse direction starts at each
        sequence's last valid step. ``grad=False`` is for inference, like
        PyTorch's ``no_grad``: nothing is kept for :meth:`backward`, which then
        raises; the outputs are the same, with less memory and time.
        """
        out, h_n, cache = self._run(x, h0, lengths, grad=grad, workspaces=self._workspaces if grad else None)
        self._cache = cache
        self._no_grad = not grad
        self._spent = False
        if self.batch_first:
            out = np.ascontiguousarray(out.transpose(1, 0, 2))
        return out, h_n

    def _run(
        self, x: Any, h0: Any, lengths: Any, *, grad: bool, workspaces: list[dict[str, np.ndarray]] | None
    ) -> tuple[np.ndarray, np.ndarray, StackCache | None]:
        """Checks, then the stack time-major: output (T, B, D*H), h_n, the cache (with ``grad``)."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[-1] != self.input_size or x.dtype != self.dtype:
            lay = "(B, T, I)" if self.batch_first else "(T, B, I)"
            if x.ndim != 3 or x.shape[-1] != self.input_size:
                raise ValueError(f"x: expected a 3-d array {lay} with I={self.input_size}, got shape {x.shape}")
            self._check_array("x", x, x.shape, lay)
        if self.batch_first:
            x = x.transpose(1, 0, 2)
        x = np.ascontiguousarray(x)
        T, B, _ = x.shape
        LD = self.num_layers * self.num_directions
        if h0 is None:
            h0 = np.zeros((LD, B, self.hidden_size), self.dtype)
        else:
            h0 = self._check_array("h0", h0, (LD, B, self.hidden_size), "(num_layers * D, B, H)")
        mask = None if lengths is None else lengths_mask(lengths, T, B, self.dtype)
        dropping = self.training and ((self.dropout > 0 and self.num_layers > 1) or self.weight_drop > 0)
        if T == B == 1 and mask is None and not grad and not dropping:
            step = self._step_kernel()
            if step is not None:
                out, h_n = stack_step(step, self.params, x, h0, num_layers=self.num_layers,
                                      bidirectional=self.bidirectional)
                return out, h_n, None
        drop: list[np.ndarray | None] = [None] * self.num_layers
        if self.training and self.dropout > 0:
            width = self.num_directions * self.hidden_size
            for layer in range(1, self.num_layers):
                drop[layer] = dropout_mask(self.rng, (T, B, width), self.dropout, self.dtype)
        params = self.params
        self._dropped = None
        if self.training and self.weight_drop > 0:
            # DropConnect on the recurrent weights: one mask per forward, for every stream and step
            # (Merity et al. 2018's weight drop); backward reuses them (see backward)
            masks = {k: dropout_mask(self.rng, w.shape, self.weight_drop, self.dtype)
                     for k, w in params.items() if k.startswith("weight_hh")}
            params = {k: w * masks[k] if k in masks else w for k, w in params.items()}
            self._dropped = (params, masks)
        fwd, _ = self._kernels()
        return stack_forward(
            fwd, params, x, h0, num_layers=self.num_layers,
            bidirectional=self.bidirectional, mask=mask, dropout_masks=drop, keep_cache=bool(grad),
            workspaces=workspaces,
        )

    __call__ = forward

    def _why_no_backward(self) -> str:
        if self._no_grad:
            return "backward(): the last forward() ran with grad=False, which keeps nothing for backward"
        if self._spent:
            return "backward(): already called for the last forward(), whose buffers it reused; run forward() again"
        return "backward() called before forward()"

    def backward(
        self, d_output: np.ndarray, d_h_n: np.ndarray | None = None, *, input_grad: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Gradients for the most recent forward: d_output shaped like output,
        d_h_n (L*D, B, H) or None. Returns (d_x, d_h0); parameter gradients are
        added into ``grads``. ``input_grad=False`` skips d_x (returned as None),
        as PyTorch does for an input that does not require grad. Once per forward: the gradients are computed in the
        forward's buffers (as PyTorch frees its graph after ``backward()``)."""
        if self._cache is None:
            raise RuntimeError(self._why_no_backward())
        c0 = self._cache.caches[0][0]
        T, B = c0.x.shape[:2]
        DH = self.num_directions * self.hidden_size
        lay = "(B, T, D*H)" if self.batch_first else "(T, B, D*H)"
        want = (B, T, DH) if self.batch_first else (T, B, DH)
        d_output = self._check_array("d_output", d_output, want, lay)
        if self.batch_first:
            d_output = d_output.transpose(1, 0, 2)
        d_output = np.ascontiguousarray(d_output)
        if d_h_n is not None:
            LD = self.num_layers * self.num_directions
            d_h_n = self._check_array("d_h_n", d_h_n, (LD, B, self.hidden_size), "(num_layers * D, B, H)")
        _, bwd = self._kernels()
        cache, self._cache = self._cache, None  # consumed: its buffers now hold gradients
        self._spent = True
        params, masks = self._dropped or (self.params, {})
        dx, dh0, g = stack_backward(bwd, params, cache, d_output, d_h_n, bias=self.bias, consume=True,
                                    input_grad=input_grad)
        for k, v in g.items():
            if k in masks:  # d(W * m) / dW = m
                v *= masks[k]
            self.grads[k] += v
        if self.batch_first and dx is not None:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        return dx, dh0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
            + (f"weight_drop={self.weight_drop}, " if self.weight_drop else "")
            + f"bidirectional={self.bidirectional}, dtype={self.dtype})"
        )


class GRU(RecurrentStack):
    r"""A multi-layer GRU with hand-written backpropagation through time.

    For each layer and direction, with x_t the input and h the previous state
    (gate order r, z, n, as PyTorch)::

        r_t = σ(W_ir x_t + b_ir + W_hr h + b_hr)
        z_t = σ(W_iz x_t + b_iz + W_hz h + b_hz)
        n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h + b_hn))     reset_after=True (default)
        n_t = tanh(W_in x_t + b_in + W_hn (r_t ⊙ h) + b_hn)     reset_after=False (Cho et al. 2014)
        h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h

    Layer k > 0 takes the (dropped-out, in training) output of layer k − 1.

    Shapes (T steps, B sequences, D = 2 if bidirectional else 1):
        x (T, B, I) or (B, T, I) with batch_first; h0, h_n (num_layers * D, B, H);
        output (T, B, D * H) or (B, T, D * H), the forward direction's states
        first, then the reverse direction's.

    Parameters, named and shaped as in ``torch.nn.GRU`` (``_reverse`` suffix for
    the reverse direction): ``weight_ih_l{k}`` (3H, I or D*H) = [W_ir; W_iz; W_in],
    ``weight_hh_l{k}`` (3H, H) = [W_hr; W_hz; W_hn], ``bias_ih_l{k}`` (3H,),
    ``bias_hh_l{k}`` (3H,). The same layout holds for reset_after=False.

    Memory: between training steps a layer keeps its large buffers (the gate
    activations, which backward overwrites with their gradients: 4·T·B·H floats
    per layer and direction) for the next step, since fresh memory costs page
    faults; forward with ``grad=False`` uses none of them. As with the cache, one layer must not
    run forward or backward from two threads at once.

    Initialisation: all parameters from U(−1/√H, 1/√H), as PyTorch; with
    ``init="orthogonal"`` each (H, H) block of the recurrent weights is a random
    orthogonal matrix instead. ``seed`` seeds the generator used for
    initialisation and dropout, so runs are reproducible.

    ``weight_drop``: in training, each forward multiplies every ``weight_hh`` by a fresh
    inverted-dropout mask (entries zeroed with this probability, the rest scaled by
    1 / (1 − p)), one mask for every stream and step of that forward: DropConnect on the
    recurrent weights (Wan et al. 2013), the weight drop of Merity et al. (2018). The
    backward uses the same dropped weights and gives the gradient for the stored ones
    (the mask times the dropped weights' gradient). Off in eval mode.

    ``route``: None lets grumpy choose how each layer runs (the usual); one of
    ``grumpy.kernels.ROUTES`` forces one, for tests and comparisons (see
    :mod:`grumpy.kernels.route`).
    """

    num_gates = 3

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        reset_after: bool = True,
        dtype: Any = np.float32,
        seed: int | None = None,
        init: str = "uniform",
        route: str | Route | None = None,
        weight_drop: float = 0.0,
    ) -> None:
        self.reset_after = bool(reset_after)
        if not (route is None or isinstance(route, Route) or route in ROUTES):
            raise ValueError(f"route: expected None or one of {', '.join(ROUTES)}, got {route!r}")
        self.route = route
        super().__init__(
            input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
            dropout=dropout, bidirectional=bidirectional, dtype=dtype, seed=seed, init=init,
            weight_drop=weight_drop,
        )

    def _kernels(self) -> tuple[ForwardKernel, BackwardKernel]:
        return partial(gru_sequence_forward, reset_after=self.reset_after, route=self.route), gru_sequence_backward

    def _step_kernel(self) -> StepKernel | None:
        # Where route.choose takes the step route (one step of one stream, inference)
        route = self.route if isinstance(self.route, Route) else choose(
            self.dtype, self.reset_after, 1, self.hidden_size, grad=False, kind=self.route, T=1)
        return step_into if route.kind == "step" else None

    def gates(self, x: np.ndarray, h0: np.ndarray | None = None, *, lengths: Any = None) -> dict[str, np.ndarray]:
        """Every layer's gates and states at every step, for looking inside a trained model.

        x, h0 and lengths as for :meth:`forward` (no dropout: as in eval mode; nothing is
        kept for :meth:`backward`). Returns {"r", "z", "n", "h"}, each (num_layers, T, B,
        D*H) (or (num_layers, B, T, D*H) with batch_first): the reset gate r, the update
        gate z, the candidate n and the new state h of each layer, the forward
        direction's units first. At padded steps (``lengths``) h is the kept state and
        r, z, n what the step computed before the mask kept it."""
        training, self.training = self.training, False
        try:
            cache = self._run(x, h0, lengths, grad=True, workspaces=None)[2]
        finally:
            self.training = training
        self._cache, self._no_grad = None, True
        assert cache is not None
        H = self.hidden_size
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("r", "z", "n", "h")}
        for layer in cache.caches:
            parts: dict[str, list[np.ndarray]] = {k: [] for k in out}
            for c in layer:
                for i, k in enumerate(("r", "z", "n")):
                    parts[k].append(c.gates[..., i * H : (i + 1) * H])
                parts["h"].append(state_views(c.hs, c.reverse)[1])
            for k in out:
                out[k].append(np.concatenate(parts[k], axis=-1))
        stacked = {k: np.stack(v) for k, v in out.items()}
        return {k: np.ascontiguousarray(v.transpose(0, 2, 1, 3)) for k, v in stacked.items()} if self.batch_first \
            else stacked

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", reset_after={self.reset_after})"


def gru_forward(
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    h0: np.ndarray,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    reset_after: bool = True,
    mask: np.ndarray | None = None,
    dropout_masks: Sequence[np.ndarray | None] | None = None,
    route: str | Route | None = None,
) -> tuple[np.ndarray, np.ndarray, StackCache]:
    """The GRU stack as a pure function: time-major x (T, B, I), h0 (L*D, B, H)
    -> output (T, B, D*H), h_n (L*D, B, H), cache for :func:`gru_backward`.
    ``route``: as for :class:`GRU`."""
    fwd = partial(gru_sequence_forward, reset_after=reset_after, route=route)
    out, h_n, cache = stack_forward(fwd, params, x, h0, num_layers=num_layers, bidirectional=bidirectional,
                                    mask=mask, dropout_masks=dropout_masks)
    assert cache is not None
    return out, h_n, cache


def gru_backward(
    params: Mapping[str, np.ndarray],
    cache: StackCache,
    d_output: np.ndarray,
    d_h_n: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of :func:`gru_forward` -> d_x (T, B, I), d_h0 (L*D, B, H), grads
    keyed as the parameters."""
    bias = any(k.startswith("bias") for k in params)
    dx, dh0, grads = stack_backward(gru_sequence_backward, params, cache, d_output, d_h_n, bias=bias)
    assert dx is not None
    return dx, dh0, grads
