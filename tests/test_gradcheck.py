"""Finite-difference checks of every gradient, in float64."""

import numpy as np
import pytest

from gru_helpers import GRID, grid_id, loss_of, make_problem, numeric_grad, rel_err

from grumpy.layers import gru_backward, gru_forward

TOL = 1e-6


@pytest.mark.parametrize("cfg", GRID, ids=grid_id)
def test_every_gradient_matches_finite_differences(cfg):
    gru, x, h0, lengths, w_out, w_hn = make_problem(**cfg, seed=len(grid_id(cfg)))
    gru.forward(x, h0, lengths=lengths)
    dx, dh0 = gru.backward(w_out, w_hn)

    def f():
        return loss_of(gru, x, h0, lengths, w_out, w_hn)

    assert rel_err(dx, numeric_grad(f, x)) < TOL
    assert rel_err(dh0, numeric_grad(f, h0)) < TOL
    for name, p in gru.params.items():
        assert rel_err(gru.grads[name], numeric_grad(f, p)) < TOL, name


@pytest.mark.parametrize("reset_after", [True, False])
def test_gradients_with_dropout_between_layers(reset_after):
    # Dropout masks are fixed inputs of the pure function, so differences are well defined.
    gru, x, h0, _, w_out, w_hn = make_problem(num_layers=3, bidirectional=True, reset_after=reset_after)
    rng = np.random.default_rng(1)
    T, B, _ = x.shape
    masks = [None] + [(rng.random((T, B, 4)) < 0.6) / 0.6 for _ in range(2)]
    kw = dict(num_layers=3, bidirectional=True, reset_after=reset_after, dropout_masks=masks)

    def f():
        out, h_n, _ = gru_forward(gru.params, x, h0, **kw)
        return float((out * w_out).sum() + (h_n * w_hn).sum())

    _, _, cache = gru_forward(gru.params, x, h0, **kw)
    dx, dh0, grads = gru_backward(gru.params, cache, w_out, w_hn)
    assert rel_err(dx, numeric_grad(f, x)) < TOL
    assert rel_err(dh0, numeric_grad(f, h0)) < TOL
    for name, p in gru.params.items():
        assert rel_err(grads[name], numeric_grad(f, p)) < TOL, name


@pytest.mark.parametrize("reset_after", [True, False])
def test_weight_drop_gradients_match_finite_differences(reset_after):
    # The masks come from the layer's generator: restoring its state before each forward
    # gives the same masks, so the training forward is a fixed function of the stored weights.
    gru, x, h0, _, w_out, w_hn = make_problem(num_layers=2, bidirectional=True, H=3, reset_after=reset_after)
    gru.weight_drop = 0.4
    state = gru.rng.bit_generator.state

    def f():
        gru.rng.bit_generator.state = state
        out, h_n = gru.forward(x, h0, grad=False)
        return float((out * w_out).sum() + (h_n * w_hn).sum())

    gru.rng.bit_generator.state = state
    gru.forward(x, h0)
    dx, dh0 = gru.backward(w_out, w_hn)
    assert rel_err(dx, numeric_grad(f, x)) < TOL
    assert rel_err(dh0, numeric_grad(f, h0)) < TOL
    for name, p in gru.params.items():
        assert rel_err(gru.grads[name], numeric_grad(f, p)) < TOL, name
    # some recurrent weights were dropped: their gradient is exactly zero, the others' is not
    g = gru.grads["weight_hh_l0"]
    assert (g == 0).any() and (g != 0).any()


def test_gradients_accumulate_until_zero_grad():
    gru, x, h0, lengths, w_out, w_hn = make_problem()
    gru.forward(x, h0)
    gru.backward(w_out, w_hn)
    once = {k: v.copy() for k, v in gru.grads.items()}
    gru.forward(x, h0)
    gru.backward(w_out, w_hn)
    for k in once:
        np.testing.assert_allclose(gru.grads[k], 2 * once[k], rtol=1e-12)
    gru.zero_grad()
    assert all(not g.any() for g in gru.grads.values())
