"""grumpy.RNN: gradients by finite differences, and agreement with torch.nn.RNN."""

from __future__ import annotations

import numpy as np
import pytest

from gru_helpers import numeric_grad, rel_err

import grumpy
from grumpy.rnn import rnn_sequence_backward, rnn_sequence_forward

I, H, T, B = 3, 4, 5, 3


def make_inputs(layer: grumpy.RNN, rng: np.random.Generator, lengths: bool):
    x = rng.standard_normal((B, T, I) if layer.batch_first else (T, B, I))
    h0 = rng.standard_normal((layer.num_layers * layer.num_directions, B, H)) * 0.5
    lens = np.array([T, 2, 4]) if lengths else None
    return x, h0, lens


CASES = [
    # (num_layers, bidirectional, bias, lengths, batch_first)
    (1, False, True, False, False),
    (1, False, False, True, False),
    (2, True, True, True, False),
    (3, False, True, False, True),
    (2, False, False, False, True),
    (3, True, False, True, True),
]


@pytest.mark.parametrize("num_layers,bidirectional,bias,lengths,batch_first", CASES)
def test_finite_differences(num_layers, bidirectional, bias, lengths, batch_first):
    rng = np.random.default_rng(num_layers * 10 + bidirectional)
    layer = grumpy.RNN(I, H, num_layers, bias=bias, bidirectional=bidirectional,
                       batch_first=batch_first, dtype=np.float64, seed=1)
    x, h0, lens = make_inputs(layer, rng, lengths)
    out, h_n = layer(x, h0, lengths=lens)
    w_out = rng.standard_normal(out.shape)
    w_h = rng.standard_normal(h_n.shape)

    def loss() -> float:
        o, hn = layer.forward(x, h0, lengths=lens)
        return float((o * w_out).sum() + (hn * w_h).sum())

    layer.forward(x, h0, lengths=lens)
    layer.zero_grad()
    dx, dh0 = layer.backward(w_out, w_h)

    for name, p in layer.params.items():
        assert rel_err(numeric_grad(loss, p), layer.grads[name]) <= 1e-6, name
    assert rel_err(numeric_grad(loss, x), dx) <= 1e-6
    assert rel_err(numeric_grad(loss, h0), dh0) <= 1e-6


def test_padded_steps_keep_state_and_output_zero():
    rng = np.random.default_rng(0)
    layer = grumpy.RNN(I, H, 2, bidirectional=True, dtype=np.float64, seed=0)
    x = rng.standard_normal((T, B, I))
    lens = np.array([T, 2, 4])
    out, h_n = layer(x, lengths=lens)
    for b, n in enumerate(lens):
        alone, h_alone = layer(x[:n, b : b + 1])
        np.testing.assert_allclose(out[:n, b], alone[:, 0], rtol=1e-12, atol=1e-14)
        assert np.all(out[n:, b] == 0)
        np.testing.assert_allclose(h_n[:, b], h_alone[:, 0], rtol=1e-12, atol=1e-14)


def test_kernel_reverse_is_forward_on_flipped_time():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((B, H))
    w_ih, w_hh = rng.standard_normal((H, I)), rng.standard_normal((H, H)) * 0.3
    b_ih, b_hh = rng.standard_normal(H), rng.standard_normal(H)
    out_r, h_r, c_r = rnn_sequence_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reverse=True)
    out_f, h_f, c_f = rnn_sequence_forward(x[::-1].copy(), h0, w_ih, w_hh, b_ih, b_hh)
    np.testing.assert_allclose(out_r, out_f[::-1], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(h_r, h_f, rtol=1e-13, atol=1e-15)
    d = rng.standard_normal((T, B, H))
    dx_r, dh_r, g_r = rnn_sequence_backward(d, h0, c_r, w_ih, w_hh)
    dx_f, dh_f, g_f = rnn_sequence_backward(d[::-1].copy(), h0, c_f, w_ih, w_hh)
    np.testing.assert_allclose(dx_r, dx_f[::-1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dh_r, dh_f, rtol=1e-12, atol=1e-14)
    for k in g_r:
        np.testing.assert_allclose(g_r[k], g_f[k], rtol=1e-12, atol=1e-14)


# -- torch.nn.RNN ---------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 1e-4)])
@pytest.mark.parametrize("num_layers,bidirectional,bias,lengths,batch_first", CASES)
def test_matches_torch(dtype, tol, num_layers, bidirectional, bias, lengths, batch_first):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    tdt = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(0)
    ref = torch.nn.RNN(I, H, num_layers, nonlinearity="tanh", bias=bias, batch_first=batch_first,
                       bidirectional=bidirectional).to(tdt)
    layer = grumpy.RNN(I, H, num_layers, bias=bias, bidirectional=bidirectional,
                       batch_first=batch_first, dtype=dtype)
    assert list(layer.state_dict()) == list(ref.state_dict())
    layer.load_state_dict(ref.state_dict())

    rng = np.random.default_rng(7)
    x, h0, lens = make_inputs(layer, rng, lengths)
    x, h0 = x.astype(dtype), h0.astype(dtype)
    out, h_n = layer(x, h0, lengths=lens)
    w_out = rng.standard_normal(out.shape).astype(dtype)
    w_h = rng.standard_normal(h_n.shape).astype(dtype)
    dx, dh0 = layer.backward(w_out, w_h)

    xt = torch.tensor(x, requires_grad=True)
    ht = torch.tensor(h0, requires_grad=True)
    if lens is None:
        out_t, hn_t = ref(xt, ht)
    else:
        packed = pack_padded_sequence(xt, torch.tensor(lens), batch_first=batch_first, enforce_sorted=False)
        out_p, hn_t = ref(packed, ht)
        out_t, _ = pad_packed_sequence(out_p, batch_first=batch_first, total_length=T)
    loss = (out_t * torch.tensor(w_out)).sum() + (hn_t * torch.tensor(w_h)).sum()
    loss.backward()

    assert rel_err(out, out_t.detach().numpy()) <= tol
    assert rel_err(h_n, hn_t.detach().numpy()) <= tol
    assert rel_err(dx, xt.grad.numpy()) <= tol
    assert rel_err(dh0, ht.grad.numpy()) <= tol
    for name, p in ref.named_parameters():
        assert rel_err(layer.grads[name], p.grad.numpy()) <= tol, name


def test_state_dict_round_trip_and_errors():
    layer = grumpy.RNN(I, H, 2, bidirectional=True, seed=0)
    sd = layer.state_dict()
    assert sd["weight_hh_l1_reverse"].shape == (H, H)
    assert sd["weight_ih_l1"].shape == (H, 2 * H)
    other = grumpy.RNN(I, H, 2, bidirectional=True, seed=1)
    other.load_state_dict(sd)
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    np.testing.assert_array_equal(layer(x)[0], other(x)[0])
    bad = dict(sd, weight_hh_l0=np.zeros((3 * H, H), np.float32))
    with pytest.raises(ValueError, match="weight_hh_l0"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="lengths"):
        layer(x, lengths=[T, 0, 1])
