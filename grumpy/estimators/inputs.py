"""Checking and packing the estimators' inputs: X as (N, T, F), (N, T) or a list of (T_i, F).

Every problem raises ValueError naming the argument ("X", "X[3]", "y"), so a user can
find the offending sequence without a traceback into NumPy.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np


class Sequences(NamedTuple):
    """N sequences packed for batching: ``data`` (N, T_max, F) float64 with zeros past
    each sequence's end, ``lengths`` (N,) int64, every length >= 1."""

    data: np.ndarray
    lengths: np.ndarray


def _as_numeric(name: str, a: Any) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except ValueError as e:  # NumPy >= 1.24 refuses ragged nested lists
        raise ValueError(f"{name}: sequences of different lengths must be passed as a list of arrays, "
                         f"one (T_i, F) array per sequence ({e})") from None
    if arr.dtype == object:
        raise ValueError(f"{name}: got an object array (ragged sequences?); pass a list of arrays, "
                         "one (T_i, F) array per sequence")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected numbers, got dtype {arr.dtype}")
    return arr


def _check_finite(name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name}: contains NaN or infinity (at index {tuple(int(i) for i in bad)})")


def check_sequences(X: Any, n_features: int | None = None) -> Sequences:
    """Check ``X`` and pack it (see :class:`Sequences`).

    X: an array (N, T, F); an array (N, T), read as one feature; or a list of N arrays
    (T_i, F) or (T_i,) whose lengths T_i may differ. ``n_features``: the F seen in fit,
    checked in predict.
    """
    if isinstance(X, np.ndarray) and X.dtype != object:
        arr = _as_numeric("X", X)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"X: expected an array (N, T, F) or (N, T), or a list of (T_i, F) arrays, "
                             f"got an array of shape {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError("X: no sequences (N = 0)")
        if arr.shape[1] == 0:
            raise ValueError("X: empty sequences (T = 0); every sequence needs at least one step")
        _check_finite("X", arr)
        N, T, F = arr.shape
        if n_features is not None and F != n_features:
            raise ValueError(f"X: expected {n_features} features per step (as in fit), got {F}")
        return Sequences(arr.astype(np.float64), np.full(N, T, dtype=np.int64))
    elif isinstance(X, (list, tuple)):
        if len(X) == 0:
            raise ValueError("X: no sequences (empty list)")
        seqs = []
        for i, s in enumerate(X):
            a = _as_numeric(f"X[{i}]", s)
            if a.ndim == 1:
                a = a[:, None]
            if a.ndim != 2:
                raise ValueError(f"X[{i}]: expected a (T_i, F) or (T_i,) array, got shape {a.shape}")
            if a.shape[0] == 0:
                raise ValueError(f"X[{i}]: empty sequence (T_i = 0); every sequence needs at least one step")
            _check_finite(f"X[{i}]", a)
            seqs.append(a)
    elif isinstance(X, np.ndarray):
        raise ValueError("X: got an object array (ragged sequences?); pass a list of arrays, "
                         "one (T_i, F) array per sequence")
    else:
        raise ValueError(f"X: expected an array (N, T, F) or (N, T), or a list of arrays, got {type(X).__name__}")

    F = seqs[0].shape[1]
    want = F if n_features is None else n_features
    for i, s in enumerate(seqs):
        if s.shape[1] != want:
            seen = "as in fit" if n_features is not None else "as X[0]"
            raise ValueError(f"X: expected {want} features per step ({seen}), got {s.shape[1]} in X[{i}]")
    lengths = np.array([s.shape[0] for s in seqs], dtype=np.int64)
    data = np.zeros((len(seqs), int(lengths.max()), want))
    for i, s in enumerate(seqs):
        data[i, : len(s)] = s
    return Sequences(data, lengths)


def check_labels(y: Any, n: int) -> np.ndarray:
    """Class labels (N,): any sortable type (integers, strings, ...), no NaN or None."""
    try:
        arr = np.asarray(y)
    except ValueError as e:
        raise ValueError(f"y: expected one label per sequence, shape ({n},) ({e})") from None
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"y: expected one label per sequence, shape ({n},), got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"y: contains NaN or infinity (at index {int(np.argmax(~np.isfinite(arr)))})")
    if arr.dtype == object:
        for i, v in enumerate(arr):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                raise ValueError(f"y: missing label (None or NaN) at index {i}")
    return arr


def check_targets(y: Any, n: int) -> np.ndarray:
    """Regression targets: (N,) or (N, K) finite numbers, returned as float64."""
    arr = _as_numeric("y", y)
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ValueError(f"y: expected shape ({n},) or ({n}, K), one row per sequence, got shape {arr.shape}")
    if arr.ndim == 2 and arr.shape[1] == 0:
        raise ValueError("y: no target columns (K = 0)")
    _check_finite("y", arr)
    return arr.astype(np.float64)
