"""What every route shares: the cache, the state array's views, buffers, biases.

Time is always indexed in the input's order. The states live in one array ``hs``
of shape (T+1, B, H): for the forward direction ``hs[0]`` is h0 and ``hs[t+1]``
the state after step t; for the reverse direction ``hs[T]`` is h0 and ``hs[t]``
the state after step t. Either way the states entering and leaving all steps are
plain views of ``hs``, so no per-step copies are needed.

``mask`` (T, B, 1), 1 for valid steps and 0 for padding, implements variable
lengths: a padded step leaves the state unchanged and outputs zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from grumpy.kernels.route import Route


class SeqCache(NamedTuple):
    x: np.ndarray  # (T, B, I) input
    hs: np.ndarray  # (T+1, B, H) states, see the module docstring
    gates: np.ndarray  # (T, B, 3H) activations r, z, n
    hn: np.ndarray | None  # (T, B, H) W_hn h + b_hn (reset_after only)
    mask: np.ndarray | None  # (T, B, 1)
    reverse: bool
    reset_after: bool
    route: Route  # the forward's route, which the backward takes too


def state_views(hs: np.ndarray, reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """(states entering each step, states leaving each step), both (T, B, H) in time order."""
    return (hs[1:], hs[:-1]) if reverse else (hs[:-1], hs[1:])


def new_states(h0: np.ndarray, T: int, reverse: bool) -> np.ndarray:
    """hs (T+1, B, H) with h0 in place and the rest uninitialised."""
    hs = np.empty((T + 1,) + h0.shape, h0.dtype)
    hs[T if reverse else 0] = h0
    return hs


def time_steps(T: int, reverse: bool, backward: bool = False) -> range:
    """The order the steps run in: forward in time for the forward direction's forward pass."""
    return range(T - 1, -1, -1) if reverse != backward else range(T)


def mask2(mask: np.ndarray | None, T: int, dt: np.dtype) -> np.ndarray:
    """mask (T, B, 1) -> (T, B) for the compiled kernels; (T, 0) stands for no mask."""
    if mask is None:
        return np.empty((T, 0), dt)
    return np.ascontiguousarray(mask[..., 0], dt)


def scratch(workspace: dict[str, np.ndarray] | None, name: str, shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
    """An uninitialised array, reused from ``workspace`` when one of that shape is there:
    fresh memory costs page faults on every call (docs/benchmarks.md, "How grumpy is fast")."""
    if workspace is None:
        return np.empty(shape, dt)
    a = workspace.get(name)
    if a is None or a.shape != shape or a.dtype != dt:
        a = workspace[name] = np.empty(shape, dt)
    return a


def biases(
    bias_ih: np.ndarray | None, bias_hh: np.ndarray | None, H: int, dt: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(b_ih, b_hh) contiguous, zeros (3H,) for a missing one: the compiled kernels always
    add both, and their jobs on the BLAS's threads read them by address."""
    if bias_ih is None or bias_hh is None:
        zeros = np.zeros(3 * H, dt)
        bias_ih = zeros if bias_ih is None else bias_ih
        bias_hh = zeros if bias_hh is None else bias_hh
    return np.ascontiguousarray(bias_ih), np.ascontiguousarray(bias_hh)


def outputs(hs: np.ndarray, mask: np.ndarray | None, reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """(output (T, B, H), h_last (B, H)) from the states: padded steps output zeros."""
    _, h_out = state_views(hs, reverse)
    return (h_out * mask if mask is not None else h_out), hs[0 if reverse else -1].copy()
