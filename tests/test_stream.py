"""GRUStream: step by step over a batch of streams equals GRU.forward over the sequence."""

import numpy as np
import pytest

import grumpy
from grumpy import GRU, GRUStream


def make(num_layers, reset_after, bias=True, dtype=np.float32, I=5, H=7, seed=0):
    g = GRU(I, H, num_layers, reset_after=reset_after, bias=bias, dtype=dtype, seed=seed).eval()
    rng = np.random.default_rng(seed)
    # larger weights than the default initialisation, so that the gates saturate and differ
    g.load_state_dict({k: rng.uniform(-0.9, 0.9, v.shape) for k, v in g.params.items()})
    return g


TOL = {np.float32: 2e-6, np.float64: 1e-13}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_layers,reset_after,bias", [(1, True, True), (2, True, False), (3, False, True),
                                                          (2, False, False)])
@pytest.mark.parametrize("B", [1, 4])
def test_steps_equal_forward(dtype, num_layers, reset_after, bias, B):
    g = make(num_layers, reset_after, bias, dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, B, 5)).astype(dtype)
    h0 = rng.standard_normal((num_layers, B, 7)).astype(dtype)
    y, h_n = g.forward(x, h0, grad=False)
    s = GRUStream(g)
    h = h0
    outs = []
    for t in range(12):
        o, h = s.step(x[t], h)
        outs.append(o)
    np.testing.assert_allclose(np.stack(outs), y, rtol=0, atol=TOL[dtype])
    np.testing.assert_allclose(h, h_n, rtol=0, atol=TOL[dtype])
    assert h.dtype == dtype and o.shape == (B, 7)


def test_reset_chosen_rows_starts_them_over():
    g = make(2, True)
    s = GRUStream(g)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 3, 5)).astype(np.float32)
    h = s.initial_state(3)
    assert h.shape == (2, 3, 7) and not h.any()
    outs = []
    for t in range(10):
        if t == 4:
            h = s.reset(h, [1])
        o, h = s.step(x[t], h)
        outs.append(o)
    outs = np.stack(outs)
    full, _ = g.forward(x, grad=False)
    again, _ = g.forward(np.ascontiguousarray(x[4:, 1:2]), grad=False)  # stream 1 from zeros at step 4
    np.testing.assert_allclose(outs[:, [0, 2]], full[:, [0, 2]], atol=2e-6, rtol=0)
    np.testing.assert_allclose(outs[:4, 1], full[:4, 1], atol=2e-6, rtol=0)
    np.testing.assert_allclose(outs[4:, 1], again[:, 0], atol=2e-6, rtol=0)
    # a boolean mask works as rows too
    h2 = s.reset(np.ones((2, 3, 7), np.float32), np.array([True, False, True]))
    assert h2[:, 1].all() and not h2[:, [0, 2]].any()


def test_none_state_is_zeros_and_snapshot():
    g = make(1, True)
    s = GRUStream(g)
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    o1, _ = s.step(x)
    o2, _ = s.step(x, s.initial_state(2))
    np.testing.assert_array_equal(o1, o2)
    g.params["weight_hh_l0"][...] = 0  # the stream keeps the weights it was built with
    np.testing.assert_array_equal(s.step(x)[0], o1)


def test_bidirectional_and_bad_shapes():
    g = GRU(3, 4, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional GRU cannot stream"):
        GRUStream(g)
    with pytest.raises(ValueError, match="expected a grumpy.GRU"):
        GRUStream(grumpy.RNN(3, 4))
    s = GRUStream(GRU(3, 4, 2))
    with pytest.raises(ValueError, match=r"x_t: expected shape \(B, 3\)"):
        s.step(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"h: expected shape \(2, 2, 4\)"):
        s.step(np.zeros((2, 3), np.float32), np.zeros((1, 2, 4), np.float32))
