"""The compiled (numba) float32 path against the NumPy path and the reference cell.

The shared tests cover whichever path runs by default; these force each branch
of the compiled path (whole-loop, per-step serial, per-step parallel) and the
NumPy fallback, at sizes small enough to stay fast.
"""

import os
import numpy as np
import pytest

import grumpy.kernels as K
from grumpy.cell import gru_cell_forward

pytest.importorskip("numba")


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def problem(rng, T=9, B=3, I=5, H=6, masked=False):
    f = np.float32
    p = {
        "x": rng.standard_normal((T, B, I)).astype(f),
        "h0": rng.standard_normal((B, H)).astype(f),
        "w_ih": (0.5 * rng.standard_normal((3 * H, I))).astype(f),
        "w_hh": (0.5 * rng.standard_normal((3 * H, H))).astype(f),
        "b_ih": rng.standard_normal(3 * H).astype(f),
        "b_hh": rng.standard_normal(3 * H).astype(f),
        "d_out": rng.standard_normal((T, B, H)).astype(f),
        "d_hl": rng.standard_normal((B, H)).astype(f),
    }
    lengths = rng.integers(1, T + 1, B)
    p["mask"] = (np.arange(T)[:, None] < lengths[None]).astype(f)[..., None] if masked else None
    return p


COMPILED = {  # every compiled route, forced at a small size
    "loop": K.Route("loop"),
    "loop-parallel": K.Route("loop", parallel=True),
    "packed": K.Route("packed"),
    "steps": K.Route("steps"),
    "steps-parallel": K.Route("steps", parallel=True),
    "steps-panels": K.Route("steps", panels=True),  # grumpy's products on packed weights
}


def needs(route):
    from grumpy.kernels import blas

    if route is not None and route.kind == "packed" and blas.MKL is None:
        pytest.skip("the route needs MKL")
    return route


def run(p, reverse, route=None):
    out, hl, cache = K.gru_sequence_forward(
        p["x"], p["h0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], reverse=reverse, mask=p["mask"],
        route=route)
    dx, dh0, g = K.gru_sequence_backward(p["d_out"], p["d_hl"], cache, p["w_ih"], p["w_hh"])
    return [out, hl, dx, dh0] + [g[k] for k in sorted(g)]


@pytest.mark.parametrize("branch", list(COMPILED))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_matches_numpy_path(branch, reverse, masked):
    p = problem(np.random.default_rng(3), masked=masked)
    want = run(p, reverse, "numpy")  # the NumPy route, also in float32
    got = run(p, reverse, needs(COMPILED[branch]))
    for a, b in zip(got, want):
        assert a.dtype == np.float32
        assert rel(a, b) < 2e-6


@pytest.mark.parametrize("route", [None, "numpy", *K.ROUTES[1:]])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_every_route_matches_the_reference_cell(route, B, masked, reverse):
    """Each route, chosen explicitly, against GRUCell's arithmetic stepped by hand in float64,
    with and without padding, in both directions."""
    from grumpy.kernels import blas

    if route == "packed" and blas.MKL is None:
        pytest.skip("the route needs MKL")
    p = problem(np.random.default_rng(11), T=7, B=B, H=10, masked=masked)
    out, hl, _ = K.gru_sequence_forward(p["x"], p["h0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], mask=p["mask"],
                                        reverse=reverse, keep_cache=route not in ("shared", "step"), route=route)
    w = [p[k].astype(np.float64) for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
    h = p["h0"].astype(np.float64)
    for t in range(6, -1, -1) if reverse else range(7):
        h_new, _ = gru_cell_forward(p["x"][t].astype(np.float64), h, *w)
        m = p["mask"][t] if masked else 1.0
        h = m * h_new + (1 - m) * h
        assert rel(out[t], m * h) < 2e-6
    assert rel(hl, h) < 2e-6


def test_exp32_is_within_1_5_ulp_of_float64_and_keeps_the_edges():
    """The loss's compiled e^x against float64's, over the whole range where e^x is a
    normal float32, and at the edges: overflow to inf, underflow to 0, NaN kept."""
    from grumpy.kernels import nb

    x = np.linspace(-87.33, 88.72, 400_001, dtype=np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, 1e-30, -1e-30, 0.34657359, 88.7228, -87.3365])])
    e = x.copy()
    nb.exp_inplace(e)
    want = np.exp(x.astype(np.float64))
    ulps = np.abs(e - want) / np.spacing(want.astype(np.float32))
    assert ulps.max() <= 1.5, x[ulps.argmax()]
    edges = np.float32([88.8, 1e4, np.inf, -87.4, -1e4, -np.inf, np.nan])
    nb.exp_inplace(edges)
    np.testing.assert_array_equal(edges, np.float32([np.inf, np.inf, np.inf, 0.0, 0.0, 0.0, np.nan]))


def test_an_impossible_route_is_a_clear_error():
    p = problem(np.random.default_rng(12))
    with pytest.raises(ValueError, match="route: expected one of"):
        run(p, False, "fastest")
    with pytest.raises(ValueError, match="route 'shared': inference only"):
        run(p, False, "shared")
    x64 = {k: (v.astype(np.float64) if v is not None else None) for k, v in p.items()}
    with pytest.raises(ValueError, match="route 'loop': needs numba, float32"):
        run(x64, False, "loop")


def test_compiled_forward_matches_float64_reference_cell():
    p = problem(np.random.default_rng(4), T=6, B=2, H=40)
    out, _, _ = K.gru_sequence_forward(p["x"], p["h0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    h = p["h0"].astype(np.float64)
    w = {k: p[k].astype(np.float64) for k in ("w_ih", "w_hh", "b_ih", "b_hh")}
    for t in range(6):
        h, _ = gru_cell_forward(p["x"][t].astype(np.float64), h, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
        assert rel(out[t], h) < 1e-6


@pytest.mark.parametrize("H", [7, K.route.STEP_BLAS_MIN])
def test_gru_step_matches_reference_cell(H):
    rng = np.random.default_rng(5)
    p = problem(rng, T=1, B=1, I=11, H=H)
    x, h = p["x"][0, 0], p["h0"][0]
    got = K.gru_step(x, h, p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    w = [p[k].astype(np.float64) for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
    want, _ = gru_cell_forward(x[None].astype(np.float64), h[None].astype(np.float64), *w)
    assert got.shape == (H,) and got.dtype == np.float32
    assert rel(got, want[0]) < 1e-6
    # batched and float64 calls take the reference path, exactly
    got64 = K.gru_step(x[None].astype(np.float64), h[None].astype(np.float64), *w)
    assert np.array_equal(got64, want)


@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_single_stream_per_step_matches_numpy_path(reverse):
    # B = 1 on the steps route takes W_hh h on W_hh's rows.
    p = problem(np.random.default_rng(6), B=1, H=9, masked=True)
    want = run(p, reverse, "numpy")
    got = run(p, reverse, "steps")
    for a, b in zip(got, want):
        assert rel(a, b) < 2e-6


def test_compiled_tanh_and_sigmoid_are_accurate_bounded_and_keep_nan():
    from grumpy.kernels import nb
    from numba import njit

    @njit
    def apply(x, out_t, out_s):
        for i in range(x.shape[0]):
            out_t[i] = nb.tanh32(x[i])
            out_s[i] = nb.sigm32(x[i])

    x = np.concatenate([np.linspace(-30, 30, 200001), [np.inf, -np.inf, 3e38, -3e38]]).astype(np.float32)
    t, s = np.empty_like(x), np.empty_like(x)
    apply(x, t, s)
    ref_t = np.tanh(x.astype(np.float64))
    assert np.all(np.abs(t) <= 1) and np.all((s >= 0) & (s <= 1))
    assert np.max(np.abs(t - ref_t) / np.maximum(np.abs(ref_t), 1e-30)) < 4e-7
    apply(np.array([np.nan], np.float32), t[:1], s[:1])
    assert np.isnan(t[0]) and np.isnan(s[0])


@pytest.mark.parametrize("branch", list(COMPILED))
def test_compiled_path_propagates_nan(branch):
    # A diverging run must show up as NaN, as it does in PyTorch, not as plausible numbers.
    p = problem(np.random.default_rng(0))
    p["x"][4, 1, 2] = np.nan
    out = run(p, False, needs(COMPILED[branch]))[0]
    assert np.isnan(out[4:, 1]).all() and np.isfinite(out[:4]).all() and np.isfinite(out[:, [0, 2]]).all()


@pytest.mark.parametrize("H", [1, 7, 64, K.route.STEP_BLAS_MIN])
@pytest.mark.parametrize("bias", [True, False])
def test_prepared_step_matches_reference_cell(H, bias):
    rng = np.random.default_rng(8)
    p = problem(rng, T=1, B=1, I=11, H=H)  # I=11: the four-at-a-time loops' remainder runs too
    b_ih, b_hh = (p["b_ih"], p["b_hh"]) if bias else (None, None)
    step = K.GRUStep(p["w_ih"], p["w_hh"], b_ih, b_hh)
    assert step._fast == (H < K.route.STEP_BLAS_MIN)
    x, h = p["x"][0, 0], p["h0"][0]
    w = [p[k].astype(np.float64) for k in ("w_ih", "w_hh")]
    bw = [b.astype(np.float64) if b is not None else None for b in (b_ih, b_hh)]
    want, _ = gru_cell_forward(x[None].astype(np.float64), h[None].astype(np.float64), *w, *bw)
    got = step(x, h)
    assert got.shape == (H,) and got.dtype == np.float32
    # from STEP_BLAS_MIN the products are the BLAS's matrix-vector product, whose order of
    # summation is the library's and the CPU's (MKL on AMD Zen: 1.4e-6 for these 523-term
    # float32 sums); below it grumpy's own kernel, with its order fixed
    assert rel(got, want[0]) < (3e-6 if H >= K.route.STEP_BLAS_MIN else 1e-6)
    # anything else (here a batch of one) goes through gru_step, exactly
    np.testing.assert_array_equal(step(x[None], h[None]), K.gru_step(x[None], h[None], p["w_ih"], p["w_hh"], b_ih, b_hh))


@pytest.mark.parametrize("pattern", ["one-hot", "two", "zero", "dense", "nan"])
@pytest.mark.parametrize("prepared", [False, True])
def test_one_stream_step_reads_only_an_inputs_nonzeros_and_agrees(pattern, prepared):
    # A mostly-zero input (a one-hot character) takes the step's gathered loop over its
    # nonzero entries; a dense one the full loop. h has zeros too, which GRUStep skips.
    rng = np.random.default_rng(10)
    I, H = 11, 20
    p = problem(rng, T=1, B=1, I=I, H=H)
    h = p["h0"][0].copy()
    h[::3] = 0.0
    x = np.zeros(I, np.float32)
    nonzero = {"one-hot": [3], "two": [0, 10], "zero": [], "dense": list(range(I)), "nan": [4]}[pattern]
    x[nonzero] = rng.uniform(-2, 2, len(nonzero)).astype(np.float32)
    if pattern == "nan":
        x[4] = np.nan
    from grumpy.kernels import nb

    assert (nb.SPARSE_FRACTION * len(nonzero) <= I) == (pattern != "dense")
    w = [p[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
    got = K.GRUStep(*w)(x, h) if prepared else K.gru_step(x, h, *w)
    want, _ = gru_cell_forward(x[None].astype(np.float64), h[None].astype(np.float64),
                               *(a.astype(np.float64) for a in w))
    if pattern == "nan":
        assert np.isnan(got).all()
    else:
        assert rel(got, want[0]) < 1e-6


def test_prepared_step_is_a_snapshot_and_propagates_nan():
    p = problem(np.random.default_rng(9), T=1, B=1, H=5)
    step = K.GRUStep(p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    x, h = p["x"][0, 0], p["h0"][0]
    before = step(x, h)
    p["w_hh"] += 1.0  # changing the weights afterwards does not reach the prepared copy
    np.testing.assert_array_equal(step(x, h), before)
    h_nan = h.copy()
    h_nan[0] = np.nan
    assert np.isnan(step(x, h_nan)).all()  # every unit reads h[0] through W_hh


def test_serial_and_parallel_kernels_never_share_a_cache_entry(tmp_path):
    """numba keys its on-disk cache by function name and signature, not by options. When
    the serial and parallel gate kernels were one function compiled twice, whichever was
    cached first was loaded for both, and a fresh process crashed (SIGSEGV) running a
    time loop whose serial kernel had come back parallel. Here the parallel kernels are
    cached first, then the loops, then a third process runs the loops from the cache."""
    import subprocess
    import sys

    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), GRUMPY_MKL="0")
    first = (
        "import numpy as np; from grumpy.kernels import nb as K\n"
        "g = np.zeros((2, 12), np.float32); h = np.zeros((2, 4), np.float32); m = np.empty(0, np.float32)\n"
        "b = np.zeros(12, np.float32)\n"
        "K.gates_forward_parallel(g, g.copy(), b, b, h, h.copy(), h.copy(), m)\n"
        "K.gates_backward_parallel(h, h.copy(), g, h.copy(), m, h.copy())\n"
    )
    loops = (
        "import numpy as np; from grumpy.layers import gru_forward, gru_backward; from grumpy import GRU\n"
        "gru = GRU(3, 8, seed=0)\n"
        "x = np.random.default_rng(0).standard_normal((1, 1, 3)).astype(np.float32)\n"
        "out, hn, cache = gru_forward(gru.params, x, np.zeros((1, 1, 8), np.float32))\n"
        "gru_backward(gru.params, cache, np.ones_like(out))\n"
        "print(float(np.abs(out).sum()))\n"
    )
    for code in (first, loops, loops):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def fresh_python(code, unset):
    """stdout of ``code`` run in a fresh interpreter without the environment variable ``unset``."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != unset})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_threads_that_first_use_the_kernels_together_all_get_them():
    # The kernels are imported on first use. A thread that asked while another was still
    # importing them once got None, "no numba", and a shared inference pass failed.
    code = (
        "import threading\n"
        "from grumpy.kernels.route import compiled_kernels\n"
        "start, got = threading.Barrier(4), []\n"
        "def use():\n"
        "    start.wait()\n"
        "    got.append(compiled_kernels() is not None)\n"
        "ts = [threading.Thread(target=use) for _ in range(4)]\n"
        "[t.start() for t in ts]\n"
        "[t.join() for t in ts]\n"
        "print(got)\n"
    )
    assert fresh_python(code, unset="GRUMPY_NUMBA").strip() == "[True, True, True, True]"


@pytest.mark.parametrize("R, K, N", [(18, 5, 3), (64, 1, 4), (130, 7, 13), (192, 64, 128), (768, 33, 9)])
def test_panel_products_equal_float64_and_every_split(R, K, N):
    """grumpy.kernels.panels: out = a w^T on weights packed in panels of 64 rows. Checked
    against float64, and the serial and parallel kernels against each other bit for bit
    (each output is one chain of fused multiply-adds in k's order, whichever tile and
    thread computes it). The sizes cover padded panels, the 1 to 3 rows after the groups
    of four, and few panels (split into blocks of rows)."""
    P = pytest.importorskip("grumpy.kernels.panels")
    rng = np.random.default_rng(R + K + N)
    w = rng.standard_normal((R, K)).astype(np.float32)
    a = rng.standard_normal((N, K)).astype(np.float32)
    wp = P.pack(w)
    assert wp.shape == (-(-R // 64), K, 64)
    want = a.astype(np.float64) @ w.T.astype(np.float64)
    got = {}
    # "pool": products on the threads of NumPy's BLAS (or its fallbacks), from rows of a
    # that are not contiguous with each other
    a_rows = np.full((N, K + 5), np.nan, np.float32)[:, :K]
    a_rows[:] = a
    for name, f, x in (("serial", P.products_serial, a), ("parallel", P.products_parallel, a),
                       ("pool", P.products, a_rows)):
        out = np.full((N, R + 3), np.nan, np.float32)[:, :R]  # columns past R must stay untouched
        f(wp, x, out)
        assert np.isnan(out.base[:, R:]).all()
        got[name] = out.copy()
        assert rel(got[name], want) < 1e-6
    np.testing.assert_array_equal(got["serial"], got["parallel"])
    np.testing.assert_array_equal(got["serial"], got["pool"])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_panel_products_run_on_the_threads_numpys_blas_would_use(threads):
    """grumpy.kernels.panels.products runs its tiles as jobs on NumPy's own BLAS threads,
    as many as that BLAS would use now (threadpoolctl's limit, here also more than the
    cores), each tile once."""
    from threadpoolctl import threadpool_limits

    from grumpy.kernels import blas

    P = pytest.importorskip("grumpy.kernels.panels")
    if blas.pool_threads() == 0:
        pytest.skip("NumPy's BLAS lends no threads here (not a pthreads OpenBLAS)")
    rng = np.random.default_rng(threads)
    w = rng.standard_normal((3 * 1024, 256)).astype(np.float32)
    a = rng.standard_normal((32, 256)).astype(np.float32)
    wp = P.pack(w)
    want = np.empty((32, 3 * 1024), np.float32)
    P.products_serial(wp, a, want)
    with threadpool_limits(threads, user_api="blas"):
        assert blas.pool_threads() == threads
        for _ in range(20):  # the workers pick the jobs up asleep, spinning, or mid-way
            out = np.full_like(want, np.nan)
            P.products(wp, a, out)
            np.testing.assert_array_equal(out, want)  # a tile missed would be NaN


@pytest.mark.parametrize("kind", ["forward", "infer", "backward"])
@pytest.mark.parametrize("B", [2, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_gate_kernels_on_the_blas_threads_equal_the_serial_kernel(kind, B, masked):
    """grumpy.kernels.pool: the steps route's parallel gate kernels as jobs on NumPy's BLAS
    threads, a block of rows each, under 2 and 3 threads (more than the rows at B = 2):
    bit for bit the serial kernel, every row written."""
    from threadpoolctl import threadpool_limits

    from grumpy.kernels import blas, nb
    from grumpy.kernels import pool as P

    if not blas.POOL:
        pytest.skip("NumPy's BLAS lends no threads here (not a pthreads OpenBLAS, or MKL loaded)")
    H = 7
    f = np.float32

    def arrays():
        r = np.random.default_rng(B + 1)
        m = (np.arange(B) % 2).astype(f) if masked else np.empty(0, f)
        big, small = (lambda: r.standard_normal((B, 3 * H)).astype(f)), (lambda: r.standard_normal((B, H)).astype(f))
        bias = lambda: r.standard_normal(3 * H).astype(f)  # noqa: E731
        if kind == "backward":  # do, hp, g (r, z, n in (0, 1)), hn, m, dh
            return [small(), small(), np.abs(big()) % 1, small(), m, small()]
        out = [big(), big(), bias(), bias(), small(), np.full((B, H), np.nan, f)]
        return out + ([np.full((B, H), np.nan, f), m] if kind == "forward" else [m])

    want = arrays()
    getattr(nb, f"gates_{kind}_serial")(*want)
    run = P.fused_gates(kind, parallel=True)
    for threads in (2, 3):
        with threadpool_limits(threads, user_api="blas"):
            got = arrays()
            run(*got)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w)
    assert not any(np.isnan(a).any() for a in want)


def test_the_steps_routes_gate_kernels_go_parallel_on_the_pool_from_its_threshold():
    """Where NumPy's BLAS lends its threads, the steps route's gate kernels use them from
    route.PARALLEL_MIN_POOL batch x hidden elements a step, with or without TBB."""
    from grumpy.kernels import blas

    if not blas.POOL:
        pytest.skip("NumPy's BLAS lends no threads here")
    R = K.route
    H = 1024
    B = R.PARALLEL_MIN_POOL // H
    for grad in (True, False):
        at, below = (R.choose(np.dtype(np.float32), True, b, H, grad=grad) for b in (B, B - 1))
        assert at.kind == below.kind == "steps"
        assert at.parallel and not below.parallel


def test_the_tbb_check_agrees_with_the_layer_numba_runs_on():
    """parallel_gates_ok() once imported numba's TBB module directly, which failed where
    numba itself loads libtbb and then runs on it: the check said no TBB, and the parallel
    kernels were never chosen. Asked first in a fresh process, it must agree with the
    threading layer numba then picks."""
    code = (
        "from grumpy.kernels.route import parallel_gates_ok\n"
        "ok = parallel_gates_ok()\n"
        "import numba, numpy as np\n"
        "f = numba.njit(parallel=True)(lambda a: sum([a[i] for i in numba.prange(a.size)]))\n"
        "f(np.ones(4)); print(ok, numba.threading_layer())\n"
    )
    ok, layer = fresh_python(code, unset="NUMBA_THREADING_LAYER").split()
    assert ok == str(layer == "tbb")


@pytest.mark.parametrize("width", [7, K.route.PANELS_MIN_H])
def test_linear_is_x_times_w_transposed(width):
    """grumpy.kernels.linear: x W^T, into ``out`` too, and from rows that are not contiguous."""
    rng = np.random.default_rng(width)
    x = rng.standard_normal((300, width)).astype(np.float32)
    w = rng.standard_normal((65, width)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    got = K.linear(x, w)
    assert got.shape == (300, 65) and got.dtype == np.float32 and rel(got, want) < 1e-6
    out = np.empty((300, 65), np.float32)
    assert K.linear(x, w, out) is out and rel(out, want) < 1e-6
    assert rel(K.linear(x[::2], w), want[::2]) < 1e-6  # rows of x not contiguous
