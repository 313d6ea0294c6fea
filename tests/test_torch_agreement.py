"""grumpy.GRU against PyTorch: outputs, final states and every gradient.

reset_after=True is compared with torch.nn.GRU (packed sequences for lengths).
reset_after=False has no PyTorch layer, so it is compared with an explicit
time loop written in torch and differentiated by autograd; that loop is itself
checked against torch.nn.GRU in the reset_after=True case.
"""

import numpy as np
import pytest

from gru_helpers import GRID, grid_id, make_problem, rel_err

torch = pytest.importorskip("torch")

TOL = {np.float64: 1e-9, np.float32: 1e-4}


def torch_loop_gru(params, x, h0, lengths, *, num_layers, bidirectional, reset_after):
    """The GRU equations step by step in torch: x (T, B, I), h0 (L*D, B, H)."""
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    mask = None
    if lengths is not None:
        mask = (torch.arange(T)[:, None] < torch.as_tensor(lengths)[None, :]).to(x.dtype)[..., None]
    inp, h_n = x, []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            W_ir, W_iz, W_in = params["weight_ih" + sfx].chunk(3)
            W_hr, W_hz, W_hn = params["weight_hh" + sfx].chunk(3)
            zero = torch.zeros(W_ir.shape[0], dtype=x.dtype)
            b_ir, b_iz, b_in = params["bias_ih" + sfx].chunk(3) if "bias_ih" + sfx in params else (zero,) * 3
            b_hr, b_hz, b_hn = params["bias_hh" + sfx].chunk(3) if "bias_hh" + sfx in params else (zero,) * 3
            h = h0[layer * D + d]
            out = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                xt = inp[t]
                r = torch.sigmoid(xt @ W_ir.T + b_ir + h @ W_hr.T + b_hr)
                z = torch.sigmoid(xt @ W_iz.T + b_iz + h @ W_hz.T + b_hz)
                if reset_after:
                    n = torch.tanh(xt @ W_in.T + b_in + r * (h @ W_hn.T + b_hn))
                else:
                    n = torch.tanh(xt @ W_in.T + b_in + (r * h) @ W_hn.T + b_hn)
                h_new = (1 - z) * n + z * h
                if mask is not None:
                    h_new = mask[t] * h_new + (1 - mask[t]) * h
                    out[t] = mask[t] * h_new
                else:
                    out[t] = h_new
                h = h_new
            outs.append(torch.stack(out))
            h_n.append(h)
        inp = torch.cat(outs, -1)
    return inp, torch.stack(h_n)


def torch_nn_gru(params, x, h0, lengths, *, num_layers, bidirectional, bias):
    I, H = x.shape[-1], h0.shape[-1]
    m = torch.nn.GRU(I, H, num_layers, bias=bias, bidirectional=bidirectional).to(x.dtype)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    if lengths is None:
        out, h_n = m(x, h0)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.as_tensor(lengths), enforce_sorted=False)
        out, h_n = m(packed, h0)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=x.shape[0])
    return out, h_n, dict(m.named_parameters())


def compare(cfg, dtype, reference):
    gru, x, h0, lengths, w_out, w_hn = make_problem(**cfg, T=5, B=4, I=3, H=4, dtype=dtype, seed=7)
    out, h_n = gru.forward(x, h0, lengths=lengths)
    dx, dh0 = gru.backward(w_out, w_hn)

    bf = cfg["batch_first"]
    xt = torch.tensor(x.transpose(1, 0, 2) if bf else x, requires_grad=True)
    ht = torch.tensor(h0, requires_grad=True)
    kw = dict(num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"])
    if reference == "nn.GRU":
        o, hn, tparams = torch_nn_gru(gru.state_dict(), xt, ht, lengths, bias=cfg["bias"], **kw)
    else:
        tparams = {k: torch.tensor(v, requires_grad=True) for k, v in gru.state_dict().items()}
        o, hn = torch_loop_gru(tparams, xt, ht, lengths, reset_after=cfg["reset_after"], **kw)
    wo = torch.tensor(w_out.transpose(1, 0, 2) if bf else w_out)
    ((o * wo).sum() + (hn * torch.tensor(w_hn)).sum()).backward()

    o = o.detach().numpy()
    tol = TOL[dtype]
    assert rel_err(out, o.transpose(1, 0, 2) if bf else o) < tol
    assert rel_err(h_n, hn.detach().numpy()) < tol
    tdx = xt.grad.numpy()
    assert rel_err(dx, tdx.transpose(1, 0, 2) if bf else tdx) < tol
    assert rel_err(dh0, ht.grad.numpy()) < tol
    assert set(gru.grads) == set(tparams)
    for k, p in tparams.items():
        assert rel_err(gru.grads[k], p.grad.numpy()) < tol, k


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", GRID, ids=grid_id)
def test_matches_torch(cfg, dtype):
    compare(cfg, dtype, "nn.GRU" if cfg["reset_after"] else "loop")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_loop_matches_nn_gru(bidirectional):
    # The oracle for reset_after=False is trusted because it agrees with nn.GRU here.
    rng = np.random.default_rng(3)
    m = torch.nn.GRU(3, 4, 2, bidirectional=bidirectional).double()
    x = torch.tensor(rng.standard_normal((6, 2, 3)))
    h0 = torch.tensor(rng.standard_normal((4 if bidirectional else 2, 2, 4)))
    lengths = np.array([6, 3])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.as_tensor(lengths), enforce_sorted=False)
    o_ref, h_ref = m(packed, h0)
    o_ref, _ = torch.nn.utils.rnn.pad_packed_sequence(o_ref, total_length=6)
    o, h = torch_loop_gru(dict(m.named_parameters()), x, h0, lengths, num_layers=2,
                          bidirectional=bidirectional, reset_after=True)
    assert rel_err(o.detach().numpy(), o_ref.detach().numpy()) < 1e-12
    assert rel_err(h.detach().numpy(), h_ref.detach().numpy()) < 1e-12


def test_state_dict_loads_into_torch_and_back():
    import grumpy

    g = grumpy.GRU(5, 3, 2, bidirectional=True, seed=1)
    m = torch.nn.GRU(5, 3, 2, bidirectional=True)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in g.state_dict().items()})
    assert list(m.state_dict()) == list(g.state_dict())
    g2 = grumpy.GRU(5, 3, 2, bidirectional=True, seed=2)
    g2.load_state_dict(m.state_dict())  # tensors are accepted as they are
    for k, v in g.state_dict().items():
        assert np.array_equal(g2.params[k], v)


def test_cell_matches_torch_gru_cell():
    import grumpy

    cell = grumpy.GRUCell(3, 4, dtype=np.float64, seed=0)
    tc = torch.nn.GRUCell(3, 4).double()
    tc.load_state_dict({k: torch.from_numpy(v) for k, v in cell.params.items()})
    rng = np.random.default_rng(0)
    x, h, d = rng.standard_normal((2, 3)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    xt, ht = torch.tensor(x, requires_grad=True), torch.tensor(h, requires_grad=True)
    out = tc(xt, ht)
    (out * torch.tensor(d)).sum().backward()
    assert rel_err(cell.forward(x, h), out.detach().numpy()) < 1e-12
    dx, dh = cell.backward(d)
    assert rel_err(dx, xt.grad.numpy()) < 1e-12 and rel_err(dh, ht.grad.numpy()) < 1e-12
    for k, p in tc.named_parameters():
        assert rel_err(cell.grads[k], p.grad.numpy()) < 1e-12, k
