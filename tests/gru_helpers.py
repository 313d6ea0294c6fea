"""Shared pieces of the GRU tests (and of benchmarks/accuracy.py): random problems, a scalar
loss, error measures, and PyTorch references (torch imported only inside them)."""

from __future__ import annotations

import numpy as np

import grumpy


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b|: a tensor-wise relative error that is stable near zeros."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def numeric_grad(f, a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of scalar f() w.r.t. every entry of a (perturbed in place, then restored)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        fp = f()
        a[i] = old - eps
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def make_problem(
    *, T=4, B=3, I=3, H=2, num_layers=1, bidirectional=False, bias=True, reset_after=True,
    batch_first=False, with_lengths=False, dtype=np.float64, seed=0,
):
    """A GRU and random x, h0, lengths and loss weights (w_out, w_hn) for L = Σ out·w_out + Σ h_n·w_hn."""
    rng = np.random.default_rng(seed)
    gru = grumpy.GRU(I, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                     reset_after=reset_after, dtype=dtype, seed=seed)
    D = 2 if bidirectional else 1
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    h0 = rng.standard_normal((num_layers * D, B, H)).astype(dtype) * 0.5
    lengths = rng.integers(1, T + 1, size=B) if with_lengths else None
    if with_lengths:
        lengths[0] = T  # the longest sequence spans the whole window, as with packing
    out_shape = (B, T, D * H) if batch_first else (T, B, D * H)
    w_out = rng.standard_normal(out_shape).astype(dtype)
    w_hn = rng.standard_normal(h0.shape).astype(dtype)
    return gru, x, h0, lengths, w_out, w_hn


def loss_of(gru, x, h0, lengths, w_out, w_hn) -> float:
    out, h_n = gru.forward(x, h0, lengths=lengths)
    return float((out * w_out).sum() + (h_n * w_hn).sum())


# The option grid both the finite-difference and the PyTorch tests run over.
GRID = [
    dict(reset_after=ra, bias=bias, num_layers=L, bidirectional=bi, with_lengths=ln, batch_first=bf)
    for ra in (True, False)
    for bias in (True, False)
    for L in (1, 2, 3)
    for bi in (False, True)
    for ln, bf in ((False, False), (True, False), (True, True))
    if not (L == 3 and not bias)  # three layers add nothing new once bias=False is covered at 1-2
]


def grid_id(c: dict) -> str:
    return "-".join([
        "after" if c["reset_after"] else "before", "bias" if c["bias"] else "nobias", f"L{c['num_layers']}",
        "bi" if c["bidirectional"] else "uni", "len" if c["with_lengths"] else "full",
        "bf" if c["batch_first"] else "tm",
    ])


# -- PyTorch references --------------------------------------------------------

def torch_loop_gru(params, x, h0, lengths, *, num_layers, bidirectional, reset_after):
    """The GRU equations step by step in torch: x (T, B, I), h0 (L*D, B, H)."""
    import torch

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
    import torch

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


def torch_errors(cfg: dict, dtype, reference: str) -> dict[str, float]:
    """rel_err of grumpy's output, h_n and every gradient against PyTorch's on the
    problem ``cfg`` of GRID: reference "nn.GRU" (torch.nn.GRU, packed sequences for
    lengths) or "loop" (torch_loop_gru differentiated by autograd)."""
    import torch

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
    tdx = xt.grad.numpy()
    assert set(gru.grads) == set(tparams)
    errs = {
        "output": rel_err(out, o.transpose(1, 0, 2) if bf else o),
        "h_n": rel_err(h_n, hn.detach().numpy()),
        "dx": rel_err(dx, tdx.transpose(1, 0, 2) if bf else tdx),
        "dh0": rel_err(dh0, ht.grad.numpy()),
    }
    errs.update({k: rel_err(gru.grads[k], p.grad.numpy()) for k, p in tparams.items()})
    return errs
