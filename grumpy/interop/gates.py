"""The one gate reordering every other format needs."""

from __future__ import annotations

import numpy as np


def swap_rz(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Swap the first two of three gate blocks along ``axis``: grumpy's (r, z, n) <->
    (z, r, h), the order of Keras and ONNX.

    Its own inverse. Concatenation copies values exactly, so conversions built on it
    are bitwise round trips.
    """
    first, second, third = np.split(a, 3, axis=axis)
    return np.concatenate([second, first, third], axis=axis)
