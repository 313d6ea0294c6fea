"""grumpy.quantized: int8 and bfloat16 inference copies.

What is checked: the number formats (bfloat16 rounding against torch's); the quantized
forward against a plain float64 reference of the defined arithmetic and near float32;
that every path (compiled one-stream step, compiled batch, MKL, pure NumPy) computes
the same quantized arithmetic (int8 products bit for bit, outputs identical between
the compiled paths and to float32 rounding against NumPy's tanh); lengths, streaming
and the character model."""

import importlib

import numpy as np
import pytest

import grumpy
from grumpy import GRU
from grumpy.lm.model import CharModel, ModelConfig

# the module grumpy.quantized (grumpy.quantize is its function)
Q = importlib.import_module("grumpy.quantized")

PRECISIONS = ["int8", "bfloat16"]
# Distance from the float32 GRU: weights and activations rounded to 8 bits (bfloat16
# keeps 8 significant bits, int8 about 7 relative to the row's largest value).
NEAR = {"int8": 0.03, "bfloat16": 0.02}


def make(num_layers=1, reset_after=True, bias=True, bidirectional=False, batch_first=False, I=6, H=10, seed=0):
    g = GRU(I, H, num_layers, reset_after=reset_after, bias=bias, bidirectional=bidirectional,
            batch_first=batch_first, seed=seed).eval()
    rng = np.random.default_rng(seed)
    g.load_state_dict({k: rng.uniform(-0.9, 0.9, v.shape) for k, v in g.params.items()})
    return g


@pytest.fixture
def backend(monkeypatch):
    def use(name):
        monkeypatch.setattr(Q, "_BACKEND", name)
    return use


# -- number formats -----------------------------------------------------------------


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-8, 8, 5000),
                        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -1e-40]]).astype(np.float32)
    want = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(Q.bf16_bits(a), want)
    back = Q.bf16_values(Q.bf16_bits(a))
    np.testing.assert_array_equal(back, torch.from_numpy(a).to(torch.bfloat16).float().numpy())


def test_int8_weights_per_row():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 40)).astype(np.float32) * np.array([1e-3, 1, 10, 0, 1], np.float32)[:, None]
    q, s = Q.quantize_int8(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and np.abs(q).max() <= 127
    assert (np.abs(q).max(axis=1)[[0, 1, 2, 4]] == 127).all()  # each row uses the full range
    assert s[3] == 0 and not q[3].any()
    assert (np.abs(q * s[:, None] - w) <= s[:, None] / 2 * (1 + 1e-6)).all()


def test_int8_weights_are_a_quarter_of_float32():
    g = make(2, H=64, I=64)
    f32 = sum(v.nbytes for v in g.params.values())
    assert grumpy.quantize(g, "int8").nbytes < 0.3 * f32
    assert grumpy.quantize(g, "bfloat16").nbytes < 0.55 * f32


# -- the arithmetic -------------------------------------------------------------------


def reference(g, x, h0, precision):
    """The defined arithmetic in float64, step by step (reset_after=True, one layer)."""
    p = g.params

    def prod(a, w):
        if precision == "int8":
            q, s = Q.quantize_int8(w)
            m = np.abs(a).max(axis=1).astype(np.float32)
            aq = np.rint(a * (np.float32(127) / m)[:, None])
            return (aq.astype(np.float64) @ q.T.astype(np.float64)) * (m / np.float32(127))[:, None] * s[None, :]
        return Q.bf16_values(Q.bf16_bits(a)).astype(np.float64) @ Q.bf16_values(Q.bf16_bits(w)).T.astype(np.float64)

    H = g.hidden_size
    h = h0[0].astype(np.float64)
    outs = []
    for t in range(x.shape[0]):
        gi = prod(x[t], p["weight_ih_l0"]) + p["bias_ih_l0"]
        gh = prod(h.astype(np.float32), p["weight_hh_l0"]) + p["bias_hh_l0"]
        r = 1 / (1 + np.exp(-(gi[:, :H] + gh[:, :H])))
        z = 1 / (1 + np.exp(-(gi[:, H : 2 * H] + gh[:, H : 2 * H])))
        n = np.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
        h = (1 - z) * n + z * h
        outs.append(h)
    return np.stack(outs)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B", [1, 3])
def test_forward_is_the_defined_arithmetic(precision, B):
    g = make()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((15, B, 6)).astype(np.float32)
    h0 = rng.standard_normal((1, B, 10)).astype(np.float32) * 0.5
    y, _ = grumpy.quantize(g, precision).forward(x, h0)
    # float32 against float64: a rounding that moves one activation across a quantization
    # step moves a product by one step, so a little more than rounding is allowed
    np.testing.assert_allclose(y, reference(g, x, h0, precision), rtol=0, atol=2e-4)
    y32, _ = g.forward(x, h0, grad=False)
    assert 1e-4 < np.abs(y - y32).max() < NEAR[precision]  # quantized, and close


FORMS = [  # num_layers, reset_after, bias, bidirectional, batch_first
    (1, True, True, False, False),
    (2, True, False, True, False),
    (2, False, True, False, True),
    (3, False, False, True, False),
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("num_layers,reset_after,bias,bidirectional,batch_first", FORMS)
def test_forms_and_lengths_near_float32(precision, num_layers, reset_after, bias, bidirectional, batch_first):
    g = make(num_layers, reset_after, bias, bidirectional, batch_first)
    q = grumpy.quantize(g, precision)
    rng = np.random.default_rng(3)
    B, T = 4, 9
    x = rng.standard_normal((B, T, 6) if batch_first else (T, B, 6)).astype(np.float32)
    h0 = rng.standard_normal((num_layers * g.num_directions, B, 10)).astype(np.float32) * 0.5
    lengths = [9, 3, 1, 6]
    y, h_n = q.forward(x, h0, lengths=lengths)
    y32, h_n32 = g.forward(x, h0, lengths=lengths, grad=False)
    assert y.shape == y32.shape and h_n.shape == h_n32.shape
    np.testing.assert_allclose(y, y32, rtol=0, atol=2 * NEAR[precision])
    np.testing.assert_allclose(h_n, h_n32, rtol=0, atol=2 * NEAR[precision])
    yt = y if batch_first else y.transpose(1, 0, 2)
    for b, n in enumerate(lengths):
        assert not yt[b, n:].any()  # padding outputs zeros
        # a row of a batch is the sequence run alone, cut at its length
        xb = (x[b : b + 1, :n] if batch_first else x[:n, b : b + 1]).copy()
        yb, hb = q.forward(xb, h0[:, b : b + 1].copy())
        np.testing.assert_allclose(yb[0] if batch_first else yb[:, 0], yt[b, :n], rtol=0, atol=1e-5)
        np.testing.assert_allclose(hb[:, 0], h_n[:, b], rtol=0, atol=1e-5)


# -- every path computes the same quantized arithmetic --------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("N,K", [(1, 50), (5, 300), (3, 1500)])
def test_products_agree_across_paths(backend, precision, N, K):
    """int8: the integer products are the same bits on every path (K = 1500 crosses the
    1024-term blocks); bfloat16: the same products summed in other orders."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((70, K)).astype(np.float32)
    a = rng.standard_normal((N, K)).astype(np.float32)
    m = Q.QMatrix(w, precision)
    results = {}
    for name in ("auto", "numba", "numpy"):
        backend(name)
        aq, sa = m.quantize_activations(a)
        results[name] = (aq, sa, m.products(aq), m(a))
    base = results["numpy"]
    for name in ("auto", "numba"):
        np.testing.assert_array_equal(results[name][0], base[0])  # quantized activations: identical
        if precision == "int8":
            np.testing.assert_array_equal(results[name][1], base[1])
            np.testing.assert_array_equal(results[name][2], base[2])  # integer products: identical
            np.testing.assert_array_equal(results[name][3], base[3])  # scaled: identical
        else:
            np.testing.assert_allclose(results[name][3], base[3], rtol=1e-5, atol=1e-5 * np.sqrt(K))
    if precision == "int8":
        exact = base[0].astype(np.int64) @ m.data.T.astype(np.int64)
        np.testing.assert_array_equal(base[2], exact.astype(np.float32))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B", [1, 5])
def test_forced_fallback_gives_the_same_results(backend, precision, B):
    """The compiled paths (MKL's product, numba's) give identical outputs for int8; the
    pure-NumPy fallback computes the same quantized products (test above) and differs
    only by its tanh (NumPy's against the compiled rational one)."""
    g = make(2, H=40, I=12)
    q = grumpy.quantize(g, precision)
    x = np.random.default_rng(5).standard_normal((20, B, 12)).astype(np.float32)
    out = {}
    for name in ("auto", "numba", "numpy"):
        backend(name)
        out[name] = q.forward(x)
    if precision == "int8":
        np.testing.assert_array_equal(out["auto"][0], out["numba"][0])
    else:
        np.testing.assert_allclose(out["auto"][0], out["numba"][0], rtol=0, atol=1e-5)
    # NumPy's tanh moves the state by an ulp or so; now and then that moves an activation
    # across a rounding boundary of its 8-bit form, one quantization step: rare and small.
    d = np.abs(out["numpy"][0] - out["numba"][0])
    assert np.mean(d > 1e-5) < 0.05 and d.max() < 2e-3
    assert np.abs(out["numpy"][1] - out["numba"][1]).max() < 2e-3


@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_stream_path_equals_a_batch_row(precision):
    """One stream takes the fused compiled step; in a batch the same stream takes the
    batch path (MKL where loaded). int8: the same bits; bfloat16: to rounding."""
    g = make(2, H=40, I=12)
    q = grumpy.quantize(g, precision)
    x = np.random.default_rng(6).standard_normal((20, 4, 12)).astype(np.float32)
    yb, _ = q.forward(x)
    y1, _ = q.forward(np.ascontiguousarray(x[:, 2:3]))
    if precision == "int8":
        np.testing.assert_array_equal(y1[:, 0], yb[:, 2])
    else:
        np.testing.assert_allclose(y1[:, 0], yb[:, 2], rtol=0, atol=1e-5)


# -- streaming ------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("B", [1, 3])
def test_step_equals_forward(precision, reset_after, B):
    g = make(2, reset_after=reset_after)
    q = grumpy.quantize(g, precision)
    x = np.random.default_rng(7).standard_normal((11, B, 6)).astype(np.float32)
    y, h_n = q.forward(x)
    h = q.initial_state(B)
    outs = []
    for t in range(11):
        o, h = q.step(x[t], h)
        outs.append(o)
    np.testing.assert_allclose(np.stack(outs), y, rtol=0, atol=1e-5)
    np.testing.assert_allclose(h, h_n, rtol=0, atol=1e-5)
    h = q.reset(h, [0])
    assert not h[:, 0].any()


def test_a_snapshot():
    g = make()
    q = grumpy.quantize(g, "int8")
    x = np.random.default_rng(10).standard_normal((3, 2, 6)).astype(np.float32)
    before, _ = q.forward(x)
    for v in g.params.values():
        v[...] = 0  # training the float32 GRU further does not change its copy
    np.testing.assert_array_equal(q.forward(x)[0], before)


def test_errors():
    g = make()
    with pytest.raises(ValueError, match="precision: expected 'int8' or 'bfloat16', got 'int4'"):
        grumpy.quantize(g, "int4")
    with pytest.raises(ValueError, match="expected a grumpy.GRU or a character model, got RNN"):
        grumpy.quantize(grumpy.RNN(3, 4), "int8")
    q = grumpy.quantize(make(bidirectional=True), "int8")
    with pytest.raises(ValueError, match="bidirectional GRU cannot stream"):
        q.step(np.zeros((1, 6), np.float32))
    with pytest.raises(ValueError, match="no backward"):
        q.forward(np.zeros((2, 1, 6), np.float32), grad=True)
    with pytest.raises(ValueError, match="inference only"):
        q.train()
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 1, 10\)"):
        q.forward(np.zeros((2, 1, 6), np.float32), np.zeros((1, 1, 10), np.float32))


# -- the character model ------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("embedding_dim", [8, 0])
def test_char_model(precision, embedding_dim):
    from grumpy.lm import estimate_loss, sample

    cfg = ModelConfig(vocab_size=14, hidden_size=24, num_layers=2, embedding_dim=embedding_dim)
    m = CharModel(cfg, seed=0).eval()
    q = grumpy.quantize(m, precision)
    ids = np.random.default_rng(8).integers(0, 14, (12, 3))
    logits, h_n = q.forward(ids)
    ref, ref_h = m.forward(ids, grad=False)
    assert logits.shape == ref.shape and h_n.shape == ref_h.shape
    np.testing.assert_allclose(logits, ref, rtol=0, atol=0.05)
    # one stream, one character at a time, as CharModel.step
    h = q.init_state(1)[:, 0]
    for t in range(12):
        lt, h = q.step(int(ids[t, 1]), h)
        np.testing.assert_allclose(lt, logits[t, 1], rtol=0, atol=1e-5)
    # a batch of streams
    lb, hb = q.step(ids[0], None)
    np.testing.assert_allclose(lb, logits[0], rtol=0, atol=1e-5)
    # CharModel's evaluation and sampling code runs on the copy unchanged
    text = np.random.default_rng(9).integers(0, 14, 400)
    assert abs(estimate_loss(q, text, batch_size=4, seq_len=20) - estimate_loss(m, text, batch_size=4, seq_len=20)) \
        < 0.01
    vocab = "abcdefghijklmn"
    assert len("".join(sample(q, vocab, prime="abc", length=20, seed=1))) == 20


# -- the int8 products on AVX-512 VNNI ------------------------------------------------


def _vnni_kernels():
    k = pytest.importorskip("grumpy.kernels.vnni")  # needs numba
    if not k.available():
        pytest.skip("this CPU has no AVX-512 VNNI")
    return k


@pytest.mark.parametrize("R,K,N", [(70, 50, 1), (64, 4, 1), (300, 65, 7), (130, 1500, 5), (3072, 1024, 1),
                                   (768, 256, 33)])
def test_vnni_products_are_the_exact_integers(R, K, N):
    """Padded rows (R not a multiple of 64), columns (K not a multiple of 4), activation
    rows (N not a multiple of 4); serial and parallel kernels; the extremes -127 and 127."""
    k = _vnni_kernels()
    rng = np.random.default_rng(R + K + N)
    q = rng.integers(-127, 128, (R, K)).astype(np.int8)
    a = rng.integers(-127, 128, (N, K)).astype(np.float32)
    a[0, : K // 2] = 127.0
    a[-1, K // 2 :] = -127.0
    q[0] = 127
    q[-1] = -127
    wp, start = k.pack(q)
    u = k.activations(N, K)
    u[:, K:] = 255  # padding bytes meet zero weights
    k.offset_rows(a, u)
    exact = (a.astype(np.int64) @ q.T.astype(np.int64)).astype(np.float32)
    for kernel in (k.products_serial, k.products_parallel):
        out = np.full((N, R), np.nan, np.float32)
        kernel(wp, start, u, out)
        np.testing.assert_array_equal(out, exact)


@pytest.mark.parametrize("H", [40, 300])
def test_vnni_is_the_path_taken_and_equals_the_portable_kernels(backend, H):
    """On a CPU with VNNI the default int8 path runs it (one stream: the fused step,
    parallel at H = 300; batches: the products), with the portable kernels' bits."""
    _vnni_kernels()
    backend("auto")
    assert Q._vnni("int8") is not None and Q._vnni("bfloat16") is None
    g = make(2, H=H, I=12)
    q = grumpy.quantize(g, "int8")
    x = np.random.default_rng(7).standard_normal((15, 3, 12)).astype(np.float32)
    got = [q.forward(x), q.forward(np.ascontiguousarray(x[:, :1]))]
    assert q.cells[0].w_hh._vnni is not None  # the packed copy the kernel reads
    backend("numba")
    want = [q.forward(x), q.forward(np.ascontiguousarray(x[:, :1]))]
    for (o, h), (o2, h2) in zip(got, want):
        np.testing.assert_array_equal(o, o2)
        np.testing.assert_array_equal(h, h2)


def test_vnni_follows_the_cpu_numba_targets(monkeypatch):
    k = pytest.importorskip("grumpy.kernels.vnni")
    from numba.core import config

    from grumpy.kernels import panels

    monkeypatch.setattr(config, "CPU_NAME", "x86-64", raising=False)
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma", raising=False)
    monkeypatch.setattr(panels, "_FEATURES", {})
    assert not k.available()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512f,+avx512bw,+avx512vnni", raising=False)
    monkeypatch.setattr(panels, "_FEATURES", {})
    assert k.available()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_batches_without_vnni_or_mkl_run_the_compiled_sgemm_loop(backend, monkeypatch, precision):
    """Without VNNI (int8), AVX512-BF16 (bfloat16) and MKL, a batch's recurrent steps run in one compiled
    loop over NumPy's own sgemm on the quantized values: int8 the portable path's bits,
    bfloat16 to rounding."""
    from grumpy.kernels import blas

    if Q._numba() is None or blas.SGEMM is None or Q._mkl() is not None:
        pytest.skip("needs numba and NumPy's sgemm, and no MKL")
    monkeypatch.setattr(Q, "_vnni", lambda precision: None)
    monkeypatch.setattr(Q, "_bf16_panels", lambda precision: None)
    g = make(2, H=40, I=12)
    q = grumpy.quantize(g, precision)
    x = np.random.default_rng(8).standard_normal((20, 5, 12)).astype(np.float32)
    cell = q.cells[0]
    assert cell._compiled_loop(Q._numba(), None, 5, None, 20) is not None
    got = q.forward(x)
    backend("numba")
    want = q.forward(x)
    if precision == "int8":
        np.testing.assert_array_equal(got[0], want[0])
    else:
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)


def test_the_compiled_batch_loop_runs_from_another_process_cache(tmp_path):
    """The quantized batch loop (steps_loop) calls the parallel gate kernel. A loop cached
    after another process had cached that kernel crashed the next process that loaded it
    (SIGSEGV), as the float32 loops once did (tests/test_kernels_compiled.py): here the
    parallel kernel is cached first, then the loop, then a third process runs the loop."""
    import os
    import subprocess
    import sys

    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    first = (
        "import numpy as np; from grumpy.kernels import quantized_nb as K\n"
        "g = np.zeros((2, 12), np.float32); h = np.zeros((2, 4), np.float32); o = np.ones(2, np.float32)\n"
        "s = np.ones(12, np.float32)\n"
        "K.gates_parallel(g, o, s, g.copy(), o, s, s, s, h, h.copy(), np.empty(0, np.float32))\n"
    )
    loop = (
        "import numpy as np, grumpy\n"
        "g = grumpy.GRU(12, 40, 2, seed=0).eval()\n"
        "x = np.random.default_rng(0).standard_normal((20, 5, 12)).astype(np.float32)\n"
        "print(float(np.abs(grumpy.quantize(g, 'bfloat16').forward(x)[0]).sum()))\n"
    )
    outs = []
    for code in (first, loop, loop):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        outs.append(r.stdout)
    assert outs[1] == outs[2]


# -- the bfloat16 products on AVX512-BF16 ---------------------------------------------


def _bf16_panels():
    k = pytest.importorskip("grumpy.kernels.panels")  # needs numba
    if not k.bf16_available():
        pytest.skip("this CPU has no AVX512-BF16")
    return k


@pytest.mark.parametrize("R,K,N", [(70, 51, 1), (64, 2, 4), (300, 65, 7), (768, 256, 33), (3072, 1024, 5)])
def test_bf16_panel_products_are_float32_sums_of_exact_products(R, K, N):
    """vdpbf16ps multiplies bfloat16 pairs exactly and sums in float32: against float64 sums
    of the same rounded values, to float32 rounding; serial and parallel bit for bit.
    Padded rows (R not a multiple of 64), an odd K (a pair half padding), N not a multiple of 4."""
    k = _bf16_panels()
    rng = np.random.default_rng(R + K + N)
    w = Q.bf16_bits(rng.standard_normal((R, K)).astype(np.float32))
    aq = Q.bf16_values(Q.bf16_bits(rng.standard_normal((N, K)).astype(np.float32)))
    a16 = k.bf16_rows(N, K)
    a16[:, K:] = 0x3F80  # padding (1.0) meets zero weights
    k.to_bf16_rows(aq, a16)
    want = aq.astype(np.float64) @ Q.bf16_values(w).astype(np.float64).T
    got = []
    for kernel in (k.products_bf16_serial, k.products_bf16_parallel):
        out = np.full((N, R), np.nan, np.float32)
        kernel(k.pack_bf16(w), a16, out)
        assert np.abs(out - want).max() <= 1e-6 * np.abs(want).max() * np.sqrt(K)
        got.append(out)
    np.testing.assert_array_equal(got[0], got[1])


def test_bf16_panels_are_the_batch_path_and_equal_the_portable_kernels(backend):
    """On a CPU with AVX512-BF16 a bfloat16 batch runs its products on the panels (input
    and recurrent, the weights packed once), equal to the portable path to rounding."""
    _bf16_panels()
    backend("auto")
    assert Q._bf16_panels("bfloat16") is not None and Q._bf16_panels("int8") is None
    g = make(2, H=70, I=12)
    q = grumpy.quantize(g, "bfloat16")
    x = np.random.default_rng(9).standard_normal((15, 6, 12)).astype(np.float32)
    got = q.forward(x)
    assert q.cells[0].w_hh._panels is not None and q.cells[0].w_ih._panels is not None
    backend("numba")
    want = q.forward(x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
