"""scikit-learn-style estimators on grumpy's GRU: a sequence to a label, a value or a
forecast. scikit-learn is optional: the estimators follow its conventions without it."""

from grumpy.estimators.base import GRUEstimator, NotFittedError
from grumpy.estimators.forecast import ForecastWindows, forecast_windows
from grumpy.estimators.models import GRUClassifier, GRURegressor

__all__ = ["ForecastWindows", "GRUClassifier", "GRUEstimator", "GRURegressor", "NotFittedError", "forecast_windows"]
