import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors")

import grumpy.lm.loop as gtrain  # noqa: E402
from grumpy.lm.checkpoint import load_checkpoint, load_model  # noqa: E402
from grumpy.cli import main  # noqa: E402
from grumpy.lm.data import Vocab  # noqa: E402
from grumpy.lm import TrainConfig, estimate_loss, evaluate, sample, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "8", "--num-layers", "2", "--embedding-dim", "4", "--batch-size", "4", "--seq-len", "8",
        "--eval-every", "3", "--sample-every", "3", "--sample-length", "10", "--log-every", "1"]


@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    words = "the king queen lord sweet love night day death heart".split()
    lines = [" ".join(rng.choice(words, 6)) for _ in range(80)]
    p = tmp_path / "tiny.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def tiny_cfg(text_file, out, **kw):
    c = dict(text_file=str(text_file), out_dir=str(out), hidden_size=8, num_layers=2, embedding_dim=4,
             batch_size=4, seq_len=8, eval_every=3, sample_every=100, sample_length=0, log_every=1,
             time_budget=None, max_steps=8)
    c.update(kw)
    return TrainConfig(**c)


def weights(path):
    ck = load_checkpoint(path)
    return ck.model.params, ck.optim_state, ck.hidden


def assert_same(a, b):
    pa, oa, ha = a
    pb, ob, hb = b
    assert pa.keys() == pb.keys() and oa.keys() == ob.keys()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
    for k in oa:
        assert np.array_equal(oa[k], ob[k]), k
    assert np.array_equal(ha, hb)


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- end to end -----------------------------------------------------------------


def test_end_to_end_train_sample_eval(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(["train", text_file, "--out", out, "--max-steps", "6", *TINY], capsys)
    assert rc == 0, err
    for name in ("latest.safetensors", "best.safetensors", "metrics.jsonl"):
        assert (out / name).exists()
    assert "grumpy sample" in stdout and str(out / "best.safetensors") in stdout
    assert "bits/char" in stdout and "sample" in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    model, meta = load_model(out / "latest.safetensors")
    assert meta["step"] == 6 and meta["vocab"] == Vocab.from_text(text_file.read_text()).chars

    rc, stdout, err = run(["sample", out / "best.safetensors", "--length", "40", "--prime", "the ", "--seed", "1"],
                          capsys)
    assert rc == 0, err
    assert stdout.startswith("the ") and len(stdout) == len("the ") + 40 + 1

    rc, stdout, err = run(["eval", out / "best.safetensors", text_file, "--json"], capsys)
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["chars"] == len(text_file.read_text()) - 1
    assert math.isclose(r["bits_per_char"], r["loss_nats"] / math.log(2))
    assert 0 < r["loss_nats"] < math.log(len(meta["vocab"])) + 0.5
    rc, stdout, _ = run(["eval", out / "best.safetensors", text_file], capsys)
    assert rc == 0 and "nats/char" in stdout and "bits/char" in stdout


def test_python_module_entry_point(tmp_path, text_file):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "grumpy", "train", str(text_file), "--out", str(tmp_path / "r"),
                        "--max-steps", "2", *TINY], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "grumpy sample" in r.stdout


def test_loss_plot_written(tmp_path, text_file, capsys):
    pytest.importorskip("matplotlib")
    rc, _, err = run(["train", text_file, "--out", tmp_path / "r", "--max-steps", "3", *TINY], capsys)
    assert rc == 0, err
    assert (tmp_path / "r" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- exact resume ---------------------------------------------------------------


def test_resume_is_exact_via_cli(tmp_path, text_file, capsys):
    common = [*TINY, "--schedule", "constant", "--warmup-steps", "2"]
    rc, _, err = run(["train", text_file, "--out", tmp_path / "once", "--max-steps", "10", *common], capsys)
    assert rc == 0, err
    rc, _, err = run(["train", text_file, "--out", tmp_path / "split", "--max-steps", "4", *common], capsys)
    assert rc == 0, err
    rc, _, err = run(["train", "--resume", tmp_path / "split" / "latest.safetensors", "--max-steps", "10"], capsys)
    assert rc == 0, err
    assert load_model(tmp_path / "split" / "latest.safetensors")[1]["step"] == 10
    assert_same(weights(tmp_path / "once" / "latest.safetensors"), weights(tmp_path / "split" / "latest.safetensors"))
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))


@pytest.mark.parametrize("opt", ["adam", "sgd", "rmsprop"])
def test_resume_is_exact_with_cosine_dropout_and_epochs(tmp_path, text_file, opt):
    # 30 steps of 8 x 16 characters pass the ~2.2k-character training split more than once, so the
    # epoch boundary (state reset, new stream offsets) is crossed, as is the interruption.
    kw = dict(max_steps=30, dropout=0.3, weight_drop=0.2, optimizer=opt, lr=0.01, warmup_steps=5, eval_every=7, batch_size=8,
              seq_len=16)
    once = train(tiny_cfg(text_file, tmp_path / "once", **kw), progress=False, log=lambda m: None)
    assert once.step == 30 and once.stopped == "max_steps"
    cfg = tiny_cfg(text_file, tmp_path / "split", **kw)
    first = train(cfg, stop_after=13, progress=False, log=lambda m: None)
    assert first.step == 13 and first.stopped == "stop_after"
    ck = load_checkpoint(first.latest)
    assert ck.meta["data_position"]["epoch"] == 0
    second = train(cfg, resume=first.latest, progress=False, log=lambda m: None)
    assert second.step == 30
    assert load_checkpoint(second.latest).meta["data_position"]["epoch"] >= 1
    assert_same(weights(once.latest), weights(second.latest))


def test_max_steps_counts_steps_before_resume(tmp_path, text_file, capsys):
    rc, _, _ = run(["train", text_file, "--out", tmp_path / "r", "--max-steps", "4", *TINY], capsys)
    assert rc == 0
    before = (tmp_path / "r" / "latest.safetensors").read_bytes()
    rc, stdout, _ = run(["train", "--resume", tmp_path / "r" / "latest.safetensors"], capsys)
    assert rc == 0 and "nothing to do" in stdout
    assert (tmp_path / "r" / "latest.safetensors").read_bytes() == before


def test_resume_refuses_other_vocab_or_architecture(tmp_path, text_file, capsys):
    rc, _, _ = run(["train", text_file, "--out", tmp_path / "r", "--max-steps", "2", *TINY], capsys)
    assert rc == 0
    ck = tmp_path / "r" / "latest.safetensors"
    before = ck.read_bytes()
    other = tmp_path / "other.txt"
    other.write_text("XYZ xyz 123! " * 300, encoding="utf-8")
    rc, _, err = run(["train", other, "--resume", ck, "--max-steps", "4"], capsys)
    assert rc == 2 and "vocabulary" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run(["train", "--resume", ck, "--hidden-size", "16", "--max-steps", "4"], capsys)
    assert rc == 2 and "--hidden-size 16" in err
    rc, _, err = run(["train", "--resume", ck, "--optimizer", "sgd", "--max-steps", "4"], capsys)
    assert rc == 2 and "--optimizer sgd" in err
    rc, _, err = run(["train", "--resume", tmp_path / "nope.safetensors"], capsys)
    assert rc == 2 and "nope.safetensors" in err
    assert ck.read_bytes() == before


# -- interruption and failures --------------------------------------------------


def test_ctrl_c_writes_checkpoint_and_exits_cleanly(tmp_path, text_file):
    out = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "grumpy", "train", str(text_file), "--out", str(out),
                          "--max-steps", "1000000", *TINY[:-6], "--eval-every", "100000", "--log-every", "1"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "interrupted" in stdout and "--resume" in stdout
    _, meta = load_model(out / "latest.safetensors")
    assert meta["step"] >= 3
    assert "Traceback" not in stderr


def test_non_finite_step_is_rejected(tmp_path, text_file, monkeypatch):
    real = gtrain.cross_entropy
    calls = {"n": 0}

    def flaky(logits, targets):
        calls["n"] += 1
        loss, d = real(logits, targets)
        return (float("nan"), d) if calls["n"] == 3 else (loss, d)

    monkeypatch.setattr(gtrain, "cross_entropy", flaky)
    msgs = []
    res = train(tiny_cfg(text_file, tmp_path / "r", max_steps=5), progress=False, log=msgs.append)
    assert res.step == 5 and res.stopped == "max_steps"
    assert any("non-finite loss" in m and "rejected" in m for m in msgs)
    params = load_checkpoint(res.latest).model.params
    assert all(np.all(np.isfinite(v)) for v in params.values())


def test_repeated_non_finite_stops_and_keeps_last_good_checkpoint(tmp_path, text_file, monkeypatch, capsys):
    rc, _, _ = run(["train", text_file, "--out", tmp_path / "r", "--max-steps", "3", *TINY], capsys)
    ck = tmp_path / "r" / "latest.safetensors"
    before = ck.read_bytes()

    def broken_backward(self, d_logits, d_h_n=None):
        for g in self.grads.values():
            g[...] = np.inf
        return np.zeros((self.config.num_layers, d_logits.shape[1], self.config.hidden_size), self.dtype)

    monkeypatch.setattr(gtrain.CharModel, "backward", broken_backward)
    rc, stdout, _ = run(["train", "--resume", ck, "--max-steps", "20"], capsys)
    assert rc == 1
    assert "non-finite gradient" in stdout and "last good checkpoint" in stdout
    assert ck.read_bytes() == before


def test_overflowing_update_never_reaches_a_checkpoint(tmp_path, text_file):
    msgs = []
    res = train(tiny_cfg(text_file, tmp_path / "r", optimizer="sgd", lr=1e39, clip_norm=None, warmup_steps=0),
                progress=False, log=msgs.append)
    assert res.stopped == "non_finite" and res.step == 0
    assert res.latest is None and res.best is None
    assert any("non-finite" in m for m in msgs)


def test_time_budget_stops_the_run(tmp_path, text_file, capsys):
    t0 = time.perf_counter()
    rc, stdout, _ = run(["train", text_file, "--out", tmp_path / "r", "--time-budget", "1", *TINY], capsys)
    assert rc == 0 and "time budget" in stdout
    assert time.perf_counter() - t0 < 20


# -- bad input ------------------------------------------------------------------


def bad_cases(tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be", encoding="utf-8")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"hello " * 50 + "caf\u00e9".encode("latin-1") + b" more" * 500)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 20)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return [
        (["train", empty], "empty"),
        (["train", short], "too short"),
        (["train", latin], "byte offset 303"),
        (["train", binary], "UTF-8"),
        (["train", tmp_path / "missing.txt"], "no such file"),
        (["train", text_file, "--hidden-size", "0"], "--hidden-size"),
        (["train", text_file, "--num-layers", "-1"], "--num-layers"),
        (["train", text_file, "--batch-size", "0"], "--batch-size"),
        (["train", text_file, "--seq-len", "0"], "--seq-len"),
        (["train", text_file, "--lr", "0"], "--lr"),
        (["train", text_file, "--lr", "-0.1"], "--lr"),
        (["train", text_file, "--lr", "nan"], "--lr"),
        (["train", text_file, "--clip-norm", "0"], "--clip-norm"),
        (["train", text_file, "--max-steps", "0"], "--max-steps"),
        (["train", text_file, "--time-budget", "-5"], "--time-budget"),
        (["train", text_file, "--eval-every", "0"], "--eval-every"),
        (["train", text_file, "--dropout", "1.5"], "--dropout"),
        (["train", text_file, "--weight-drop", "-0.1"], "--weight-drop"),
        (["train", text_file, "--threads", "-1"], "--threads"),
        (["train", text_file, "--out", blocker / "sub"], "--out"),
        (["train", text_file, "--out", blocker], "--out"),
        (["sample", text_file], "CHECKPOINT"),
        (["eval", tmp_path / "missing.safetensors", text_file], "CHECKPOINT"),
    ]


def test_bad_input_one_line_exit_2(tmp_path, text_file, capsys):
    for argv, expected in bad_cases(tmp_path, text_file):
        if argv[0] == "train":  # tiny sizes first, so the bad value given later wins
            argv = [*argv[:2], *TINY, "--max-steps", "2", *argv[2:]]
        rc, stdout, err = run(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith(f"grumpy {argv[0]}: error:"), (argv, err)
        assert expected in lines[0], (argv, lines[0])


def test_unwritable_out_dir(tmp_path, text_file, capsys):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = run(["train", text_file, "--out", ro, "--max-steps", "2", *TINY], capsys)
        assert rc == 2 and "--out" in err and "not writable" in err
    finally:
        ro.chmod(0o700)


def test_existing_run_is_not_overwritten(tmp_path, text_file, capsys):
    rc, _, _ = run(["train", text_file, "--out", tmp_path / "r", "--max-steps", "2", *TINY], capsys)
    assert rc == 0
    files = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    rc, _, err = run(["train", text_file, "--out", tmp_path / "r", "--max-steps", "2", *TINY], capsys)
    assert rc == 2 and "--resume" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == files


def test_default_out_dir_never_reuses_a_run(tmp_path, text_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        rc, out, _ = run(["train", text_file, "--max-steps", "2", *TINY], capsys)
        assert rc == 0
    first, second = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny-2"
    assert (first / "latest.safetensors").exists() and (second / "latest.safetensors").exists()
    assert str(Path("runs") / "tiny-2" / "best.safetensors") in out


# -- sample and eval ------------------------------------------------------------


@pytest.fixture
def trained(tmp_path, text_file, capsys):
    rc, _, _ = run(["train", text_file, "--out", tmp_path / "m", "--max-steps", "6", *TINY], capsys)
    assert rc == 0
    return tmp_path / "m" / "best.safetensors"


def test_sample_greedy_and_seeded(trained, capsys):
    outs = [run(["sample", trained, "--temperature", "0", "--length", "30", "--seed", s], capsys)[1]
            for s in ("1", "2")]
    assert outs[0] == outs[1] and len(outs[0]) == 31
    a = run(["sample", trained, "--length", "50", "--seed", "7", "--top-k", "5"], capsys)[1]
    b = run(["sample", trained, "--length", "50", "--seed", "7", "--top-k", "5"], capsys)[1]
    assert a == b
    model, meta = load_model(trained)
    assert set(a.rstrip("\n")) <= set(meta["vocab"])


def test_sample_prime_out_of_vocabulary(trained, capsys):
    rc, _, err = run(["sample", trained, "--prime", "the ZQ€"], capsys)
    assert rc == 2 and "'Q'" in err and "'Z'" in err and "'€'" in err and "--prime" in err


@pytest.mark.parametrize("argv,opt", [(["--length", "-1"], "--length"), (["--temperature", "-1"], "--temperature"),
                                      (["--top-k", "0"], "--top-k"), (["--top-p", "0"], "--top-p")])
def test_sample_bad_options(trained, capsys, argv, opt):
    rc, _, err = run(["sample", trained, *argv], capsys)
    assert rc == 2 and opt in err


def test_sample_function_streams(trained):
    model, meta = load_model(trained)
    it = sample(model, meta["vocab"], length=5, seed=0)
    chars = list(it)
    assert len(chars) == 5 and all(len(c) == 1 for c in chars)
    with pytest.raises(ValueError, match="prime"):
        sample(model, meta["vocab"], prime="\x01")


def test_eval_out_of_vocabulary(trained, tmp_path, capsys):
    p = tmp_path / "odd.txt"
    p.write_text("the king € Ω", encoding="utf-8")
    rc, _, err = run(["eval", trained, p], capsys)
    assert rc == 2 and "not in the model's vocabulary" in err and "'€'" in err and "'Ω'" in err


def test_estimate_loss_matches_one_long_sequence(trained):
    # With one stream, carrying the state across windows must equal a single forward over the whole text.
    model, meta = load_model(trained)
    ids = Vocab(meta["vocab"]).encode("the king and the queen love the night\nsweet day\n" * 3)
    windowed = estimate_loss(model, ids, batch_size=1, seq_len=7)
    logits, _ = model.forward(ids[:-1, None])
    direct, _ = gtrain.cross_entropy(logits, ids[1:, None])
    assert windowed == pytest.approx(direct, rel=1e-5)
    # many streams: every character still counted once
    r = evaluate(model, "the king\n" * 20, vocab=meta["vocab"], batch_size=6, seq_len=5)
    assert r["chars"] == len("the king\n" * 20) - 1


def test_sample_to_a_closed_pipe(trained):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "grumpy", "sample", str(trained), "--length", "100000"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(10)) == 10  # streamed: output arrives long before 100000 characters are drawn
    p.stdout.close()
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=60) == 0
    assert "Traceback" not in err


def test_blas_threads_limit():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from grumpy.kernels.blas import blas_threads  # the one home of thread limits (train() uses it)

    with blas_threads(1):
        blas = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
        assert all(i["num_threads"] == 1 for i in blas)
    with blas_threads(None):
        pass


def test_old_import_path_still_works_for_one_release():
    import importlib
    import sys

    sys.modules.pop("grumpy.train", None)
    with pytest.warns(DeprecationWarning, match="grumpy.lm"):
        old = importlib.import_module("grumpy.train")
    assert old.train is train and old.sample is sample and old.evaluate is evaluate
