"""Forecasting as regression: turn series into (window -> next values) pairs, split in time."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class ForecastWindows(NamedTuple):
    """Training and test pairs: X (N, window, F), y (N, horizon) for one feature or
    (N, horizon * F) (step by step, features within a step) for several."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def _check_series(i: int | None, s: Any) -> np.ndarray:
    name = "series" if i is None else f"series[{i}]"
    try:
        arr = np.asarray(s, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a (T,) or (T, F) array of numbers ({e})") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a (T,) or (T, F) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinity (fill or drop missing values first)")
    return arr


def forecast_windows(series: Any, window: int, horizon: int = 1, *, test_size: float = 0.2,
                     stride: int = 1) -> ForecastWindows:
    """Cut one or several series into (``window`` steps -> next ``horizon`` values) pairs,
    split in time: the first ``1 - test_size`` of each series trains, the rest tests.

    series: an array (T,) or (T, F), or a list of such arrays (several series, each split
    on its own; all with the same F). A training pair's targets all lie before the split
    point and a test pair's all lie after it (its window may reach back into the training
    part: that is the history a forecaster would have), so no test value is ever
    trained on. Pairs straddling the split are dropped. ``stride``: steps between
    consecutive windows. Pairs keep time order within each series, so
    ``validation_fraction`` of :class:`grumpy.GRURegressor` validates on the latest ones.

    Returns :class:`ForecastWindows`; ``GRURegressor().fit(X_train, y_train)`` then
    forecasts ``horizon`` steps from any ``window`` of history.
    """
    several = isinstance(series, (list, tuple)) and len(series) > 0 and np.ndim(series[0]) > 0
    arrays = [_check_series(i, s) for i, s in enumerate(series)] if several else [_check_series(None, series)]
    for name, v in (("window", window), ("horizon", horizon), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) or not 0 <= test_size < 1:
        raise ValueError(f"test_size: expected a fraction in [0, 1), got {test_size!r}")
    F = arrays[0].shape[1]
    parts: dict[str, list[np.ndarray]] = {"X_train": [], "y_train": [], "X_test": [], "y_test": []}
    for i, s in enumerate(arrays):
        if s.shape[1] != F:
            raise ValueError(f"series[{i}]: expected {F} features as series[0], got {s.shape[1]}")
        T = len(s)
        split = T - int(round(T * test_size))
        # pair j: inputs s[j : j+window], targets s[j+window : j+window+horizon]
        starts = np.arange(0, T - window - horizon + 1, stride)
        target_start, target_end = starts + window, starts + window + horizon
        for kind, keep in (("train", target_end <= split), ("test", target_start >= split)):
            js = starts[keep]
            parts["X_" + kind].append(np.stack([s[j : j + window] for j in js]) if len(js) else
                                      np.empty((0, window, F)))
            parts["y_" + kind].append(np.stack([s[j + window : j + window + horizon].reshape(-1) for j in js])
                                      if len(js) else np.empty((0, horizon * F)))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if len(out["X_train"]) == 0:
        raise ValueError(f"window: no training pairs fit in the series with window={window}, horizon={horizon} "
                         f"and test_size={test_size} (series too short?)")
    return ForecastWindows(**out)
