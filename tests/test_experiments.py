"""The experiments: their building blocks, and each one run in --quick mode
through the CLI, asserting the qualitative results that are robust at that size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grumpy import experiments as ex
from grumpy.cli import main


def test_adding_batch_markers_and_baseline():
    rng = np.random.default_rng(0)
    T, B = 20, 4000
    x, y = ex.adding_batch(rng, T, B)
    assert x.shape == (T, B, 2) and y.shape == (B,)
    marks = x[..., 1]
    assert np.all(marks.sum(0) == 2)
    assert np.all(marks[: T // 2].sum(0) == 1) and np.all(marks[T // 2 :].sum(0) == 1)
    np.testing.assert_allclose(y, (x[..., 0] * marks).sum(0), rtol=1e-6)
    assert np.all((x[..., 0] >= 0) & (x[..., 0] < 1))
    assert abs(np.mean((1.0 - y) ** 2) - 1 / 6) < 0.01  # the "always predict 1" baseline


@pytest.mark.parametrize("kind", list(ex.MODELS))
def test_regressor_gradients_by_finite_differences(kind):
    rng = np.random.default_rng(1)
    model = ex.Regressor(kind, 3, seed=2, dtype=np.float64)
    x, y = ex.adding_batch(rng, 6, 5, np.float64)
    _, grads = model.loss_and_grads(x, y)
    eps = 1e-6
    for name, p in model.params.items():
        num = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up = model.mse(x, y)
            p[i] = old - eps
            down = model.mse(x, y)
            p[i] = old
            num[i] = (up - down) / (2 * eps)
        err = np.linalg.norm(num - grads[name]) / max(np.linalg.norm(num), 1e-12)
        assert err <= 1e-6, name


@pytest.mark.parametrize("kind", list(ex.MODELS))
def test_stepwise_state_gradients_agree_with_the_whole_sequence_backward(kind):
    """dL/dh_0 from the step-by-step pieces equals the layer's own full backward."""
    rng = np.random.default_rng(2)
    model = ex.Regressor(kind, 5, seed=3, dtype=np.float64)
    x, y = ex.adding_batch(rng, 12, 4, np.float64)
    norms = ex.state_gradient_norms(model, x, y)
    assert norms.shape == (13,)
    err = model.predict(x) - y
    d_h_n = np.outer(2.0 / 4 * err, model.params["head.weight"])[None]
    np.testing.assert_allclose(norms[-1], np.linalg.norm(d_h_n))
    model.layer.forward(x)
    _, dh0 = model.layer.backward(np.zeros((12, 4, 5)), d_h_n)
    np.testing.assert_allclose(norms[0], np.linalg.norm(dh0), rtol=1e-10)


def run(name: str, out, capsys) -> dict:
    assert main(["experiment", name, "--quick", "--seed", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    with open(out / f"{name}-quick.json") as f:
        return json.load(f)


def test_gradient_flow_quick(tmp_path, capsys):
    res = run("gradient-flow", tmp_path, capsys)
    T = res["config"]["T"]
    runs = res["runs"]
    assert set(runs) == set(ex.MODELS)
    ratio = {k: {w: r[w][T - 50] / r[w][T] for w in ("init", "trained")} for k, r in runs.items()}
    # At initialisation (update gate near 1/2) every model loses the gradient over 50 steps ...
    for k in runs:
        assert ratio[k]["init"] < 1e-5, k
    # ... after training on the adding problem the GRUs keep it and the RNN still loses it.
    assert ratio["RNN"]["trained"] < 1e-5
    for k in ("GRU", "GRU (reset_after=False)"):
        assert ratio[k]["trained"] > 1e-2, k
        assert runs[k]["trained"][T - 50] > 1e3 * runs["RNN"]["trained"][T - 50], k
    assert len(res["table"]) == 2 * len(runs)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "gradient-flow-quick.png").stat().st_size > 0


def test_adding_quick(tmp_path, capsys):
    res = run("adding", tmp_path, capsys)
    by = {(r["model"], r["T"]): r for r in res["runs"]}
    gru, rnn = by[("GRU", 50)], by[("RNN", 50)]
    assert gru["steps"] == rnn["steps"]  # the same budget
    assert gru["test_mse"] < 0.02 and gru["steps_to_target"] is not None
    assert rnn["test_mse"] > 0.1 and rnn["steps_to_target"] is None  # stuck near the 1/6 baseline


def test_jacobian_quick(tmp_path, capsys):
    res = run("jacobian", tmp_path, capsys)
    cases = {(c["model"], c["case"]): c for c in res["cases"]}
    assert len(cases) == 7
    for c in res["cases"]:
        assert c["max_abs_diff_closed_form"] < 1e-12, (c["model"], c["case"])
        if c["model"] != "RNN":
            assert c["max_abs_diff_limit"] < 1e-3, (c["model"], c["case"])
    for kind in ("GRU", "GRU (reset_after=False)"):
        assert abs(cases[(kind, "z≈1 (keep)")]["example"]["spectral_norm"] - 1) < 1e-3
        assert cases[(kind, "z≈0, r≈0")]["example"]["spectral_norm"] < 1e-3


def test_existing_results_are_not_overwritten_silently(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ex, "_figure_class", lambda: None)  # as without matplotlib
    run("jacobian", tmp_path, capsys)
    assert not (tmp_path / "jacobian-quick.png").exists()
    before = (tmp_path / "jacobian-quick.json").read_text()
    assert main(["experiment", "jacobian", "--quick", "--out", str(tmp_path), "--seed", "5"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "jacobian-quick.json").read_text() == before
    assert main(["experiment", "jacobian", "--quick", "--out", str(tmp_path), "--seed", "5", "--overwrite"]) == 0
    assert json.loads((tmp_path / "jacobian-quick.json").read_text())["seed"] == 5
