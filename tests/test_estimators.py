"""GRUClassifier, GRURegressor and forecast_windows: heads and losses against finite
differences, the classifier against torch, variable lengths, the scikit-learn protocol,
save/load, reproducibility and the argument checks."""

import numpy as np
import pytest

import grumpy
from grumpy.estimators.base import SequenceNet
from grumpy.estimators.heads import (
    linear_backward,
    linear_forward,
    mean_squared_error,
    pool_backward,
    pool_forward,
    softmax_cross_entropy,
)

from gru_helpers import numeric_grad  # noqa: E402

SMALL = dict(hidden_size=6, epochs=2, batch_size=8, seed=0)


def ragged(rng, n, F, lo=1, hi=7):
    return [rng.standard_normal((int(t), F)) for t in rng.integers(lo, hi + 1, n)]


def toy_classification(n=40, F=3, seed=0):
    """Label = whether the sum of the first feature is positive; lengths 2..9."""
    rng = np.random.default_rng(seed)
    X = ragged(rng, n, F, 2, 9)
    y = np.array(["pos" if s[:, 0].sum() > 0 else "neg" for s in X])
    return X, y


# -- heads and losses against finite differences (float64) ---------------------------

@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_pooling_gradient(pooling, D, with_lengths):
    rng = np.random.default_rng(1)
    T, B, H = 5, 4, 3
    out = rng.standard_normal((T, B, D * H))
    lengths = np.array([5, 1, 3, 4]) if with_lengths else None
    R = rng.standard_normal((B, D * H))
    d_out = pool_backward(R, lengths, pooling, D, T)
    num = numeric_grad(lambda: float((pool_forward(out, lengths, pooling, D) * R).sum()), out)
    np.testing.assert_allclose(d_out, num, atol=1e-8)
    if with_lengths:  # nothing flows to or from the steps past each length
        past = np.arange(T)[:, None] >= lengths[None, :]
        assert not d_out[past].any()


def test_pooling_values():
    out = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)  # T=2, B=3, D=2, H=2
    last = pool_forward(out, np.array([1, 2, 2]), "last", 2)
    np.testing.assert_array_equal(last[0], [0, 1, 2, 3])  # length 1: forward and reverse both at t=0
    np.testing.assert_array_equal(last[1], [16, 17, 6, 7])  # forward at t=1, reverse at t=0
    mean = pool_forward(out, np.array([1, 2, 2]), "mean", 2)
    np.testing.assert_array_equal(mean[0], out[0, 0])
    np.testing.assert_array_equal(mean[2], (out[0, 2] + out[1, 2]) / 2)


def test_linear_gradient():
    rng = np.random.default_rng(2)
    x, W, b = rng.standard_normal((4, 5)), rng.standard_normal((3, 5)), rng.standard_normal(3)
    R = rng.standard_normal((4, 3))
    dx, dW, db = linear_backward(R, x, W)
    f = lambda: float((linear_forward(x, W, b) * R).sum())  # noqa: E731
    for got, a in ((dx, x), (dW, W), (db, b)):
        np.testing.assert_allclose(got, numeric_grad(f, a), atol=1e-8)


def test_cross_entropy_gradient():
    rng = np.random.default_rng(3)
    logits, labels = rng.standard_normal((5, 4)) * 3, np.array([0, 3, 1, 1, 2])
    loss, d = softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(d, numeric_grad(lambda: softmax_cross_entropy(logits, labels)[0], logits), atol=1e-8)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(5), labels])), rel=1e-12)
    # a confident wrong answer: large and finite, not log(0)
    big, _ = softmax_cross_entropy(np.array([[1000.0, -1000.0]]), np.array([1]))
    assert big == pytest.approx(2000.0)


def test_mse_gradient():
    rng = np.random.default_rng(4)
    pred, target = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    loss, d = mean_squared_error(pred, target)
    assert loss == pytest.approx(np.mean((pred - target) ** 2))
    np.testing.assert_allclose(d, numeric_grad(lambda: mean_squared_error(pred, target)[0], pred), atol=1e-8)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_network_gradient(pooling):
    """The whole network (2-layer bidirectional GRU, pooling, head, cross-entropy) in float64."""
    rng = np.random.default_rng(5)
    net = SequenceNet(3, 4, hidden_size=3, num_layers=2, bidirectional=True, dropout=0.0, reset_after=True,
                      pooling=pooling, dtype=np.float64, rng=rng)
    x, lengths, labels = rng.standard_normal((6, 3, 3)), np.array([6, 2, 4]), np.array([0, 3, 2])

    def loss():
        return softmax_cross_entropy(net.forward(x, lengths, train=False), labels)[0]

    _, d = softmax_cross_entropy(net.forward(x, lengths, train=True), labels)
    net.backward(d)
    for name in ("head.weight", "head.bias", "gru.weight_hh_l1_reverse", "gru.weight_ih_l0", "gru.bias_hh_l0"):
        np.testing.assert_allclose(net.grads[name], numeric_grad(loss, net.params[name]), atol=1e-7, err_msg=name)


# -- against torch --------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifier_loss_and_gradients_match_torch(pooling, bidirectional):
    torch = pytest.importorskip("torch")
    nn_utils = torch.nn.utils.rnn
    X, y = toy_classification(24)
    clf = grumpy.GRUClassifier(hidden_size=5, num_layers=2, bidirectional=bidirectional, pooling=pooling,
                               epochs=1, batch_size=8, seed=0, dtype="float64", standardize=False).fit(X, y)
    net = clf.net_
    idx = np.arange(10)
    lengths = np.array([len(X[i]) for i in idx])
    x = np.zeros((lengths.max(), len(idx), 3))
    for j, i in enumerate(idx):
        x[: lengths[j], j] = X[i]
    labels = np.searchsorted(clf.classes_, y[idx])
    loss, d = clf._loss(net.forward(x, lengths, train=True), labels)
    net.backward(d)

    gru = torch.nn.GRU(3, 5, 2, bidirectional=bidirectional, dtype=torch.float64)
    gru.load_state_dict({k: torch.tensor(v) for k, v in net.gru.params.items()})
    head = torch.nn.Linear(5 * (2 if bidirectional else 1), 2, dtype=torch.float64)
    head.load_state_dict({"weight": torch.tensor(net.params["head.weight"]),
                          "bias": torch.tensor(net.params["head.bias"])})
    packed = nn_utils.pack_padded_sequence(torch.tensor(x), torch.tensor(lengths), enforce_sorted=False)
    out, h_n = gru(packed)
    if pooling == "last":
        pooled = torch.cat([h_n[-2], h_n[-1]], dim=1) if bidirectional else h_n[-1]
    else:
        padded, _ = nn_utils.pad_packed_sequence(out)
        pooled = padded.sum(0) / torch.tensor(lengths, dtype=torch.float64)[:, None]
    t_loss = torch.nn.functional.cross_entropy(head(pooled), torch.tensor(labels))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-12)
    for name, p in gru.named_parameters():
        np.testing.assert_allclose(net.grads["gru." + name], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(net.grads["head.weight"], head.weight.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(net.grads["head.bias"], head.bias.grad.numpy(), rtol=1e-9, atol=1e-12)


# -- variable lengths -----------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_variable_length_batch_equals_each_alone(dtype, tol):
    X, y = toy_classification(30)
    clf = grumpy.GRUClassifier(**SMALL, bidirectional=True, pooling="mean", dtype=dtype).fit(X, y)
    together = clf.predict_proba(X)
    alone = np.concatenate([clf.predict_proba([s]) for s in X])
    np.testing.assert_allclose(together, alone, rtol=tol, atol=tol)
    # Gradients too: a batch's mean loss has the mean of the sequences' gradients.
    net = clf.net_
    lengths = np.array([len(s) for s in X[:5]])
    x = np.zeros((lengths.max(), 5, 3), dtype)
    for j, s in enumerate(X[:5]):
        x[: len(s), j] = (s - clf.input_mean_) / clf.input_scale_
    targets = np.zeros((5, 2), dtype)

    def grads(xb, lb, tb):
        _, d = mean_squared_error(net.forward(xb, lb, train=True), tb)
        net.backward(d)
        return {k: g.astype(np.float64) for k, g in net.grads.items()}

    batch = grads(x, lengths, targets)
    single = [grads(np.ascontiguousarray(x[: lengths[j], j : j + 1]), None, targets[j : j + 1]) for j in range(5)]
    for k in batch:
        np.testing.assert_allclose(batch[k], np.mean([s[k] for s in single], axis=0), rtol=10 * tol, atol=tol,
                                   err_msg=k)


def test_array_and_list_of_equal_lengths_agree():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((12, 5, 3)), np.arange(12) % 3
    clf = grumpy.GRUClassifier(**SMALL, dtype="float64").fit(X, y)
    np.testing.assert_array_equal(clf.predict_proba(X), clf.predict_proba(list(X)))
    one = grumpy.GRURegressor(**SMALL, dtype="float64").fit(X[:, :, 0], y)  # (N, T): one feature
    np.testing.assert_array_equal(one.predict(X[:, :, 0]), one.predict(X[:, :, :1]))


# -- behaviour ------------------------------------------------------------------------

def test_classifier_learns_and_keeps_labels():
    X, y = toy_classification(120)
    clf = grumpy.GRUClassifier(hidden_size=8, epochs=15, batch_size=16, lr=0.01, seed=0).fit(X, y)
    assert clf.classes_.tolist() == ["neg", "pos"]
    assert clf.score(X, y) > 0.9
    proba = clf.predict_proba(X)
    assert proba.shape == (120, 2) and np.allclose(proba.sum(1), 1)
    assert set(clf.predict(X)) <= {"neg", "pos"}
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]


def test_regressor_vector_targets_and_shapes():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((150, 6))  # (N, T): one feature
    y = np.stack([X.sum(1), X[:, -1]], axis=1) * 10 + 3
    reg = grumpy.GRURegressor(hidden_size=12, epochs=30, batch_size=16, lr=0.01, seed=0).fit(X, y)
    assert reg.predict(X).shape == (150, 2)
    assert reg.score(X, y) > 0.9
    reg1 = grumpy.GRURegressor(**SMALL).fit(X, y[:, 0])
    assert reg1.predict(X).shape == (150,)


def test_early_stopping_restores_best_weights():
    X, y = toy_classification(60)
    clf = grumpy.GRUClassifier(hidden_size=8, epochs=40, batch_size=8, lr=0.05, seed=1,
                               validation_fraction=0.3, patience=3).fit(X, y)
    curve = clf.validation_loss_curve_
    assert clf.n_epochs_ == len(curve) == len(clf.loss_curve_)
    assert curve[clf.best_epoch_ - 1] == min(curve)
    assert clf.n_epochs_ < 40 and clf.n_epochs_ - clf.best_epoch_ == 3
    seqs = clf._scaled(grumpy.estimators.inputs.check_sequences(X))
    val = np.arange(42, 60)
    loss, _ = clf._loss(clf._outputs(seqs, val), np.searchsorted(clf.classes_, y[val]))
    assert loss == pytest.approx(min(curve), rel=1e-6)


def test_same_seed_same_model_bit_for_bit():
    X, y = toy_classification(40)
    kw = dict(hidden_size=6, num_layers=2, dropout=0.3, epochs=3, batch_size=8, validation_fraction=0.25, seed=7)
    a = grumpy.GRUClassifier(**kw).fit(X, y)
    b = grumpy.GRUClassifier(**kw).fit(X, y)
    c = grumpy.GRUClassifier(**{**kw, "seed": 8}).fit(X, y)
    for k in a.net_.params:
        np.testing.assert_array_equal(a.net_.params[k], b.net_.params[k])
    assert a.loss_curve_ == b.loss_curve_
    assert not np.array_equal(a.net_.params["head.weight"], c.net_.params["head.weight"])


def test_optimizers_weight_decay_clipping_pooling_run():
    X, y = toy_classification(24)
    for opt in ("sgd", "adagrad", "rmsprop", "adam", "adamw"):
        clf = grumpy.GRUClassifier(**{**SMALL, "optimizer": opt, "weight_decay": 1e-3, "clip_norm": 1.0,
                                      "pooling": "mean", "reset_after": False})
        assert np.isfinite(clf.fit(X, y).loss_curve_).all()


def test_verbose_shows_a_progress_bar(capsys):
    X, y = toy_classification(16)
    grumpy.GRUClassifier(**{**SMALL, "verbose": True}).fit(X, y)
    assert "GRUClassifier" in capsys.readouterr().err


# -- save / load ----------------------------------------------------------------------

def test_save_load_round_trip_bit_exact(tmp_path):
    X, y = toy_classification(30)
    clf = grumpy.GRUClassifier(**{**SMALL, "seed": np.int64(3)}, bidirectional=True).fit(X, y)
    clf.save(tmp_path / "clf.safetensors")
    back = grumpy.GRUClassifier.load(tmp_path / "clf.safetensors")
    assert back.get_params() == clf.get_params()
    assert back.classes_.dtype == clf.classes_.dtype and back.classes_.tolist() == clf.classes_.tolist()
    for k in clf.net_.params:
        np.testing.assert_array_equal(back.net_.params[k], clf.net_.params[k])
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))
    assert back.loss_curve_ == clf.loss_curve_

    rng = np.random.default_rng(0)
    Xr, yr = rng.standard_normal((20, 4, 2)), rng.standard_normal((20, 3))
    reg = grumpy.GRURegressor(**SMALL).fit(Xr, yr)
    reg.save(tmp_path / "reg.safetensors")
    np.testing.assert_array_equal(grumpy.GRURegressor.load(tmp_path / "reg.safetensors").predict(Xr),
                                  reg.predict(Xr))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


def test_load_rejects_bad_files(tmp_path):
    X, y = toy_classification(16)
    grumpy.GRUClassifier(**SMALL).fit(X, y).save(tmp_path / "clf.safetensors")
    with pytest.raises(ValueError, match="holds a GRUClassifier"):
        grumpy.GRURegressor.load(tmp_path / "clf.safetensors")
    (tmp_path / "junk").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="junk"):
        grumpy.GRUClassifier.load(tmp_path / "junk")
    with pytest.raises(ValueError, match="no such file"):
        grumpy.GRUClassifier.load(tmp_path / "missing")
    with pytest.raises(grumpy.estimators.NotFittedError):
        grumpy.GRUClassifier().save(tmp_path / "x")
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(tmp_path / "clf.safetensors"), "numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "clf.safetensors"))
    del tensors["head.bias"]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="head.bias is missing"):
        grumpy.GRUClassifier.load(tmp_path / "cut.safetensors")
    save_file(load_file(str(tmp_path / "clf.safetensors")), str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="not a saved grumpy estimator"):
        grumpy.GRUClassifier.load(tmp_path / "nometa.safetensors")


# -- scikit-learn protocol ------------------------------------------------------------

def test_get_params_set_params_without_sklearn():
    clf = grumpy.GRUClassifier(hidden_size=7, seed=3)
    params = clf.get_params()
    assert params["hidden_size"] == 7 and params["seed"] == 3 and params["pooling"] == "last"
    assert type(clf)(**params).get_params() == params
    assert clf.set_params(hidden_size=9, lr=0.1) is clf and clf.hidden_size == 9
    with pytest.raises(ValueError, match="hidden_sise"):
        clf.set_params(hidden_sise=3)
    assert "hidden_size=9" in repr(clf)


def test_sklearn_clone_cross_val_and_grid_search():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.base import clone, is_classifier, is_regressor
    from sklearn.model_selection import GridSearchCV, cross_val_score

    clf = grumpy.GRUClassifier(**SMALL)
    twin = clone(clf)
    assert twin is not clf and twin.get_params() == clf.get_params()
    assert is_classifier(clf) and is_regressor(grumpy.GRURegressor())
    X, y = toy_classification(40)
    scores = cross_val_score(clf, X, y, cv=2)
    assert scores.shape == (2,) and np.all((0 <= scores) & (scores <= 1))
    rng = np.random.default_rng(0)
    Xr = rng.standard_normal((30, 5, 2))
    search = GridSearchCV(grumpy.GRURegressor(**SMALL), {"hidden_size": [3, 5]}, cv=2).fit(Xr, Xr[:, :, 0].sum(1))
    assert search.best_params_["hidden_size"] in (3, 5)
    assert sklearn.__version__


# -- bad input ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted():
    X, y = toy_classification(20)
    return grumpy.GRUClassifier(**SMALL).fit(X, y), X, y


def test_ragged_array_without_a_list():
    X, y = toy_classification(6)
    obj = np.empty(len(X), dtype=object)
    obj[:] = X
    with pytest.raises(ValueError, match="^X: .*list of arrays"):
        grumpy.GRUClassifier(**SMALL).fit(obj, y)


def test_nan_in_X_and_y():
    X, y = toy_classification(10)
    X[3] = X[3].copy()
    X[3][1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^X\[3\]: contains NaN"):
        grumpy.GRUClassifier(**SMALL).fit(X, y)
    with pytest.raises(ValueError, match="^X: contains NaN"):
        grumpy.GRURegressor(**SMALL).fit(np.full((4, 3, 2), np.nan), np.zeros(4))
    Xg, _ = toy_classification(10)
    with pytest.raises(ValueError, match="^y: contains NaN"):
        grumpy.GRURegressor(**SMALL).fit(Xg, np.r_[np.zeros(9), np.nan])
    with pytest.raises(ValueError, match="^y: contains NaN"):
        grumpy.GRUClassifier(**SMALL).fit(Xg, np.r_[np.zeros(5), np.ones(4), np.nan])
    with pytest.raises(ValueError, match="^y: missing label"):
        grumpy.GRUClassifier(**SMALL).fit(Xg, ["a"] * 5 + ["b"] * 4 + [None])


def test_label_seen_only_in_predict(fitted):
    clf, X, y = fitted
    bad = y.copy().astype(object)
    bad[4] = "maybe"
    with pytest.raises(ValueError, match="^y: label 'maybe' was not seen in fit"):
        clf.score(X, bad)


def test_wrong_feature_count_in_predict(fitted):
    clf, X, _ = fitted
    with pytest.raises(ValueError, match="^X: expected 3 features per step \\(as in fit\\), got 2"):
        clf.predict([s[:, :2] for s in X])
    with pytest.raises(ValueError, match="^X: expected 3 features"):
        clf.predict_proba(np.zeros((2, 4, 5)))


def test_empty_sequence(fitted):
    clf, X, y = fitted
    with pytest.raises(ValueError, match=r"^X\[1\]: empty sequence"):
        clf.predict([X[0], np.zeros((0, 3)), X[2]])
    with pytest.raises(ValueError, match=r"^X: empty sequences"):
        grumpy.GRUClassifier(**SMALL).fit(np.zeros((4, 0, 3)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="^X: no sequences"):
        grumpy.GRUClassifier(**SMALL).fit([], [])


@pytest.mark.parametrize("arg,value", [("hidden_size", 0), ("dropout", 1.0), ("pooling", "max"), ("epochs", 0),
                                       ("optimizer", "lion"), ("lr", -1.0), ("validation_fraction", 1.0),
                                       ("patience", 0), ("seed", 1.5), ("dtype", "float16"), ("clip_norm", 0)])
def test_bad_arguments_named(arg, value):
    X, y = toy_classification(10)
    with pytest.raises(ValueError, match=f"^{arg}: "):
        grumpy.GRUClassifier(**{**SMALL, arg: value}).fit(X, y)


def test_other_bad_targets():
    X, y = toy_classification(10)
    with pytest.raises(ValueError, match="^y: expected one label per sequence"):
        grumpy.GRUClassifier(**SMALL).fit(X, y[:5])
    with pytest.raises(ValueError, match="^y: need at least 2 classes"):
        grumpy.GRUClassifier(**SMALL).fit(X, ["a"] * 10)
    with pytest.raises(ValueError, match="^y: expected shape"):
        grumpy.GRURegressor(**SMALL).fit(X, np.zeros((10, 2, 2)))
    with pytest.raises(grumpy.estimators.NotFittedError, match="not fitted"):
        grumpy.GRURegressor().predict(X)


# -- forecasting ------------------------------------------------------------------------

def test_forecast_windows_split_in_time():
    s = np.arange(20.0)
    w = grumpy.forecast_windows(s, window=4, horizon=2, test_size=0.25)  # split at t = 15
    assert w.X_train.shape[1:] == (4, 1) and w.y_train.shape[1:] == (2,)
    np.testing.assert_array_equal(w.X_train[0, :, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(w.y_train[0], [4, 5])
    assert w.y_train.max() < 15 <= w.y_test.min()  # no test value is a training target
    np.testing.assert_array_equal(w.y_test[:, 0], np.arange(15, 19))
    np.testing.assert_array_equal(w.X_test[:, -1, 0] + 1, w.y_test[:, 0])  # windows end just before targets


def test_forecast_windows_several_series_and_features():
    a, b = np.arange(30.0).reshape(15, 2), 100 + np.arange(20.0).reshape(10, 2)
    w = grumpy.forecast_windows([a, b], window=3, horizon=1, test_size=0.2, stride=2)
    assert w.X_train.shape[1:] == (3, 2) and w.y_train.shape[1:] == (2,)
    assert (w.X_train >= 100).any() and (w.X_test >= 100).any()
    assert len(grumpy.forecast_windows(a, window=3, test_size=0).X_test) == 0


def test_forecast_windows_bad_input():
    with pytest.raises(ValueError, match="^series: contains NaN"):
        grumpy.forecast_windows([1.0, np.nan, 3.0, 4.0], window=1)
    with pytest.raises(ValueError, match="^window: "):
        grumpy.forecast_windows(np.arange(10.0), window=0)
    with pytest.raises(ValueError, match="^window: no training pairs"):
        grumpy.forecast_windows(np.arange(5.0), window=5)
    with pytest.raises(ValueError, match=r"^series\[1\]: expected 1 features"):
        grumpy.forecast_windows([np.arange(10.0), np.zeros((10, 2))], window=2)
    with pytest.raises(ValueError, match="^test_size: "):
        grumpy.forecast_windows(np.arange(10.0), window=2, test_size=1.0)


def test_regressor_forecasts_a_sine():
    t = np.arange(400)
    w = grumpy.forecast_windows(np.sin(t * 0.2), window=12, horizon=3, test_size=0.25)
    reg = grumpy.GRURegressor(hidden_size=16, epochs=15, batch_size=16, lr=0.01, seed=0).fit(w.X_train, w.y_train)
    assert reg.score(w.X_test, w.y_test) > 0.95
