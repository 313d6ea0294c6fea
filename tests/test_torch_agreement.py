"""grumpy.GRU against PyTorch: outputs, final states and every gradient.

reset_after=True is compared with torch.nn.GRU (packed sequences for lengths).
reset_after=False has no PyTorch layer, so it is compared with an explicit
time loop written in torch and differentiated by autograd; that loop is itself
checked against torch.nn.GRU in the reset_after=True case.
"""

import numpy as np
import pytest

from gru_helpers import GRID, grid_id, make_problem, rel_err, torch_errors, torch_loop_gru, torch_nn_gru

torch = pytest.importorskip("torch")

TOL = {np.float64: 1e-9, np.float32: 1e-4}


def compare(cfg, dtype, reference):
    for name, err in torch_errors(cfg, dtype, reference).items():
        assert err < TOL[dtype], name


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
