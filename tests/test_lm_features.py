"""Early stopping (--patience), fine-tuning (--init-from) and GRU.gates()."""

import numpy as np
import pytest

pytest.importorskip("safetensors")

from test_train_cli import TINY, run, text_file, tiny_cfg  # noqa: E402, F401  (text_file is a fixture)

from grumpy import GRU  # noqa: E402
from grumpy.cell import gru_cell_forward  # noqa: E402
from grumpy.lm import train  # noqa: E402
from grumpy.lm.checkpoint import load_checkpoint, load_model  # noqa: E402


def quiet(msg: str) -> None:
    pass


# -- --patience ------------------------------------------------------------------


def test_patience_stops_after_that_many_evaluations_without_improvement(tmp_path, text_file):
    # lr 0 never improves on the first evaluation: the run stops at the (1 + patience)-th.
    cfg = tiny_cfg(text_file, tmp_path / "p", max_steps=60, eval_every=3, patience=2, lr=1e-12,
                   schedule="constant", warmup_steps=0)
    res = train(cfg, progress=False, log=quiet)
    assert res.stopped == "patience" and res.step == 9
    best = load_checkpoint(res.best)
    assert best.meta["step"] == 3 and best.meta["best_val_loss"] == res.best_val_loss
    # without patience the same run goes on
    res = train(tiny_cfg(text_file, tmp_path / "q", max_steps=12, eval_every=3, lr=1e-12, schedule="constant",
                         warmup_steps=0), progress=False, log=quiet)
    assert res.stopped == "max_steps" and res.step == 12


def test_patience_is_a_clear_option_error(tmp_path, text_file, capsys):
    rc, _, err = run(["train", text_file, "--out", tmp_path / "x", "--patience", "0", *TINY], capsys)
    assert rc == 2 and "--patience" in err


# -- --init-from -----------------------------------------------------------------


def test_init_from_extends_the_vocabulary_and_keeps_old_rows(tmp_path, text_file, capsys):
    rc, _, err = run(["train", text_file, "--out", tmp_path / "a", "--max-steps", "3", *TINY], capsys)
    assert rc == 0, err
    old, old_meta = load_model(tmp_path / "a" / "latest.safetensors")
    new_text = tmp_path / "new.txt"
    new_text.write_text(text_file.read_text(encoding="utf-8") + "QXZ!? " * 200, encoding="utf-8")
    cfg = tiny_cfg(new_text, tmp_path / "c", max_steps=1, init_from=str(tmp_path / "a" / "latest.safetensors"))
    messages: list[str] = []
    res = train(cfg, progress=False, log=messages.append)
    assert any("new to" in m for m in messages)
    model, meta = load_model(res.latest)
    V = len(old_meta["vocab"])
    assert meta["vocab"][:V] == old_meta["vocab"]  # old characters keep their indices
    assert sorted(meta["vocab"][V:]) == sorted(set("QXZ!?") - set(old_meta["vocab"]))
    assert meta["step"] == 1  # a new run: its own step count, optimiser and position


def test_init_from_starts_from_the_weights_exactly(tmp_path, text_file):
    first = train(tiny_cfg(text_file, tmp_path / "a", max_steps=3), progress=False, log=quiet)
    old = load_checkpoint(first.latest).model
    new_text = tmp_path / "new.txt"
    new_text.write_text(text_file.read_text(encoding="utf-8") + "QZ " * 300, encoding="utf-8")
    cfg = tiny_cfg(new_text, tmp_path / "b", max_steps=1, init_from=first.latest)
    from grumpy.lm import run as lm_run

    run_state = lm_run.open_run(cfg, None, quiet)
    model = run_state.model
    V = old.config.vocab_size
    for k, v in old.params.items():
        got = model.params[k]
        if k in ("embedding.weight", "head.weight", "head.bias"):
            np.testing.assert_array_equal(got[:V], v)
            assert got.shape[0] == V + 2
        else:
            np.testing.assert_array_equal(got, v)
    assert run_state.step == 0 and run_state.optimizer.t == 0 and not run_state.optimizer.state_dict()


def test_one_hot_models_extend_their_input_columns():
    from grumpy.lm.model import CharModel, ModelConfig

    m = CharModel(ModelConfig(vocab_size=5, hidden_size=4, num_layers=1, embedding_dim=0), seed=0)
    big = m.with_vocab_size(7, seed=1)
    np.testing.assert_array_equal(big.params["gru.weight_ih_l0"][:, :5], m.params["gru.weight_ih_l0"])
    assert big.params["gru.weight_ih_l0"].shape == (12, 7)
    with pytest.raises(ValueError, match="vocab_size"):
        m.with_vocab_size(3)


def test_init_from_bad_checkpoint_or_with_resume_is_a_clear_error(tmp_path, text_file, capsys):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint at all")
    rc, _, err = run(["train", text_file, "--out", tmp_path / "x", "--init-from", bogus, *TINY], capsys)
    assert rc == 2 and "--init-from" in err and "bogus.safetensors" in err and len(err.strip().splitlines()) == 1
    rc, _, _ = run(["train", text_file, "--out", tmp_path / "a", "--max-steps", "2", *TINY], capsys)
    ck = tmp_path / "a" / "latest.safetensors"
    rc, _, err = run(["train", "--resume", ck, "--init-from", ck], capsys)
    assert rc == 2 and "--init-from and --resume" in err
    rc, _, err = run(["train", text_file, "--out", tmp_path / "y", "--init-from", ck, "--hidden-size", "16",
                      "--batch-size", "4", "--seq-len", "8"], capsys)  # sizes the tiny text holds
    assert rc == 2 and "--hidden-size 16" in err and "--init-from" in err


# -- GRU.gates() -----------------------------------------------------------------


@pytest.mark.parametrize("dtype,reset_after", [(np.float32, True), (np.float64, True), (np.float64, False)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_gates_match_the_reference_cell(dtype, reset_after, batch_first):
    rng = np.random.default_rng(0)
    T, B, I, H, L = 6, 3, 4, 5, 2
    gru = GRU(I, H, L, reset_after=reset_after, dtype=dtype, seed=1, batch_first=batch_first, dropout=0.5)
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    g = gru.gates(x)
    xt = x.transpose(1, 0, 2) if batch_first else x
    inp = xt.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for layer in range(L):
        p = {k: gru.params[f"{k}_l{layer}"].astype(np.float64) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        h = np.zeros((B, H))
        states = []
        for t in range(T):
            h, c = gru_cell_forward(inp[t], h, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"],
                                    reset_after=reset_after)
            for k in ("r", "z", "n"):
                got = g[k][layer, :, t] if batch_first else g[k][layer, t]
                np.testing.assert_allclose(got, getattr(c, k), atol=tol, rtol=tol)
            got_h = g["h"][layer, :, t] if batch_first else g["h"][layer, t]
            np.testing.assert_allclose(got_h, h, atol=tol, rtol=tol)
            states.append(h)
        inp = np.stack(states)  # no dropout between layers: gates() runs as in eval mode
    assert gru.training  # the layer's mode is left as it was
    with pytest.raises(RuntimeError):
        gru.backward(np.zeros((T, B, H), dtype))


def test_gates_of_a_bidirectional_layer_put_the_forward_units_first():
    rng = np.random.default_rng(2)
    gru = GRU(3, 4, bidirectional=True, seed=0)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    g = gru.gates(x)
    out, _ = gru.forward(x, grad=False)
    assert g["z"].shape == (1, 5, 2, 8)
    np.testing.assert_allclose(g["h"][0], out, rtol=1e-6, atol=1e-7)


def test_char_model_gates_are_its_gru_gates_on_the_embedded_text():
    from grumpy.lm.model import CharModel, ModelConfig

    m = CharModel(ModelConfig(vocab_size=6, hidden_size=5, num_layers=2, embedding_dim=3), seed=0)
    idx = np.array([[0, 1], [2, 3], [4, 5]])
    g = m.gates(idx)
    logits, h_n = m.forward(idx, grad=False)
    assert g["h"].shape == (2, 3, 2, 5)
    np.testing.assert_allclose(g["h"][:, -1], h_n, rtol=1e-6, atol=1e-7)


# -- --precision -----------------------------------------------------------------


def test_sample_and_eval_take_a_precision(tmp_path, text_file, capsys):
    rc, _, err = run(["train", text_file, "--out", tmp_path / "m", "--max-steps", "6", *TINY], capsys)
    assert rc == 0, err
    ck = tmp_path / "m" / "best.safetensors"
    bits = {}
    for p in ("float32", "bfloat16", "int8"):
        rc, out, err = run(["eval", ck, text_file, "--precision", p, "--json"], capsys)
        assert rc == 0, err
        bits[p] = __import__("json").loads(out)["bits_per_char"]
        rc, out, err = run(["sample", ck, "--precision", p, "--length", "30", "--seed", "3"], capsys)
        assert rc == 0 and len(out.strip()) > 0, err
    assert abs(bits["int8"] - bits["float32"]) < 0.05 and abs(bits["bfloat16"] - bits["float32"]) < 0.05
    from grumpy.cli import main

    with pytest.raises(SystemExit) as e:  # argparse refuses it, naming the choices
        main(["eval", str(ck), str(text_file), "--precision", "float16"])
    assert e.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err


def test_char_model_dropout_reaches_the_head_and_its_gradient_is_exact():
    """Training dropout also masks the head's input (Zaremba et al.); with the masks held
    fixed (the same random stream for each forward), the hand-written gradient matches
    central differences in float64, and evaluation mode draws no mask at all."""
    from gru_helpers import numeric_grad

    from grumpy.lm.model import CharModel, ModelConfig, cross_entropy

    model = CharModel(ModelConfig(vocab_size=7, hidden_size=5, num_layers=2, embedding_dim=3, dropout=0.4,
                                  dtype="float64"), seed=0)
    rng = np.random.default_rng(2)
    idx, y = rng.integers(0, 7, (4, 3)), rng.integers(0, 7, 12)

    def loss() -> float:
        model.gru.rng = np.random.default_rng(9)  # the same masks at every call
        logits, _ = model.forward(idx)
        return cross_entropy(logits.reshape(12, 7), y)[0]

    model.gru.rng = np.random.default_rng(9)
    logits, _ = model.forward(idx)
    _, d = cross_entropy(logits.reshape(12, 7), y)
    model.zero_grad()
    model.backward(d.reshape(4, 3, 7))
    for name in ("head.weight", "embedding.weight", "gru.weight_hh_l1"):
        num = numeric_grad(loss, model.params[name])
        np.testing.assert_allclose(model.grads[name], num, rtol=1e-6, atol=1e-9, err_msg=name)
    # the head's input was masked (some units zeroed) in that forward
    drop = model._cache[2]
    assert drop is not None and (drop == 0).any()
    model.eval()
    a, _ = model.forward(idx, grad=False)
    b, _ = model.forward(idx, grad=False)
    np.testing.assert_array_equal(a, b)  # no mask in evaluation
