"""Deprecated: the old home of ``train``, ``sample`` and ``evaluate``, kept for one release.

Import them from :mod:`grumpy.lm` instead.
"""

from __future__ import annotations

import warnings

from grumpy.lm import TrainConfig, TrainResult, estimate_loss, evaluate, sample, train

warnings.warn("grumpy.train is deprecated: import train, sample and evaluate from grumpy.lm",
              DeprecationWarning, stacklevel=2)

__all__ = ["TrainConfig", "TrainResult", "estimate_loss", "evaluate", "sample", "train"]
