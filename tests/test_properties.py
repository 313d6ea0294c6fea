"""Hypothesis property tests over shapes, lengths and options (T = 1, B = 1, H = 1 included)."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import grumpy

dims = st.integers(1, 5)


@st.composite
def problems(draw):
    T, B, I, H, L = draw(dims), draw(dims), draw(dims), draw(dims), draw(st.integers(1, 3))
    opts = dict(
        bidirectional=draw(st.booleans()), reset_after=draw(st.booleans()), bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        dtype=draw(st.sampled_from([np.float32, np.float64])),
    )
    lengths = draw(st.none() | st.lists(st.integers(1, T), min_size=B, max_size=B).map(np.array))
    seed = draw(st.integers(0, 2**16))
    return T, B, I, H, L, opts, lengths, seed


@given(problems())
def test_shapes_padding_and_final_states(problem):
    T, B, I, H, L, opts, lengths, seed = problem
    gru = grumpy.GRU(I, H, L, seed=seed, **opts)
    D = 2 if opts["bidirectional"] else 1
    rng = np.random.default_rng(seed)
    dt = opts["dtype"]
    x = rng.standard_normal((B, T, I) if opts["batch_first"] else (T, B, I)).astype(dt)
    h0 = rng.uniform(-1, 1, (L * D, B, H)).astype(dt)
    out, h_n = gru.forward(x, h0, lengths=lengths)

    assert out.shape == ((B, T, D * H) if opts["batch_first"] else (T, B, D * H))
    assert h_n.shape == (L * D, B, H) and out.dtype == dt and h_n.dtype == dt
    # Each new state is a convex combination of the old one and a tanh, so it stays in [-1, 1].
    assert np.all(np.abs(out) <= 1) and np.all(np.abs(h_n) <= 1)
    tm = out.transpose(1, 0, 2) if opts["batch_first"] else out
    if lengths is not None:
        for b, n in enumerate(lengths):
            assert not tm[n:, b].any()
    # The top layer's forward-direction h_n is its output at each sequence's last valid step.
    last = np.full(B, T) if lengths is None else lengths
    top_fwd = tm[last - 1, np.arange(B), :H]
    np.testing.assert_array_equal(h_n[(L - 1) * D], top_fwd)
    if D == 2:  # the reverse direction ends at t = 0
        np.testing.assert_array_equal(h_n[-1], tm[0, :, H:])

    d_out = rng.standard_normal(out.shape).astype(dt)
    dx, dh0 = gru.backward(d_out)
    assert dx.shape == x.shape and dh0.shape == h0.shape
    assert dx.dtype == dt and all(gru.grads[k].shape == v.shape for k, v in gru.params.items())
    if lengths is not None:  # padded inputs never influence anything
        dxt = dx.transpose(1, 0, 2) if opts["batch_first"] else dx
        for b, n in enumerate(lengths):
            assert not dxt[n:, b].any()
