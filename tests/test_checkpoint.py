import json
import os
import struct

import numpy as np
import pytest

pytest.importorskip("safetensors")

from grumpy.lm import checkpoint  # noqa: E402
from grumpy.lm.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from grumpy.lm.model import CharModel, ModelConfig  # noqa: E402
from grumpy.optim import Adam  # noqa: E402

VOCAB = "abcdefg\n "


def tiny(seed=0, **kw):
    cfg = dict(vocab_size=len(VOCAB), hidden_size=6, num_layers=2, embedding_dim=4)
    cfg.update(kw)
    return CharModel(ModelConfig(**cfg), seed=seed)


def saved(tmp_path, name="ck.safetensors", **kw):
    m = tiny(**kw)
    p = tmp_path / name
    save_checkpoint(p, m, vocab=VOCAB, meta={"step": 7, "best_val_loss": 1.5})
    return p, m


def test_roundtrip_model_and_meta(tmp_path):
    p, m = saved(tmp_path)
    m2, meta = load_model(p)
    assert meta["step"] == 7 and meta["vocab"] == VOCAB and meta["best_val_loss"] == 1.5
    assert ModelConfig.from_dict(meta["config"]) == m.config
    for k, v in m.params.items():
        assert np.array_equal(v, m2.params[k])
    idx = np.array([[0, 1], [2, 3]])
    assert np.array_equal(m.forward(idx)[0], m2.forward(idx)[0])


@pytest.mark.parametrize("kw", [dict(embedding_dim=0), dict(reset_after=False), dict(dtype="float64"),
                                dict(num_layers=1)])
def test_roundtrip_variants(tmp_path, kw):
    p, m = saved(tmp_path, **kw)
    m2, _ = load_model(p)
    assert m2.config == m.config
    for k, v in m.params.items():
        assert v.dtype == m2.params[k].dtype and np.array_equal(v, m2.params[k])


def test_non_contiguous_arrays_saved_correctly(tmp_path):
    # safetensors 0.8.0 writes the raw buffer of a non-contiguous view: values come back wrong
    # unless save_checkpoint makes them contiguous first.
    m = tiny()
    w = m.params["head.weight"]
    transposed = np.asfortranarray(np.arange(w.size, dtype=w.dtype).reshape(w.shape))
    assert not transposed.flags.c_contiguous
    m._own["head.weight"] = transposed
    hidden = np.arange(2 * 3 * 6, dtype=np.float32).reshape(6, 3, 2).transpose(2, 1, 0)
    p = tmp_path / "t.safetensors"
    save_checkpoint(p, m, vocab=VOCAB, hidden=hidden)
    ck = load_checkpoint(p)
    assert np.array_equal(ck.model.params["head.weight"], transposed)
    assert np.array_equal(ck.hidden, hidden)


def test_optimizer_state_and_names(tmp_path):
    m = tiny()
    opt = Adam(lr=0.01)
    grads = {k: np.ones_like(v) for k, v in m.params.items()}
    opt.step(m.params, grads)
    p = tmp_path / "o.safetensors"
    save_checkpoint(p, m, vocab=VOCAB, optimizer=opt, hidden=np.zeros((2, 3, 6), np.float32))
    from safetensors.numpy import load_file

    names = set(load_file(p))
    assert "gru.weight_ih_l0" in names and "head.weight" in names
    assert "optim.exp_avg.head.weight" in names and "optim.exp_avg_sq.gru.weight_hh_l1" in names
    assert "train.hidden" in names
    ck = load_checkpoint(p)
    assert ck.meta["optimizer"]["name"] == "adam" and ck.meta["optimizer"]["t"] == 1
    for k, v in opt.state_dict().items():
        assert np.array_equal(ck.optim_state[k], v)


def test_save_refuses_non_finite(tmp_path):
    p, m = saved(tmp_path)
    before = p.read_bytes()
    m.params["head.bias"][0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(p, m, vocab=VOCAB)
    assert p.read_bytes() == before


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    p, m = saved(tmp_path)
    before = p.read_bytes()
    real_fsync = os.fsync

    def crash(fd):  # the new bytes are written but the process "dies" before the rename
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    m.params["head.bias"][:] = 42.0
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(p, m, vocab=VOCAB)
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == [p.name]  # no temporary file left behind
    load_model(p)


def test_atomic_write_partial_data(tmp_path, monkeypatch):
    p, m = saved(tmp_path)
    before = p.read_bytes()

    class Dying:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt  # e.g. Ctrl-C while writing

    real_fdopen = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: Dying(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(p, m, vocab=VOCAB)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == [p.name]


def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def test_damaged_files_give_value_errors(tmp_path):
    p, _ = saved(tmp_path)
    raw = p.read_bytes()
    cases = {
        "empty": b"",
        "tiny": b"abc",
        "truncated": raw[: len(raw) // 2],
        "truncated_header": raw[:20],
        "cut_last_byte": raw[:-1],
        "huge_header_len": struct.pack("<Q", 2**63) + raw[8:],
        "header_len_past_end": struct.pack("<Q", len(raw)) + raw[8:],
        "garbage_header": raw[:8] + b"\xff" * (len(raw) - 8),
        "json_array": struct.pack("<Q", 2) + b"[]",
    }
    rng = np.random.default_rng(0)
    for i in range(20):
        cases[f"random{i}"] = rng.bytes(int(rng.integers(0, 5000)))
    for name, data in cases.items():
        q = tmp_path / f"{name}.safetensors"
        q.write_bytes(data)
        with pytest.raises(ValueError):
            load_model(q)
    with pytest.raises(ValueError, match="no such file"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="directory"):
        load_model(tmp_path)


def test_foreign_safetensors_file(tmp_path):
    from safetensors.numpy import save_file

    q = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros((3, 3), np.float32)}, q, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a grumpy checkpoint"):
        load_model(q)
    save_file({"weight": np.zeros((3, 3), np.float32)}, q)
    with pytest.raises(ValueError, match="not a grumpy checkpoint"):
        load_model(q)
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    save_torch({"w": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(q))  # a dtype NumPy lacks
    with pytest.raises(ValueError, match="not a grumpy checkpoint"):
        load_model(q)


def test_hostile_headers(tmp_path):
    p, _ = saved(tmp_path)

    def absurd_shape(h):
        h["head.weight"]["shape"] = [2**40, 2**40]

    def absurd_config(h):
        meta = json.loads(h["__metadata__"]["grumpy"])
        meta["config"]["hidden_size"] = 10**9
        h["__metadata__"]["grumpy"] = json.dumps(meta)

    def bad_offsets(h):
        h["head.bias"]["data_offsets"] = [0, 10**12]

    def negative_dim(h):
        h["head.bias"]["shape"] = [-1]

    def bad_dtype(h):
        h["head.bias"]["dtype"] = "X99"

    def missing_param(h):
        del h["head.bias"]

    def bad_vocab(h):
        meta = json.loads(h["__metadata__"]["grumpy"])
        meta["vocab"] = "aa"
        h["__metadata__"]["grumpy"] = json.dumps(meta)

    def bad_meta_json(h):
        h["__metadata__"]["grumpy"] = "{not json"

    def bad_config_type(h):
        meta = json.loads(h["__metadata__"]["grumpy"])
        meta["config"] = {"vocab_size": "9"}
        h["__metadata__"]["grumpy"] = json.dumps(meta)

    def unknown_config_key(h):
        meta = json.loads(h["__metadata__"]["grumpy"])
        meta["config"]["evil"] = 1
        h["__metadata__"]["grumpy"] = json.dumps(meta)

    def bad_step(h):
        meta = json.loads(h["__metadata__"]["grumpy"])
        meta["step"] = -3
        h["__metadata__"]["grumpy"] = json.dumps(meta)

    for mutate in (absurd_shape, absurd_config, bad_offsets, negative_dim, bad_dtype, missing_param, bad_vocab,
                   bad_meta_json, bad_config_type, unknown_config_key, bad_step):
        q = tmp_path / f"{mutate.__name__}.safetensors"
        q.write_bytes(p.read_bytes())
        _rewrite_header(q, mutate)
        with pytest.raises(ValueError):
            load_model(q)


def test_nan_weights_rejected(tmp_path):
    m = tiny()
    p = tmp_path / "nan.safetensors"
    save_checkpoint(p, m, vocab=VOCAB)
    # patch a NaN into the stored bytes of head.bias
    raw = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = json.loads(raw[8:8 + n])["head.bias"]["data_offsets"][0]
    raw[8 + n + begin: 8 + n + begin + 4] = np.array([np.nan], np.float32).tobytes()
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="non-finite"):
        load_model(p)


def test_bit_flips_never_crash(tmp_path):
    p, _ = saved(tmp_path)
    raw = p.read_bytes()
    rng = np.random.default_rng(1)
    for i in range(30):
        data = bytearray(raw)
        for j in rng.integers(0, len(raw), size=3):
            data[j] ^= 1 << int(rng.integers(8))
        q = tmp_path / f"flip{i}.safetensors"
        q.write_bytes(bytes(data))
        try:
            load_model(q)
        except ValueError:
            pass
