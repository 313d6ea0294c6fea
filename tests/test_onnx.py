"""ONNX export: onnxruntime running the exported graph must agree with grumpy."""

import json

import numpy as np
import pytest

from grumpy import GRU
from grumpy.lm.model import CharModel, ModelConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from grumpy import cli  # noqa: E402
from grumpy.interop.onnx import export_char_model, export_gru  # noqa: E402

TOL = 1e-5


def session(model):
    opts = ort.SessionOptions()
    # Quiet the notice that the optional state input is an overridable initializer.
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def randomise(gru, seed):
    rng = np.random.default_rng(seed)
    gru.load_state_dict({k: rng.uniform(-0.8, 0.8, v.shape) for k, v in gru.params.items()})
    return gru


GRU_FORMS = [  # (num_layers, bidirectional, reset_after, bias, batch_first)
    (1, False, True, True, False),
    (1, False, False, True, False),
    (2, True, True, True, False),
    (2, True, False, True, True),
    (3, False, False, False, False),
    (2, True, True, False, True),
]


@pytest.mark.parametrize("num_layers,bidirectional,reset_after,bias,batch_first", GRU_FORMS)
def test_exported_gru_agrees(num_layers, bidirectional, reset_after, bias, batch_first):
    g = randomise(GRU(3, 5, num_layers, bidirectional=bidirectional, reset_after=reset_after, bias=bias,
                      batch_first=batch_first), seed=num_layers).eval()
    sess = session(export_gru(g))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 7, 3) if batch_first else (7, 4, 3)).astype(np.float32)
    h0 = rng.standard_normal((num_layers * g.num_directions, 4, 5)).astype(np.float32)
    y, h_n = g(x, h0)
    oy, oh_n = sess.run(["y", "h_n"], {"x": x, "h0": h0})
    np.testing.assert_allclose(oy, y, atol=TOL, rtol=0)
    np.testing.assert_allclose(oh_n, h_n, atol=TOL, rtol=0)
    # Without h0 the graph starts from zeros, as grumpy does.
    y0, h_n0 = g(x)
    oy0, oh_n0 = sess.run(["y", "h_n"], {"x": x})
    np.testing.assert_allclose(oy0, y0, atol=TOL, rtol=0)
    np.testing.assert_allclose(oh_n0, h_n0, atol=TOL, rtol=0)


@pytest.mark.parametrize("num_layers,bidirectional,reset_after,bias,batch_first", GRU_FORMS)
def test_sequence_lens_agrees_with_lengths(num_layers, bidirectional, reset_after, bias, batch_first):
    """A padded batch with sequence_lens fed: the runtime gives grumpy's lengths results
    (zeros past each length, h_n from the last valid step, the reverse direction
    starting there), for both gate forms and bidirectional stacks."""
    g = randomise(GRU(3, 5, num_layers, bidirectional=bidirectional, reset_after=reset_after, bias=bias,
                      batch_first=batch_first), seed=num_layers + 10).eval()
    model = export_gru(g)
    assert [i.name for i in model.graph.input] == ["x", "h0", "sequence_lens"]
    sess = session(model)
    rng = np.random.default_rng(5)
    lengths = np.array([7, 2, 1, 5, 7], np.int32)
    x = rng.standard_normal((5, 7, 3) if batch_first else (7, 5, 3)).astype(np.float32)
    h0 = rng.standard_normal((num_layers * g.num_directions, 5, 5)).astype(np.float32)
    y, h_n = g(x, h0, lengths=lengths)
    oy, oh_n = sess.run(["y", "h_n"], {"x": x, "h0": h0, "sequence_lens": lengths})
    np.testing.assert_allclose(oy, y, atol=TOL, rtol=0)
    np.testing.assert_allclose(oh_n, h_n, atol=TOL, rtol=0)
    full, _ = g(x, h0)
    assert np.abs(oy - full).max() > 1e-2  # the lengths made a difference
    # left out, every sequence runs all T steps
    oy_all, _ = sess.run(["y", "h_n"], {"x": x, "h0": h0})
    np.testing.assert_allclose(oy_all, full, atol=TOL, rtol=0)


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_operator_attributes_and_that_they_matter(reset_after):
    g = randomise(GRU(3, 4, 2, bidirectional=True, reset_after=reset_after), seed=3).eval()
    model = export_gru(g)
    nodes = [n for n in model.graph.node if n.op_type == "GRU"]
    assert len(nodes) == 2
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["linear_before_reset"] == int(reset_after)
        assert attrs["direction"] == b"bidirectional"
        assert attrs["hidden_size"] == 4
    x = np.random.default_rng(1).standard_normal((6, 2, 3)).astype(np.float32)
    y, _ = g(x)
    # The other value of linear_before_reset is a different model: this test can tell them apart.
    for n in nodes:
        for a in n.attribute:
            if a.name == "linear_before_reset":
                a.i = 1 - a.i
    wrong, _ = session(model).run(["y", "h_n"], {"x": x})
    assert np.abs(wrong - y).max() > 1e-3


CHAR_FORMS = [  # (embedding_dim, num_layers, reset_after)
    (8, 2, True),
    (0, 2, False),
    (0, 1, True),
    (6, 1, False),
]

VOCAB = list("\n !abcdefghij\u00e9")  # 14 characters, a newline and a non-ASCII one included


def char_model(embedding_dim, num_layers, reset_after, seed=0):
    cfg = ModelConfig(vocab_size=len(VOCAB), hidden_size=12, num_layers=num_layers,
                      embedding_dim=embedding_dim, reset_after=reset_after, dropout=0.0)
    m = CharModel(cfg, seed=seed).eval()
    rng = np.random.default_rng(seed)
    # Larger weights than the default initialisation, so that the gates saturate and differ.
    m.load_state_dict({k: rng.uniform(-1, 1, v.shape).astype(v.dtype) for k, v in m.params.items()})
    return m


@pytest.mark.parametrize("embedding_dim,num_layers,reset_after", CHAR_FORMS)
def test_char_model_full_sequence(tmp_path, embedding_dim, num_layers, reset_after):
    m = char_model(embedding_dim, num_layers, reset_after)
    path = tmp_path / "model.onnx"
    export_char_model(m, path, vocab=VOCAB)
    loaded = onnx.load(str(path))
    meta = {p.key: p.value for p in loaded.metadata_props}
    assert json.loads(meta["grumpy.vocab"]) == VOCAB
    assert ModelConfig.from_dict(json.loads(meta["grumpy.config"])) == m.config
    gathers = [n for n in loaded.graph.node if n.op_type in ("Gather", "OneHot")]
    assert [n.op_type for n in gathers] == ["Gather" if embedding_dim else "OneHot"]
    sess = session(loaded)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, len(VOCAB), (9, 3))
    h0 = rng.standard_normal((num_layers, 3, 12)).astype(np.float32)
    logits, h_n = m(ids, h0)
    ol, oh = sess.run(["logits", "h_n"], {"input_ids": ids, "h0": h0})
    np.testing.assert_allclose(ol, logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(oh, h_n, atol=TOL, rtol=0)
    ol0, _ = sess.run(["logits", "h_n"], {"input_ids": ids})
    np.testing.assert_allclose(ol0, m(ids)[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("embedding_dim,num_layers,reset_after", CHAR_FORMS[:2])
def test_char_model_step_by_step_generation(embedding_dim, num_layers, reset_after):
    """Greedy generation one step at a time, state fed back: the runtime and grumpy
    agree at every step, and with grumpy's full-sequence run over the same text."""
    m = char_model(embedding_dim, num_layers, reset_after, seed=1)
    sess = session(export_char_model(m, vocab=VOCAB))
    steps = 25
    cur = np.array([[3, 7]])  # (1, B)
    h_ort, h_np = None, None
    fed, step_logits = [cur], []
    for _ in range(steps):
        feeds = {"input_ids": cur} if h_ort is None else {"input_ids": cur, "h0": h_ort}
        ol, h_ort = sess.run(["logits", "h_n"], feeds)
        logits, h_np = m(cur, h_np)
        np.testing.assert_allclose(ol, logits, atol=TOL, rtol=0)
        np.testing.assert_allclose(h_ort, h_np, atol=TOL, rtol=0)
        step_logits.append(ol[0])
        cur = ol[0].argmax(-1)[None, :]
        fed.append(cur)
    full, _ = m(np.concatenate(fed[:-1]))
    np.testing.assert_allclose(np.stack(step_logits), full, atol=TOL, rtol=0)
    assert len({tuple(c[0]) for c in fed}) > 1  # it generated more than one character


@pytest.mark.parametrize("embedding_dim,num_layers,reset_after", CHAR_FORMS[:2])
def test_char_model_sequence_lens(embedding_dim, num_layers, reset_after):
    m = char_model(embedding_dim, num_layers, reset_after, seed=3)
    sess = session(export_char_model(m, vocab=VOCAB))
    ids = np.random.default_rng(6).integers(0, len(VOCAB), (8, 3))
    lengths = np.array([3, 8, 5], np.int32)
    out, h_n = m.gru.forward(m._embed(ids), lengths=lengths, grad=False)
    logits = out @ m.params["head.weight"].T + m.params["head.bias"]
    ol, oh = sess.run(["logits", "h_n"], {"input_ids": ids, "sequence_lens": lengths})
    np.testing.assert_allclose(ol, logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(oh, h_n, atol=TOL, rtol=0)


def test_export_bad_input(tmp_path):
    g = GRU(2, 3)
    with pytest.raises(ValueError, match=r"dtype: expected float32 or float64 .* got float16"):
        export_gru(g, dtype=np.float16)
    with pytest.raises(ValueError, match=r"opset: expected an integer in \[15, \d+\], got 13"):
        export_gru(g, opset=13)
    with pytest.raises(ValueError, match="expected a grumpy.GRU, got dict"):
        export_gru({})
    m = char_model(0, 1, True)
    with pytest.raises(ValueError, match=r"vocab: expected 14 strings .* got 3 items"):
        export_char_model(m, vocab="abc")
    with pytest.raises(ValueError, match="expected a grumpy.lm.model.CharModel, got GRU"):
        export_char_model(g)


def test_float64_export_is_valid_onnx():
    """A double graph is valid ONNX (onnxruntime's GRU runs float32 only, so it is not run here)."""
    model = export_gru(GRU(2, 3, dtype=np.float64), dtype=np.float64)
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


# -- the `grumpy export` command ----------------------------------------------

@pytest.fixture
def fake_checkpoints(monkeypatch):
    """Stand-in for grumpy.lm.checkpoint.load_model: 'good.ckpt' loads, anything else is refused."""
    m = char_model(8, 2, True, seed=2)

    def load_model(path):
        if str(path).endswith("good.ckpt"):
            return m, {"vocab": VOCAB}
        raise ValueError(f"{path} is not a grumpy checkpoint")

    from grumpy.cli import export

    monkeypatch.setattr(export, "load_model", load_model)
    return m


def test_cli_export(tmp_path, capsys, fake_checkpoints):
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(tmp_path / "good.ckpt"), str(out)]) == 0
    assert "linear_before_reset=1" in capsys.readouterr().out
    ids = np.arange(10).reshape(5, 2) % len(VOCAB)
    ol, _ = session(onnx.load(str(out))).run(["logits", "h_n"], {"input_ids": ids})
    np.testing.assert_allclose(ol, fake_checkpoints(ids)[0], atol=TOL, rtol=0)

    before = out.read_bytes()
    assert cli.main(["export", str(tmp_path / "good.ckpt"), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert cli.main(["export", str(tmp_path / "good.ckpt"), str(out), "--force"]) == 0

    assert cli.main(["export", str(tmp_path / "other.bin"), str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grumpy export: error: cannot load checkpoint") and "not a grumpy checkpoint" in err
    assert not (tmp_path / "x.onnx").exists()

    good = str(tmp_path / "good.ckpt")
    assert cli.main(["export", good, str(tmp_path / "y.onnx"), "--opset", "9"]) == 2
    assert "opset: expected an integer in [15," in capsys.readouterr().err
    assert cli.main(["export", good, str(tmp_path / "no" / "y.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    """Through the real checkpoint loader (skipped until grumpy.lm.checkpoint exists)."""
    pytest.importorskip("grumpy.lm.checkpoint")
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    assert cli.main(["export", str(bogus), str(tmp_path / "m.onnx")]) == 2
    assert "grumpy export: error: cannot load checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
