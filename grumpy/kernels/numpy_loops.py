"""The ``numpy`` route: the time loop in NumPy, for any dtype and both gate forms.

The arithmetic of :mod:`grumpy.cell`, arranged for speed: the input projections
of all T steps are one product before the loop; each step does one recurrent
product (two for reset_after=False, where the reset gate acts before the
product) and the gate math in place, in buffers allocated once per call; the
backward pass does one product per step for the state gradient and gets the
weight gradients as single products over all steps at the end.
"""

from __future__ import annotations

import numpy as np

from grumpy._util import sigmoid
from grumpy.kernels.blas import column_sums, matmul
from grumpy.kernels.common import SeqCache, new_states, state_views, time_steps
from grumpy.kernels.route import Route


def forward(
    x: np.ndarray, h0: np.ndarray, weight_ih: np.ndarray, weight_hh: np.ndarray, bias_ih: np.ndarray | None,
    bias_hh: np.ndarray | None, reset_after: bool, reverse: bool, mask: np.ndarray | None, keep_cache: bool,
) -> tuple[np.ndarray, np.ndarray, SeqCache | None]:
    """See :func:`grumpy.kernels.gru_sequence_forward`."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    dt = x.dtype
    gi = matmul(x.reshape(T * B, -1), weight_ih.T).reshape(T, B, 3 * H)
    if bias_ih is not None:
        gi += bias_ih
    if not reset_after and bias_hh is not None:
        gi[..., 2 * H :] += bias_hh[2 * H :]  # b_hn sits outside the product: fold it in once
    whh_t = np.ascontiguousarray(weight_hh.T)  # products on a transposed view run slower
    w_rz_t, w_n_t = whh_t[:, : 2 * H], np.ascontiguousarray(whh_t[:, 2 * H :])
    b_rz = bias_hh[: 2 * H] if bias_hh is not None else None

    hs = new_states(h0, T, reverse)
    h_in, h_out = state_views(hs, reverse)
    Tc = T if keep_cache else 1  # without a cache, one step's gates are all we need
    gates = np.empty((Tc, B, 3 * H), dt)
    hn_all = np.empty((Tc if reset_after else 0, B, H), dt)  # W_hn h + b_hn, reset_after only
    gh = np.empty((B, 3 * H), dt)
    tmp = np.empty((B, H), dt)

    for t in time_steps(T, reverse):
        h_prev, h_new = h_in[t], h_out[t]
        tc = t if keep_cache else 0
        g = gates[tc]
        r, z, n = g[:, :H], g[:, H : 2 * H], g[:, 2 * H :]
        if reset_after:
            matmul(h_prev, whh_t, gh)
            if bias_hh is not None:
                gh += bias_hh
            np.add(gi[t, :, : 2 * H], gh[:, : 2 * H], out=g[:, : 2 * H])
            sigmoid(g[:, : 2 * H], out=g[:, : 2 * H])
            hn_all[tc] = gh[:, 2 * H :]
            np.multiply(r, hn_all[tc], out=n)
        else:
            matmul(h_prev, w_rz_t, gh[:, : 2 * H])
            if b_rz is not None:
                gh[:, : 2 * H] += b_rz
            np.add(gi[t, :, : 2 * H], gh[:, : 2 * H], out=g[:, : 2 * H])
            sigmoid(g[:, : 2 * H], out=g[:, : 2 * H])
            np.multiply(r, h_prev, out=tmp)
            matmul(tmp, w_n_t, n)
        n += gi[t, :, 2 * H :]
        np.tanh(n, out=n)
        # h' = (1 − z) n + z h, written n + z (h − n): one product fewer
        np.subtract(h_prev, n, out=tmp)
        tmp *= z
        np.add(n, tmp, out=h_new)
        if mask is not None:
            # padded steps keep the previous state: h' = h + m (h' − h)
            np.subtract(h_new, h_prev, out=tmp)
            tmp *= mask[t]
            np.add(h_prev, tmp, out=h_new)

    if mask is not None:
        output = h_out * mask
    else:
        output = h_out.copy() if keep_cache else h_out  # nothing else refers to hs then
    h_last = hs[0 if reverse else T].copy()
    if not keep_cache:
        return output, h_last, None
    return output, h_last, SeqCache(x, hs, gates, hn_all if reset_after else None, mask, reverse, reset_after,
                                    Route("numpy"))


def backward(
    d_output: np.ndarray, d_h_last: np.ndarray | None, cache: SeqCache, weight_ih: np.ndarray,
    weight_hh: np.ndarray, bias: bool, need_dx: bool,
) -> tuple[np.ndarray | None, np.ndarray, dict[str, np.ndarray]]:
    """See :func:`grumpy.kernels.gru_sequence_backward`."""
    x, hs, gates, hn_all, mask, reverse, reset_after, _ = cache
    T, B, _ = x.shape
    H = hs.shape[-1]
    dt = x.dtype
    hn = hn_all if hn_all is not None else np.empty((0, B, H), dt)  # W_hn h + b_hn, reset_after only
    h_in, _ = state_views(hs, reverse)
    # dG: gradients of the gate pre-activations on the input side [a_r, a_z, a_n];
    # for reset_after the hidden side differs in its n part, r ⊙ da_n, kept in d_hn.
    dG = np.empty((T, B, 3 * H), dt)
    d_hn = np.empty((T if reset_after else 0, B, H), dt)
    w_hn = weight_hh[2 * H :]
    w_rz = weight_hh[: 2 * H]
    gbuf = np.empty((B, 3 * H), dt)  # the hidden-side gradient of one step
    dh = np.zeros((B, H), dt) if d_h_last is None else np.array(d_h_last, dt)
    dm = np.empty((B, H), dt)
    tmp = np.empty((B, H), dt)

    for t in time_steps(T, reverse, backward=True):
        g = gates[t]
        r, z, n = g[:, :H], g[:, H : 2 * H], g[:, 2 * H :]
        h_prev = h_in[t]
        d_out = d_output[t]
        # dm: the part of dL/dh' that flows through the cell; what stays in dh from here
        # on is dL/dh_prev, starting with the direct path through z ⊙ h in h' = (1 − z) n + z h.
        if mask is not None:
            dh += d_out * mask[t]
            np.multiply(dh, mask[t], out=dm)
            dh -= dm  # the part that skips a padded step
            np.multiply(dm, z, out=tmp)
            dh += tmp
        else:
            np.add(dh, d_out, out=dm)
            np.multiply(dm, z, out=dh)
        da_r, da_z, da_n = dG[t, :, :H], dG[t, :, H : 2 * H], dG[t, :, 2 * H :]
        # da_z = dm (h − n) z (1 − z)
        np.subtract(h_prev, n, out=da_z)
        da_z *= dm
        np.subtract(1.0, z, out=tmp)
        tmp *= z
        da_z *= tmp
        # da_n = dm (1 − z) (1 − n²)
        np.subtract(1.0, z, out=da_n)
        da_n *= dm
        np.multiply(n, n, out=tmp)
        np.subtract(1.0, tmp, out=tmp)
        da_n *= tmp
        if reset_after:
            # a_n = gi_n + r ⊙ hn: dr = da_n ⊙ hn, d(hn) = da_n ⊙ r
            np.multiply(da_n, hn[t], out=da_r)
            np.multiply(da_n, r, out=d_hn[t])
        else:
            # a_n = gi_n + W_hn (r ⊙ h): d(r ⊙ h) = da_n W_hn
            d_rh = matmul(da_n, w_hn)
            np.multiply(d_rh, h_prev, out=da_r)
            d_rh *= r
            dh += d_rh
        # da_r = dr r (1 − r)
        np.subtract(1.0, r, out=tmp)
        tmp *= r
        da_r *= tmp
        if reset_after:
            gbuf[:, : 2 * H] = dG[t, :, : 2 * H]
            gbuf[:, 2 * H :] = d_hn[t]
            matmul(gbuf, weight_hh, dh, beta=1.0)
        else:
            matmul(dG[t, :, : 2 * H], w_rz, dh, beta=1.0)

    dG2 = dG.reshape(T * B, 3 * H)
    x2 = x.reshape(T * B, -1)
    h2 = h_in.reshape(T * B, H)
    dx = matmul(dG2, weight_ih).reshape(x.shape) if need_dx else None
    grads = {"weight_ih": matmul(dG2.T, x2)}
    if reset_after:
        dhn2 = d_hn.reshape(T * B, H)
        grads["weight_hh"] = np.concatenate([matmul(dG2[:, : 2 * H].T, h2), matmul(dhn2.T, h2)])
    else:
        rh = (gates[..., :H] * h_in).reshape(T * B, H)
        grads["weight_hh"] = np.concatenate([matmul(dG2[:, : 2 * H].T, h2), matmul(dG2[:, 2 * H :].T, rh)])
    if bias:
        db = column_sums(dG2)
        grads["bias_ih"] = db
        if reset_after:
            grads["bias_hh"] = np.concatenate([db[: 2 * H], column_sums(d_hn.reshape(T * B, H))])
        else:
            grads["bias_hh"] = db.copy()
    return dx, dh, grads
