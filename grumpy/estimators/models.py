"""GRUClassifier and GRURegressor: a sequence to a label, a sequence to a value or a vector."""

from __future__ import annotations

from typing import Any

import numpy as np

from grumpy.estimators.base import GRUEstimator
from grumpy.estimators.heads import mean_squared_error, softmax, softmax_cross_entropy
from grumpy.estimators.inputs import check_labels, check_targets

_ARGS_DOC = """
    X is an array (N, T, F), an array (N, T) for one feature, or a list of N arrays
    (T_i, F) of different lengths: those run through the layer's ``lengths``, so padding
    never reaches the pooling, the loss or the gradients.

    Arguments (stored unchanged; checked by fit):
        hidden_size, num_layers, bidirectional, reset_after: the :class:`grumpy.GRU` stack.
        dropout: probability of zeroing each input of the GRU layers after the first and
            of the head, in training.
        pooling: "last" (default), the state after each sequence's last valid step (for a
            bidirectional stack, the reverse direction's state after reading back to the
            first step), or "mean" over the valid steps.
        epochs, batch_size, lr, optimizer ("sgd", "adagrad", "rmsprop", "adam", "adamw"),
            weight_decay (L2; decoupled for adamw), clip_norm (global gradient norm, or None).
        validation_fraction: the last fraction of the sequences (as Keras's
            validation_split; shuffle X first if it is ordered by label) is held out; after
            each epoch its loss is measured and the weights of the best epoch are kept.
        patience: with validation, stop after this many epochs without improvement (None:
            run all epochs).
        standardize: scale each input feature to mean 0, std 1 with statistics of the
            training sequences' valid steps{y_scale}.
        seed: an integer makes fit bit-for-bit reproducible; None draws fresh entropy.
        verbose: show a progress bar (tqdm) with the loss per epoch.
        dtype: "float32" (fast compiled kernels) or "float64".

    Fitted attributes: n_features_in_, net_ (the network; ``net_.gru`` is the
    :class:`grumpy.GRU`), input_mean_, input_scale_, loss_curve_,
    validation_loss_curve_, best_epoch_, n_epochs_{extra_attrs}.
"""


class GRUClassifier(GRUEstimator):
    """A GRU that maps a sequence to one label, in scikit-learn's convention.

    GRU stack -> pooling -> linear layer -> softmax, trained with cross-entropy.
    ``classes_`` holds the labels as given (integers, strings, ...); ``score`` is accuracy.
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC.format(y_scale="", extra_attrs=", classes_")
    _estimator_type = "classifier"

    def _fit_targets(self, y: Any, n: int, train_idx: np.ndarray) -> np.ndarray:
        labels = check_labels(y, n)
        try:
            self.classes_ = np.unique(labels)
        except TypeError:
            raise ValueError("y: labels of mixed types that cannot be sorted") from None
        if len(self.classes_) < 2:
            raise ValueError(f"y: need at least 2 classes, got only {self.classes_.tolist()!r}")
        return np.searchsorted(self.classes_, labels)

    def _n_outputs(self) -> int:
        return len(self.classes_)

    def _loss(self, outputs: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
        return softmax_cross_entropy(outputs, targets)

    def _extra_meta(self) -> dict[str, Any]:
        return {"classes": self.classes_.tolist(), "classes_dtype": self.classes_.dtype.str}

    def _restore_extra(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        dt = meta["classes_dtype"]
        self.classes_ = np.array(meta["classes"], dtype=object if dt == "|O" else dt)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (N, n_classes), columns in the order of ``classes_``."""
        return softmax(self._predict_outputs(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable label of each sequence, (N,), taken from ``classes_``."""
        return self.classes_[np.argmax(self._predict_outputs(X), axis=1)]

    def score(self, X: Any, y: Any) -> float:
        """Accuracy: the fraction of sequences whose predicted label equals y (N,).
        A label of y not seen in fit raises ValueError (no model could predict it)."""
        self._check_fitted()
        labels = check_labels(y, len(X))
        unseen = ~np.isin(labels, self.classes_)
        if unseen.any():
            raise ValueError(f"y: label {labels[np.argmax(unseen)]!r} was not seen in fit "
                             f"(classes_ = {self.classes_.tolist()!r})")
        return float(np.mean(self.predict(X) == labels))


class GRURegressor(GRUEstimator):
    """A GRU that maps a sequence to a value (y (N,)) or a vector (y (N, K)), in
    scikit-learn's convention.

    GRU stack -> pooling -> linear layer, trained with the mean squared error.
    ``predict`` returns the shape y had in fit; ``score`` is R² (averaged over outputs).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC.format(
        y_scale="; the targets too, and predictions are scaled back", extra_attrs=", target_mean_, target_scale_")
    _estimator_type = "regressor"

    def _fit_targets(self, y: Any, n: int, train_idx: np.ndarray) -> np.ndarray:
        arr = check_targets(y, n)
        self.target_ndim_ = arr.ndim
        arr = arr.reshape(n, -1)
        if self.standardize:
            self.target_mean_ = arr[train_idx].mean(axis=0)
            scale = arr[train_idx].std(axis=0)
            self.target_scale_ = np.where(scale > 0, scale, 1.0)
        else:
            self.target_mean_, self.target_scale_ = np.zeros(arr.shape[1]), np.ones(arr.shape[1])
        return ((arr - self.target_mean_) / self.target_scale_).astype(self.dtype)

    def _n_outputs(self) -> int:
        return len(self.target_mean_)

    def _loss(self, outputs: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
        return mean_squared_error(outputs, targets)

    def _extra_meta(self) -> dict[str, Any]:
        return {"target_ndim": self.target_ndim_}

    def _extra_tensors(self) -> dict[str, np.ndarray]:
        return {"target.mean": self.target_mean_, "target.scale": self.target_scale_}

    def _restore_extra(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.target_ndim_ = int(meta["target_ndim"])
        self.target_mean_, self.target_scale_ = tensors["target.mean"], tensors["target.scale"]

    def predict(self, X: Any) -> np.ndarray:
        """Predictions (N,) or (N, K), as y was in fit, in y's units."""
        pred = self._predict_outputs(X) * self.target_scale_ + self.target_mean_
        return pred[:, 0] if self.target_ndim_ == 1 else pred

    def score(self, X: Any, y: Any) -> float:
        """R², the coefficient of determination, averaged over the outputs as
        scikit-learn's ``r2_score``: 1 is perfect, 0 is as good as predicting the mean."""
        self._check_fitted()
        truth = check_targets(y, len(X)).reshape(len(X), -1)
        pred = self.predict(X).reshape(len(X), -1)
        if truth.shape != pred.shape:
            raise ValueError(f"y: expected {pred.shape[1]} target columns (as in fit), got {truth.shape[1]}")
        ss_res = ((truth - pred) ** 2).sum(axis=0)
        ss_tot = ((truth - truth.mean(axis=0)) ** 2).sum(axis=0)
        # scikit-learn's convention for a constant column: 1 if predicted exactly, else 0
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), (ss_res == 0).astype(float))
        return float(r2.mean())
