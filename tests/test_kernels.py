"""The fast sequence kernels against the readable reference cell, and consistency properties."""

import numpy as np
import pytest

from gru_helpers import make_problem, rel_err

import grumpy
from grumpy.cell import gru_cell_backward, gru_cell_forward
from grumpy.kernels import gru_sequence_backward, gru_sequence_forward


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reset_after", [True, False])
def test_kernels_match_cell_stepped_by_hand(reset_after, bias, reverse):
    rng = np.random.default_rng(0)
    T, B, I, H = 6, 3, 4, 5
    cell = grumpy.GRUCell(I, H, bias=bias, reset_after=reset_after, dtype=np.float64, seed=1)
    p = cell.params
    w = (p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh"))
    x, h0 = rng.standard_normal((T, B, I)), rng.standard_normal((B, H))
    d_out, d_last = rng.standard_normal((T, B, H)), rng.standard_normal((B, H))

    out, h_last, cache = gru_sequence_forward(x, h0, *w, reset_after=reset_after, reverse=reverse)
    dx, dh0, grads = gru_sequence_backward(d_out, d_last, cache, w[0], w[1], bias=bias)

    order = list(range(T - 1, -1, -1) if reverse else range(T))
    h, caches, ref_out = h0, {}, np.empty_like(out)
    for t in order:
        h, caches[t] = gru_cell_forward(x[t], h, *w, reset_after=reset_after)
        ref_out[t] = h
    dh, ref_dx = d_last.copy(), np.empty_like(dx)
    ref_grads = {k: np.zeros_like(v) for k, v in p.items()}
    for t in reversed(order):
        ref_dx[t], dh, g = gru_cell_backward(dh + d_out[t], caches[t], w[0], w[1])
        for k in ref_grads:
            ref_grads[k] += g[k]

    assert rel_err(out, ref_out) < 1e-13
    assert rel_err(h_last, h) < 1e-13
    assert rel_err(dx, ref_dx) < 1e-12
    assert rel_err(dh0, dh) < 1e-12
    assert set(grads) == set(ref_grads)
    for k in grads:
        assert rel_err(grads[k], ref_grads[k]) < 1e-12, k


@pytest.mark.parametrize("reset_after", [True, False])
def test_two_chunks_with_carried_state_equal_one_pass(reset_after):
    gru, x, h0, _, w_out, w_hn = make_problem(T=8, num_layers=2, reset_after=reset_after)
    out, h_n = gru.forward(x, h0)
    dx, dh0 = gru.backward(w_out, w_hn)
    full_grads = {k: v.copy() for k, v in gru.grads.items()}
    gru.zero_grad()

    out1, h1 = gru.forward(x[:3], h0)
    out2, h2 = gru.forward(x[3:], h1)
    assert rel_err(np.concatenate([out1, out2]), out) < 1e-14
    assert rel_err(h2, h_n) < 1e-14
    # Backward in reverse chunk order, passing the state gradient across the boundary.
    dx2, dh1 = gru.backward(w_out[3:], w_hn)
    gru.forward(x[:3], h0)
    dx1, dh0_chunks = gru.backward(w_out[:3], dh1)
    assert rel_err(np.concatenate([dx1, dx2]), dx) < 1e-13
    assert rel_err(dh0_chunks, dh0) < 1e-13
    for k in full_grads:
        assert rel_err(gru.grads[k], full_grads[k]) < 1e-13, k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_batch_row_equals_the_sequence_run_alone(dtype):
    gru, x, h0, lengths, _, _ = make_problem(T=7, B=5, num_layers=2, bidirectional=True,
                                             with_lengths=True, dtype=dtype)
    out, h_n = gru.forward(x, h0, lengths=lengths)
    for b in range(5):
        L = int(lengths[b])
        o1, h1 = gru.forward(x[:L, b : b + 1], h0[:, b : b + 1])
        tol = 1e-6 if dtype == np.float32 else 1e-14
        assert rel_err(out[:L, b : b + 1], o1) < tol
        assert not out[L:, b].any()
        assert rel_err(h_n[:, b : b + 1], h1) < tol


def test_float32_agrees_with_float64():
    g64, x, h0, lengths, w_out, w_hn = make_problem(T=20, B=4, I=8, H=16, num_layers=2, dtype=np.float64)
    g32 = grumpy.GRU(8, 16, 2, dtype=np.float32)
    g32.load_state_dict(g64.state_dict())
    o64, _ = g64.forward(x, h0)
    o32, _ = g32.forward(x.astype(np.float32), h0.astype(np.float32))
    assert o32.dtype == np.float32
    assert rel_err(o32, o64) < 1e-5


@pytest.mark.parametrize("embedding_dim", [0, 5])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_step_matches_forward(embedding_dim, reset_after, dtype):
    from grumpy.lm.model import CharModel, ModelConfig

    m = CharModel(ModelConfig(vocab_size=7, hidden_size=6, num_layers=2, embedding_dim=embedding_dim,
                              reset_after=reset_after, dtype=dtype), seed=0).eval()
    idx = np.array([[3], [0], [6], [2]])
    logits, h_n = m.forward(idx)
    h = m.init_state(1)[:, 0]
    for t in range(4):
        step_logits, h = m.step(int(idx[t, 0]), h)
        assert rel_err(step_logits, logits[t, 0]) < (1e-5 if dtype == "float32" else 1e-13)
    assert rel_err(h, h_n[:, 0]) < (1e-5 if dtype == "float32" else 1e-13)


def test_writing_into_the_output_cannot_corrupt_the_backward_pass():
    gru, x, h0, _, w_out, w_hn = make_problem(T=6, B=2, I=3, H=4, dtype=np.float32)
    out, _ = gru.forward(x.astype(np.float32), h0.astype(np.float32))
    dx_ref, _ = gru.backward(w_out.astype(np.float32), w_hn.astype(np.float32))
    out, _ = gru.forward(x.astype(np.float32), h0.astype(np.float32))
    try:
        out *= 0  # either refused (a read-only view of the cache) or harmless (a copy)
    except ValueError:
        pass
    dx, _ = gru.backward(w_out.astype(np.float32), w_hn.astype(np.float32))
    np.testing.assert_array_equal(dx, dx_ref)
