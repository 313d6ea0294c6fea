"""Buffer reuse: a layer keeps its training buffers between steps and its backward
overwrites the forward's; none of that may change a result or leak between calls."""

import numpy as np
import pytest

from grumpy import GRU
from grumpy.layers import gru_backward, gru_forward


def grads_fresh(params, x, h0, d_out, route=None):
    """The pure functions: fresh buffers, nothing reused."""
    out, h_n, cache = gru_forward(params, x, h0, route=route)
    dx, dh0, g = gru_backward(params, cache, d_out)
    return out, h_n, dx, dh0, g


@pytest.mark.parametrize("branch", ["loop", "packed", "steps", "steps-no-mkl"])
def test_reused_buffers_give_the_same_results_as_fresh_ones(monkeypatch, branch):
    from grumpy.kernels import blas as _blas

    if branch == "packed" and _blas.MKL is None:
        pytest.skip("the packed route needs MKL")
    if branch == "steps-no-mkl":
        monkeypatch.setattr(_blas, "MKL", None)
    route = branch.removesuffix("-no-mkl")
    rng = np.random.default_rng(0)
    gru = GRU(5, 7, seed=0, route=route)
    # different lengths and batch sizes in turn: buffers are replaced when shapes change
    for T, B in [(6, 3), (6, 3), (4, 2), (6, 3)]:
        x = rng.standard_normal((T, B, 5)).astype(np.float32)
        h0 = rng.standard_normal((1, B, 7)).astype(np.float32)
        d_out = rng.standard_normal((T, B, 7)).astype(np.float32)
        want_out, want_hn, want_dx, want_dh0, want_g = grads_fresh(gru.params, x, h0, d_out, route)
        out, h_n = gru.forward(x, h0)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(h_n, want_hn)
        gru.zero_grad()
        dx, dh0 = gru.backward(d_out)
        np.testing.assert_array_equal(dx, want_dx)
        np.testing.assert_array_equal(dh0, want_dh0)
        for k, v in want_g.items():
            np.testing.assert_array_equal(gru.grads[k], v, err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pure_backward_leaves_its_cache_intact(dtype):
    rng = np.random.default_rng(1)
    params = GRU(4, 6, dtype=dtype, seed=1).params
    x = rng.standard_normal((5, 2, 4)).astype(dtype)
    h0 = np.zeros((1, 2, 6), dtype)
    d_out = rng.standard_normal((5, 2, 6)).astype(dtype)
    _, _, cache = gru_forward(params, x, h0)
    first = gru_backward(params, cache, d_out)
    second = gru_backward(params, cache, d_out)
    np.testing.assert_array_equal(first[0], second[0])
    for k in first[2]:
        np.testing.assert_array_equal(first[2][k], second[2][k], err_msg=k)


def test_layer_backward_runs_once_per_forward():
    gru = GRU(3, 4, seed=0)
    x = np.ones((2, 1, 3), np.float32)
    d = np.ones((2, 1, 4), np.float32)
    gru.forward(x)
    gru.backward(d)
    with pytest.raises(RuntimeError, match="already called for the last forward"):
        gru.backward(d)
    gru.forward(x)
    gru.backward(d)


@pytest.mark.parametrize("cls_kw", [dict(), dict(dtype=np.float64, reset_after=False), dict(rnn=True)])
def test_input_grad_false_skips_dx_only(cls_kw):
    from grumpy import RNN

    kw = dict(cls_kw)
    cls = RNN if kw.pop("rnn", False) else GRU
    rng = np.random.default_rng(3)
    dt = kw.get("dtype", np.float32)
    layer = cls(4, 5, num_layers=2, bidirectional=True, dropout=0.3, seed=0, **kw)
    x = rng.standard_normal((6, 3, 4)).astype(dt)
    d = rng.standard_normal((6, 3, 10)).astype(dt)
    grads = []
    for input_grad in (True, False):
        layer.rng = np.random.default_rng(7)  # the same dropout masks both times
        layer.zero_grad()
        layer.forward(x)
        dx, dh0 = layer.backward(d, input_grad=input_grad)
        assert (dx is None) == (not input_grad) and dh0.shape == (4, 3, 5)
        grads.append({k: v.copy() for k, v in layer.grads.items()})
    for k in grads[0]:
        np.testing.assert_array_equal(grads[1][k], grads[0][k], err_msg=k)


def test_char_model_second_backward_raises_before_touching_gradients():
    from grumpy.lm.model import CharModel, ModelConfig

    model = CharModel(ModelConfig(vocab_size=7, hidden_size=6, num_layers=1, embedding_dim=3), seed=0)
    logits, _ = model.forward(np.random.default_rng(0).integers(0, 7, (4, 2)))
    model.backward(np.ones_like(logits))
    before = {k: v.copy() for k, v in model.grads.items()}
    with pytest.raises(RuntimeError, match="already called for the last forward"):
        model.backward(np.ones_like(logits))
    for k, v in before.items():
        np.testing.assert_array_equal(model.grads[k], v, err_msg=k)
