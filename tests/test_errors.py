"""Bad input is refused with a ValueError that says what was expected and what came;
extreme inputs produce no overflow (pytest turns warnings into errors)."""

import numpy as np
import pytest

import grumpy


def gru(**kw):
    return grumpy.GRU(3, 4, **kw)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, "complex64", "not-a-dtype"])
def test_unsupported_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        gru(dtype=dtype)


@pytest.mark.parametrize("kw,match", [
    (dict(input_size=0), "input_size"), (dict(hidden_size=-1), "hidden_size"),
    (dict(num_layers=0), "num_layers"), (dict(dropout=1.0), "dropout"), (dict(weight_drop=-0.1), "weight_drop"), (dict(init="zeros"), "init"),
    (dict(hidden_size=2.5), "hidden_size"),
])
def test_bad_constructor_arguments(kw, match):
    args = dict(input_size=3, hidden_size=4) | kw
    with pytest.raises(ValueError, match=match):
        grumpy.GRU(**args)


@pytest.mark.parametrize("x,match", [
    (np.zeros((5, 3), np.float32), r"3-d.*\(5, 3\)"),
    (np.zeros((5, 2, 7), np.float32), "I=3"),
    (np.zeros((5, 2, 3), np.float64), "float32.*float64"),
    (np.zeros((5, 2, 3), np.int64), "dtype"),
])
def test_bad_input_array(x, match):
    with pytest.raises(ValueError, match=match):
        gru().forward(x)


def test_bad_h0():
    x = np.zeros((5, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"h0.*\(1, 2, 4\).*\(2, 2, 4\)"):
        gru().forward(x, np.zeros((2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="h0.*float32"):
        gru().forward(x, np.zeros((1, 2, 4)))


@pytest.mark.parametrize("lengths,match", [
    ([0, 3], r"\[1, 5\].*lengths\[0\] = 0"), ([6, 3], r"lengths\[0\] = 6"), ([3], r"shape \(2,\)"),
    ([[3, 3]], "shape"), ([2.5, 3], "integers"), (["a", "b"], "integers"),
])
def test_bad_lengths(lengths, match):
    with pytest.raises(ValueError, match=match):
        gru().forward(np.zeros((5, 2, 3), np.float32), lengths=lengths)


def test_bad_state_dict():
    g = gru(num_layers=2)
    good = g.state_dict()
    with pytest.raises(ValueError, match="missing keys.*bias_hh_l1"):
        g.load_state_dict({k: v for k, v in good.items() if k != "bias_hh_l1"})
    with pytest.raises(ValueError, match="unexpected keys.*weight_ih_l2"):
        g.load_state_dict(good | {"weight_ih_l2": good["weight_ih_l1"]})
    with pytest.raises(ValueError, match=r"weight_hh_l0 has shape \(12, 3\), expected \(12, 4\)"):
        g.load_state_dict(good | {"weight_hh_l0": np.zeros((12, 3))})
    for bad in (np.nan, np.inf):
        w = good["bias_ih_l0"].copy()
        w[3] = bad
        with pytest.raises(ValueError, match="bias_ih_l0 contains non-finite"):
            g.load_state_dict(good | {"bias_ih_l0": w})
    # A failed load leaves the layer as it was.
    assert all(np.array_equal(g.params[k], v) for k, v in good.items())


def test_backward_checks():
    g = gru()
    with pytest.raises(RuntimeError, match="before forward"):
        g.backward(np.zeros((5, 2, 4), np.float32))
    g.forward(np.zeros((5, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"d_output.*\(5, 2, 4\)"):
        g.backward(np.zeros((5, 2, 3), np.float32))


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_inputs_do_not_overflow(reset_after, dtype):
    g = grumpy.GRU(3, 4, 2, reset_after=reset_after, dtype=dtype, seed=0)
    big = np.finfo(dtype).max / 1e6
    x = np.array([[[big, -big, 0.0]], [[-big, big, 1e4]], [[1e4, -1e4, -big]]], dtype)
    out, h_n = g.forward(x)
    assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1)
    dx, dh0 = g.backward(np.ones_like(out))
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dh0))
    cell = grumpy.GRUCell(3, 4, reset_after=reset_after, dtype=dtype)
    assert np.all(np.isfinite(cell.forward(x[0])))


def test_dropout_train_and_eval():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    a = grumpy.GRU(3, 4, 3, dropout=0.5, seed=11)
    b = grumpy.GRU(3, 4, 3, dropout=0.5, seed=11)
    nodrop = grumpy.GRU(3, 4, 3, seed=0)
    nodrop.load_state_dict(a.state_dict())
    out_a, _ = a.forward(x)
    out_b, _ = b.forward(x)
    np.testing.assert_array_equal(out_a, out_b)  # same seed, same masks
    ref, _ = nodrop.forward(x)
    assert not np.allclose(out_a, ref)  # dropout acts in training ...
    np.testing.assert_array_equal(a.eval().forward(x)[0], ref)  # ... and not in eval
    # Dropout sits between layers only: a single layer is unaffected.
    one = grumpy.GRU(3, 4, 1, dropout=0.5, seed=3)
    one_ref = grumpy.GRU(3, 4, 1, seed=3)
    np.testing.assert_array_equal(one.forward(x)[0], one_ref.forward(x)[0])


def test_weight_drop_train_and_eval():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    a = grumpy.GRU(3, 4, 1, weight_drop=0.5, seed=11)
    ref = grumpy.GRU(3, 4, 1, seed=0)
    ref.load_state_dict(a.state_dict())
    first, second = a.forward(x)[0], a.forward(x)[0]
    assert not np.allclose(first, second)  # a fresh mask for each forward in training ...
    np.testing.assert_array_equal(a.eval().forward(x)[0], ref.forward(x)[0])  # ... none in eval
    for k, v in ref.params.items():  # the stored weights are never the dropped ones
        np.testing.assert_array_equal(a.params[k], v)
    assert "weight_drop=0.5" in repr(a)


def test_orthogonal_init():
    g = grumpy.GRU(3, 5, init="orthogonal", dtype=np.float64, seed=0)
    for block in np.split(g.params["weight_hh_l0"], 3):
        np.testing.assert_allclose(block @ block.T, np.eye(5), atol=1e-12)
