"""forward(grad=False): the inference path keeps no cache and gives the same outputs.

Every branch is forced: the NumPy path (float64, reset_after=False), the compiled
whole-loop path, the compiled per-step inference path with its chunked
input projections (its time loop compiled with MKL's packed product, or in
Python without MKL), for one stream and for a batch, and the batch shared among
threads (input projections step by step).
"""

import numpy as np
import pytest

import grumpy.kernels as K
from grumpy import GRU, RNN
from grumpy.kernels.step import step_into
from grumpy.lm.model import CharModel, ModelConfig


def both(gru, x, h0, lengths=None):
    out, hn = gru.forward(x, h0, lengths=lengths)
    out_i, hn_i = gru.forward(x, h0, lengths=lengths, grad=False)
    return (out, hn), (out_i, hn_i)


def assert_same(want, got, dtype):
    for a, b in zip(want, got):
        assert a.shape == b.shape
        if dtype == np.float64:
            np.testing.assert_array_equal(b, a)  # the same arithmetic, step by step
        else:
            # the input projections are one product per chunk of steps instead of
            # one per sequence, which BLAS may round differently in the last bit
            np.testing.assert_allclose(b, a, rtol=2e-6, atol=2e-7)


SMALL_CHUNKS = 3 * 4 * 6 * 3 * 2  # a few steps per chunk of input projections
ROUTES = {
    "default": None,
    "loop": K.Route("loop"),
    "loop-parallel": K.Route("loop", parallel=True),
    "packed": K.Route("packed", chunk_bytes=SMALL_CHUNKS),
    "steps": K.Route("steps", chunk_bytes=SMALL_CHUNKS),
    "steps-no-mkl": K.Route("steps", chunk_bytes=SMALL_CHUNKS),  # the loop where MKL is not installed
    "steps-parallel": K.Route("steps", parallel=True, chunk_bytes=SMALL_CHUNKS),  # gate kernels on all cores
    "steps-panels": K.Route("steps", panels=True, chunk_bytes=SMALL_CHUNKS),  # products on packed weights
    "shared": K.Route("shared", shares=((0, 1), (1, 3))),  # the batch's rows shared among threads, unevenly
    "shared-pool": K.Route("shared", panels=True, chunk_bytes=SMALL_CHUNKS),  # shares on NumPy's BLAS threads
    "step": K.Route("step"),  # the generation step at every step
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("branch", list(ROUTES))
def test_inference_matches_training_forward(monkeypatch, dtype, reset_after, bidirectional, masked, branch):
    from grumpy.kernels import blas as _blas

    route = ROUTES[branch] if K.use_compiled(dtype, reset_after) else None  # else the NumPy route only
    if route is not None and route.kind == "packed" and _blas.MKL is None:
        pytest.skip("the route needs MKL")
    if branch == "shared-pool":
        _pool_shares_or_skip()
    if branch == "steps-no-mkl":
        monkeypatch.setattr(_blas, "MKL", None)
    rng = np.random.default_rng(0)
    T, B, I, H = 11, 3, 5, 6
    gru = GRU(I, H, num_layers=2, bidirectional=bidirectional, reset_after=reset_after, dtype=dtype, seed=1)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((2 * (1 + bidirectional), B, H)).astype(dtype)
    lengths = np.array([T, 4, 1]) if masked else None
    gru.route = None if route is not None and route.kind in ("shared", "step") else route  # inference-only routes
    want = gru.forward(x, h0, lengths=lengths)
    gru.route = route
    got = gru.forward(x, h0, lengths=lengths, grad=False)
    assert_same(want, got, dtype)


def _pool_shares_or_skip():
    from grumpy.kernels import blas
    from grumpy.kernels.route import panels_ok

    if not (blas.POOL and panels_ok()):
        pytest.skip("needs NumPy's BLAS to lend its threads and the panel kernels (AVX-512)")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_shared_route_on_the_pool_matches_the_reference(threads, reverse, masked):
    """The shared route on NumPy's BLAS threads (grumpy.kernels.pool.shared_steps): blocks
    of rows (10 and 6 of them at B = 20, not multiples of the kernel's four) through runs
    of 3 steps, against the NumPy route in float32 and the reference cell in float64."""
    from threadpoolctl import threadpool_limits

    from grumpy.cell import gru_cell_forward

    _pool_shares_or_skip()
    rng = np.random.default_rng(threads)
    T, B, I, H = 10, 20, 5, 24
    f = np.float32
    x = rng.standard_normal((T, B, I)).astype(f)
    h0 = rng.standard_normal((B, H)).astype(f)
    w = [(rng.standard_normal(s) / np.sqrt(s[-1])).astype(f) for s in ((3 * H, I), (3 * H, H))]
    b = [rng.standard_normal(3 * H).astype(f) for _ in range(2)]
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[:, None] < lengths[None]).astype(f)[..., None] if masked else None
    route = K.Route("shared", panels=True, chunk_bytes=3 * B * 3 * H * 4)
    with threadpool_limits(threads, user_api="blas"):
        out, h_last, cache = K.gru_sequence_forward(x, h0, *w, *b, reverse=reverse, mask=mask, keep_cache=False,
                                                    route=route)
    assert cache is None
    want_out, want_h, _ = K.gru_sequence_forward(x, h0, *w, *b, reverse=reverse, mask=mask, route=K.Route("numpy"))
    np.testing.assert_allclose(out, want_out, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(h_last, want_h, rtol=2e-6, atol=2e-6)
    h = h0.astype(np.float64)  # and the reference cell, step by step, in float64
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h_new, _ = gru_cell_forward(x[t].astype(np.float64), h, *(a.astype(np.float64) for a in w + b))
        h = h + (mask[t] * (h_new - h) if masked else h_new - h)
    np.testing.assert_allclose(h_last, h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B", [1, 4])
def test_compiled_inference_branch_at_size(B):
    """Large enough that the per-step compiled inference path runs without patching."""
    pytest.importorskip("numba")
    H = 512 if B == 1 else 256
    assert B * H * 3 * H > K.route.LOOP_MAX_MACS
    rng = np.random.default_rng(1)
    gru = GRU(7, H, dtype=np.float32, seed=2)
    x = rng.standard_normal((5, B, 7)).astype(np.float32)
    want, got = both(gru, x, None)
    assert_same(want, got, np.float32)


def test_inference_output_is_writable_and_backward_refuses():
    gru = GRU(3, 4, seed=0)
    out, _ = gru.forward(np.ones((2, 1, 3), np.float32), grad=False)
    out[...] = 0  # owned by the caller: no cache to corrupt
    with pytest.raises(RuntimeError, match="grad=False"):
        gru.backward(np.ones((2, 1, 4), np.float32))
    # a training forward afterwards makes backward work again
    gru.forward(np.ones((2, 1, 3), np.float32))
    gru.backward(np.ones((2, 1, 4), np.float32))


def test_rnn_inference_matches():
    rng = np.random.default_rng(2)
    rnn = RNN(3, 5, num_layers=2, dtype=np.float64, seed=0)
    x = rng.standard_normal((6, 2, 3))
    want, got = both(rnn, x, None)
    assert_same(want, got, np.float64)
    with pytest.raises(RuntimeError, match="grad=False"):
        rnn.backward(np.ones((6, 2, 5)))


def test_char_model_inference():
    model = CharModel(ModelConfig(vocab_size=9, hidden_size=8, num_layers=2, embedding_dim=4), seed=0)
    idx = np.random.default_rng(3).integers(0, 9, (7, 2))
    logits, hn = model.forward(idx)
    logits_i, hn_i = model.forward(idx, grad=False)
    assert_same((logits, hn), (logits_i, hn_i), np.float32)
    with pytest.raises(RuntimeError, match="grad=False"):
        model.backward(np.ones_like(logits))


@pytest.mark.parametrize("embedding_dim", [0, 5])
def test_char_model_stepper_matches_step(embedding_dim):
    model = CharModel(ModelConfig(vocab_size=9, hidden_size=8, num_layers=2, embedding_dim=embedding_dim), seed=1)
    step = model.stepper()
    h1 = h2 = model.init_state(1)[:, 0]
    for i in [3, 0, 8, 3]:
        l1, h1 = model.step(i, h1)
        l2, h2 = step(i, h2)
        np.testing.assert_allclose(l2, l1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nll_equals_cross_entropy_and_is_stable(dtype):
    from grumpy.lm.model import cross_entropy, nll

    rng = np.random.default_rng(4)
    logits = (5 * rng.standard_normal((7, 3, 11))).astype(dtype)
    y = rng.integers(0, 11, (7, 3))
    logits[1] += 1e3  # rows far from zero: the log-sum-exp must shift them
    want, d = cross_entropy(logits, y)
    # against float64 arithmetic written out: loss and gradient
    z = logits.reshape(21, 11).astype(np.float64)
    lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
    assert want == pytest.approx((lse - z[np.arange(21), y.reshape(-1)]).mean(), rel=1e-6 if dtype == np.float32 else 1e-13)
    p = np.exp(z - lse[:, None])
    p[np.arange(21), y.reshape(-1)] -= 1
    np.testing.assert_allclose(d.reshape(21, 11), p / 21, rtol=0, atol=1e-8 if dtype == np.float32 else 1e-13)
    assert nll(logits, y) == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-13)
    assert nll(logits, y, reduction="sum") == pytest.approx(21 * want, rel=1e-6 if dtype == np.float32 else 1e-13)
    huge = np.array([[1e30, -1e30, 0.0]], dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is the point
        assert nll(huge, np.array([0])) == 0.0
        assert nll(huge, np.array([2])) == pytest.approx(1e30, rel=1e-6)
    for j in (0, 5):  # a NaN anywhere in a row (first or later) makes the loss NaN, never a number
        bad = logits.copy()
        bad[2, 1, j] = np.nan
        assert np.isnan(nll(bad, y))
    with pytest.raises(ValueError, match="reduction"):
        nll(logits, y, reduction="none")


@pytest.mark.parametrize("H", [8, 600])  # the compiled step below STEP_BLAS_MIN, BLAS's products above
@pytest.mark.parametrize("bidirectional,bias", [(False, True), (True, False)])
def test_one_step_of_one_stream_takes_the_step_route_and_agrees(H, bidirectional, bias):
    """A user's generation loop, ``forward`` on (1, 1, I) without gradients, takes the
    generation step (no loop set-up); its result equals the training forward's."""
    if not K.use_compiled(np.float32, True):
        pytest.skip("numba not available")
    assert K.choose(np.float32, True, 1, H, grad=False, T=1).kind == "step"
    assert K.choose(np.float32, True, 1, H, grad=True, T=1).kind != "step"
    assert K.choose(np.float32, True, 1, H, grad=False, T=2).kind != "step"
    rng = np.random.default_rng(3)
    gru = GRU(5, H, num_layers=2, bidirectional=bidirectional, bias=bias, seed=2)
    assert gru._step_kernel() is step_into  # forward below takes the one-step stack
    assert GRU(5, H, route="loop")._step_kernel() is None  # a named route is kept
    assert GRU(5, H, dtype=np.float64)._step_kernel() is None
    D = 2 if bidirectional else 1
    x = rng.standard_normal((1, 1, 5)).astype(np.float32)
    h0 = rng.standard_normal((2 * D, 1, H)).astype(np.float32)
    h0_before = h0.copy()
    want = gru.forward(x, h0)
    got = gru.forward(x, h0, grad=False)
    assert_same(want, got, np.float32)
    out, h_n = got
    assert out.shape == (1, 1, D * H) and h_n.shape == (2 * D, 1, H)
    assert not np.shares_memory(out, h_n) and np.array_equal(h0, h0_before)
    with pytest.raises(RuntimeError, match="grad=False"):
        gru.backward(np.ones_like(out))
    # in training mode with dropout between layers the masks are drawn: the sequence path
    gru.dropout = 0.5
    a = gru.forward(x, h0, grad=False)[0]
    gru.eval()
    np.testing.assert_array_equal(gru.forward(x, h0, grad=False)[0], out)
    assert not np.array_equal(a, out)
