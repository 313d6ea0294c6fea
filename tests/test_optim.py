import math

import numpy as np
import pytest

from grumpy.optim import (
    OPTIMIZERS,
    Adagrad,
    Adam,
    AdamW,
    RMSprop,
    SGD,
    clip_grad_norm,
    clip_grad_value,
    grad_norm,
    lr_at,
    make_optimizer,
)

RATES = {"sgd": 0.05, "adagrad": 0.5, "rmsprop": 0.05, "adam": 0.1, "adamw": 0.1}


def quadratic(p):
    """f = ½ Σ a_i (p_i − c_i)², minimum at c."""
    a = np.array([1.0, 3.0, 0.5, 2.0])
    c = np.array([1.0, -2.0, 0.5, 3.0])
    return 0.5 * float(np.sum(a * (p - c) ** 2)), a * (p - c)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_decreases_a_quadratic(name):
    p = np.zeros(4)
    params = {"w": p}
    opt = make_optimizer(name, RATES[name])
    start, _ = quadratic(p)
    for _ in range(200):
        _, g = quadratic(p)
        opt.step(params, {"w": g})
    end, _ = quadratic(p)
    assert params["w"] is p  # updated in place
    assert end < 0.05 * start


def test_first_steps_by_hand():
    g = np.array([0.5, -2.0])
    p0 = np.array([1.0, 1.0])

    p = p0.copy()
    SGD(lr=0.1, momentum=0.9).step({"w": p}, {"w": g})
    assert np.allclose(p, p0 - 0.1 * g)

    p = p0.copy()
    Adagrad(lr=0.1, eps=1e-8).step({"w": p}, {"w": g})
    assert np.allclose(p, p0 - 0.1 * g / (np.abs(g) + 1e-8))

    p = p0.copy()
    RMSprop(lr=0.01, alpha=0.95, eps=1e-8).step({"w": p}, {"w": g})
    assert np.allclose(p, p0 - 0.01 * g / (np.sqrt(0.05 * g * g) + 1e-8))

    # Adam's bias-corrected first step moves every coordinate by ~lr·sign(g).
    p = p0.copy()
    Adam(lr=0.01).step({"w": p}, {"w": g})
    assert np.allclose(p, p0 - 0.01 * np.sign(g), atol=1e-7)

    p = p0.copy()
    AdamW(lr=0.01, weight_decay=0.1).step({"w": p}, {"w": g})
    assert np.allclose(p, p0 * (1 - 0.01 * 0.1) - 0.01 * np.sign(g), atol=1e-7)


def test_sgd_momentum_second_step():
    p = np.zeros(1)
    opt = SGD(lr=1.0, momentum=0.5)
    opt.step({"w": p}, {"w": np.ones(1)})
    opt.step({"w": p}, {"w": np.ones(1)})
    assert np.allclose(p, -(1.0 + 1.5))


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(5)]
    for ours, theirs in ((Adam(lr=0.01, weight_decay=0.1), torch.optim.Adam),
                         (AdamW(lr=0.01, weight_decay=0.1), torch.optim.AdamW)):
        p = p0.copy()
        tp = torch.nn.Parameter(torch.tensor(p0))
        topt = theirs([tp], lr=0.01, weight_decay=0.1)
        for g in grads:
            ours.step({"w": p}, {"w": g})
            tp.grad = torch.tensor(g)
            topt.step()
        assert np.allclose(p, tp.detach().numpy(), atol=1e-10)


def test_state_dict_roundtrip_continues_identically():
    rng = np.random.default_rng(1)
    grads = [{"a": rng.standard_normal(3), "b": rng.standard_normal((2, 2))} for _ in range(6)]
    p1 = {"a": np.zeros(3), "b": np.zeros((2, 2))}
    o1 = Adam(lr=0.1)
    for g in grads:
        o1.step(p1, g)
    p2 = {"a": np.zeros(3), "b": np.zeros((2, 2))}
    o2 = Adam(lr=0.1)
    for g in grads[:3]:
        o2.step(p2, g)
    o3 = Adam(lr=0.1)
    o3.load_state_dict({k: v.copy() for k, v in o2.state_dict().items()}, o2.t, p2)
    assert set(o2.state_dict()) == {"exp_avg.a", "exp_avg.b", "exp_avg_sq.a", "exp_avg_sq.b"}
    for g in grads[3:]:
        o3.step(p2, g)
    for k in p1:
        assert np.array_equal(p1[k], p2[k])


def test_load_state_dict_rejects_mismatch():
    o = Adam(lr=0.1)
    params = {"a": np.zeros(3)}
    with pytest.raises(ValueError, match="shape"):
        o.load_state_dict({"exp_avg.a": np.zeros(4)}, 1, params)
    with pytest.raises(ValueError, match="unexpected"):
        o.load_state_dict({"momentum.a": np.zeros(3)}, 1, params)
    with pytest.raises(ValueError, match="non-finite"):
        o.load_state_dict({"exp_avg.a": np.full(3, np.nan)}, 1, params)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_learning_rate(bad):
    with pytest.raises(ValueError, match="lr"):
        Adam(lr=bad)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("lbfgs", 0.1)


def test_clip_by_global_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0, 4.0]])}
    n = clip_grad_norm(g, 1.0)
    assert n == pytest.approx(5.0)
    assert grad_norm(g) == pytest.approx(1.0)
    assert np.allclose(g["a"], [0.6, 0.0]) and np.allclose(g["b"], [[0.0, 0.8]])
    # below the threshold: untouched
    g2 = {"a": np.array([0.3, 0.4])}
    clip_grad_norm(g2, 1.0)
    assert np.array_equal(g2["a"], [0.3, 0.4])


def test_clip_norm_reports_non_finite_and_leaves_grads():
    g = {"a": np.array([np.inf, 1.0])}
    assert not math.isfinite(clip_grad_norm(g, 1.0))


def test_clip_by_value():
    g = {"a": np.array([-7.0, 0.5, 9.0])}
    clip_grad_value(g, 5.0)
    assert np.array_equal(g["a"], [-5.0, 0.5, 5.0])


def test_schedule_shape():
    base, warm, total = 1.0, 10, 110
    lrs = [lr_at(s, base, schedule="cosine", warmup_steps=warm, total_steps=total, min_ratio=0.1)
           for s in range(total)]
    assert lrs[0] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))  # rising warm-up
    assert lrs[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # then monotone decay
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)
    mid = lr_at(warm + (total - warm) // 2, base, schedule="cosine", warmup_steps=warm, total_steps=total,
                min_ratio=0.1)
    assert mid == pytest.approx(0.55, abs=0.01)
    # progress-driven (time budget) decay
    assert lr_at(500, 1.0, progress=1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(500, 1.0, progress=0.0, warmup_steps=10) == pytest.approx(1.0)
    const = [lr_at(s, base, schedule="constant", warmup_steps=warm) for s in range(50)]
    assert const[warm:] == [1.0] * (50 - warm)
    with pytest.raises(ValueError):
        lr_at(0, 1.0, schedule="step")
