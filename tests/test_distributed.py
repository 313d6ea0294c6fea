"""Data-parallel training (grumpy/lm/distributed.py, docs/distributed.md).

Without MPI (always): a batch sharded among K ranks in one process, the gradients
averaged by hand through the same pack/unpack the MPI path uses, equals one process
on the whole batch; and the whole train() loop on K ranks that are threads of this
process (ThreadComm: the part of an mpi4py communicator grumpy uses) equals one
process, and agrees on bad input. With mpiexec and mpi4py (the mpi extra; skipped without them):
2 ranks against 1 process through the command line, resuming on another number of
ranks, and the faults: a rank killed, Ctrl-C, bad input on one rank.
"""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("safetensors")

from grumpy.lm.checkpoint import load_checkpoint  # noqa: E402
from grumpy.lm.config import TrainConfig  # noqa: E402
from grumpy.lm.data import StreamBatcher, Vocab  # noqa: E402
from grumpy.kernels.blas import blas_threads  # noqa: E402
from grumpy.lm.distributed import AgreedError, Team, columns, cores_per_rank, flat_size, pack, shard, unpack  # noqa: E402
from grumpy.lm.generate import estimate_loss, loss_sums  # noqa: E402
from grumpy.lm.loop import apply_gradients, local_gradients, train, train_step  # noqa: E402
from grumpy.lm.model import CharModel  # noqa: E402
from grumpy.optim import make_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = {"float64": 1e-12, "float32": 1e-5}


def corpus(n_lines=120, seed=0):
    rng = np.random.default_rng(seed)
    words = "the king queen lord sweet love night day death heart".split()
    return "\n".join(" ".join(rng.choice(words, 6)) for _ in range(n_lines)) + "\n"


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# -- without MPI: the arithmetic, isolated from the transport ---------------------------


# Adam's first step is lr * g / (|g| + eps) element by element: a gradient entry that rounding
# dominates (its exact value near 0) moves by up to lr whichever way rounding went, so after Adam
# float32 parameters measure the optimiser's conditioning, not the sharding (the same run gave
# 3e-6 to 1.1e-5 on different CPUs). float64 keeps Adam (rounding 1e-16 stays far below 1e-12);
# float32 takes SGD, whose step is linear in the gradient.
OPTIMIZER = {"float64": "adam", "float32": "sgd"}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("K", [2, 4])
def test_sharded_batch_equals_one_process(dtype, K):
    """K ranks with B/K streams each, gradients averaged, equal one process with B streams:
    the averaged gradient at every step, then the parameters after several steps with
    clipping by norm on (it clips: the norm exceeds 0.05)."""
    text = corpus()
    vocab = Vocab.from_text(text)
    B, T, lr = 8, 10, 1e-2
    cfg = TrainConfig(hidden_size=16, num_layers=2, embedding_dim=8, batch_size=B, seq_len=T, dtype=dtype, dropout=0.0,
                      optimizer=OPTIMIZER[dtype], clip_norm=0.05)
    batcher = StreamBatcher(vocab.encode(text), B, T, seed=0)
    whole, opt = CharModel(cfg.model_config(len(vocab)), seed=1), make_optimizer(cfg.optimizer, lr)
    ranks = [CharModel(cfg.model_config(len(vocab)), seed=1) for _ in range(K)]
    opts = [make_optimizer(cfg.optimizer, lr) for _ in range(K)]
    h = whole.init_state(B)
    hs = [columns(h, *shard(B, r, K)) for r in range(K)]
    for _ in range(6):
        x, y, _ = batcher.next()
        loss, gnorm, h = train_step(whole, opt, cfg, x, y, h, lr)  # leaves whole.grads clipped
        assert gnorm > cfg.clip_norm
        bufs = []
        for r, m in enumerate(ranks):  # each rank: its streams, forward and backward, packed
            b0, b1 = shard(B, r, K)
            m.zero_grad()
            loss_r, hs[r] = local_gradients(m, columns(x, b0, b1), columns(y, b0, b1), hs[r])
            bufs.append(pack(m.grads, np.empty(flat_size(m.grads) + 1, m.dtype), (loss_r,)))
        total = bufs[0].copy()  # what Allreduce(SUM) computes, then Team divides by the size
        for b in bufs[1:]:
            total += b
        total /= K
        for m, o in zip(ranks, opts):
            mean_loss = float(unpack(total, m.grads)[0])
            gnorm_r = apply_gradients(m, o, cfg, lr)
            assert mean_loss == pytest.approx(loss, rel=TOL[dtype])
            assert gnorm_r == pytest.approx(gnorm, rel=TOL[dtype])
        for k, g in whole.grads.items():  # every rank unpacked the same average
            assert rel_err(ranks[0].grads[k], g) <= TOL[dtype], k
    for r, m in enumerate(ranks):
        for k, p in whole.params.items():
            assert rel_err(m.params[k], p) <= TOL[dtype], (r, k)
        assert all(np.array_equal(m.params[k], ranks[0].params[k]) for k in whole.params)  # one model on every rank
    assert rel_err(np.concatenate(hs, axis=1), h) <= TOL[dtype]


def test_evaluation_shares_add_up_to_the_whole():
    text = corpus(40)
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    model = CharModel(TrainConfig(hidden_size=8, num_layers=1, embedding_dim=4, dtype="float64")
                      .model_config(len(vocab)), seed=0)
    whole = estimate_loss(model, ids, batch_size=7, seq_len=9)  # 7 streams and a leftover
    for size in (1, 2, 3, 8):  # 8 ranks: more than streams, some evaluate nothing
        sums = [loss_sums(model, ids, batch_size=7, seq_len=9, share=(r, size)) for r in range(size)]
        total, count = sum(s for s, _ in sums), sum(c for _, c in sums)
        assert count == len(ids) - 1
        assert total / count == pytest.approx(whole, rel=1e-12)


class ThreadComm:
    """Rank ``rank`` of ranks that are threads of this process: the part of an mpi4py
    communicator that grumpy's Team uses, each collective over a barrier, reductions in
    rank order (as MPI's for two ranks)."""

    def __init__(self, world, rank):
        self.world, self.rank = world, rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.world["size"]

    def _exchange(self, item):
        w = self.world
        w["slots"][self.rank] = item
        w["barrier"].wait()
        items = list(w["slots"])
        w["barrier"].wait()
        return items

    def Allreduce(self, _in_place, buf, op):
        items = self._exchange(buf.copy())
        out = items[0].copy()
        for x in items[1:]:
            out = out + x if op == "SUM" else np.maximum(out, x)
        buf[...] = out

    def Bcast(self, buf, root=0):
        buf[...] = self._exchange(buf.copy())[root]

    def Gather(self, send, recv, root=0):
        items = self._exchange(np.array(send, copy=True))
        if self.rank == root:
            recv[...] = np.stack(items)

    def allgather(self, obj):
        return self._exchange(obj)

    def Split_type(self, _kind):
        return self  # all on one machine

    def Free(self):
        pass


FAKE_MPI = SimpleNamespace(IN_PLACE=None, SUM="SUM", MAX="MAX", COMM_TYPE_SHARED=0)


def run_ranks(K, cfg_of_rank, timeout=120):
    """train(cfg_of_rank(r), comm=...) on K ranks that are threads -> (results, errors) by rank."""
    world = {"size": K, "slots": [None] * K, "barrier": threading.Barrier(K, timeout=60)}
    results, errors = [None] * K, [None] * K

    def rank(r):
        try:
            results[r] = train(cfg_of_rank(r), progress=False, log=lambda msg: None,
                               comm=Team(ThreadComm(world, r), mpi=FAKE_MPI))
        except AgreedError as e:  # every rank raises it: nobody is left waiting
            errors[r] = e
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors[r] = e
            world["barrier"].abort()  # the others would wait for this rank

    with blas_threads(os.cpu_count() or 1):  # whatever the ranks set, restored at the end
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(K)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results, errors


@pytest.mark.parametrize("K", [2, 4])
def test_train_on_in_process_ranks_equals_one_process(tmp_path, K):
    """The whole loop (sharding, Allreduce, agreed stop, shared evaluation, gathered state,
    checkpoints) with ranks that are threads: equal to one process on the whole batch."""
    text = tmp_path / "text.txt"
    text.write_text(corpus(), encoding="utf-8")
    cfg = TrainConfig(text_file=str(text), out_dir=str(tmp_path / "one"), hidden_size=16, num_layers=2, dropout=0.0,
                      embedding_dim=8, batch_size=8, seq_len=8, max_steps=7, eval_every=3, eval_batch_size=5,
                      sample_length=0, dtype="float64", time_budget=None, clip_norm=0.5, schedule="constant",
                      warmup_steps=0)
    train(cfg, progress=False, log=lambda msg: None)
    results, errors = run_ranks(K, lambda r: dataclasses.replace(cfg, out_dir=str(tmp_path / "many")))
    assert errors == [None] * K
    assert [res.step for res in results] == [7] * K
    assert results[0].best_val_loss == pytest.approx(train_result_best(tmp_path / "one"), rel=1e-12)
    written = sorted(set(os.listdir(tmp_path / "many")) - {"loss.png"})  # loss.png: with the plot extra
    assert written == ["best.safetensors", "latest.safetensors", "metrics.jsonl"]
    assert_close(tmp_path / "many" / "latest.safetensors", tmp_path / "one" / "latest.safetensors", 1e-12)


def train_result_best(out):
    return load_checkpoint(out / "latest.safetensors").meta["best_val_loss"]


def test_bad_input_on_one_in_process_rank_fails_them_all(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(corpus(), encoding="utf-8")
    cfg = TrainConfig(text_file=str(text), out_dir=str(tmp_path / "out"), hidden_size=8, num_layers=1, dropout=0.0,
                      batch_size=4, seq_len=8, max_steps=2, sample_length=0, time_budget=None)
    missing = str(tmp_path / "missing.txt")
    _, errors = run_ranks(2, lambda r: dataclasses.replace(cfg, text_file=missing if r == 1 else str(text)))
    assert all(isinstance(e, AgreedError) and str(e).startswith("rank 1: TEXT_FILE") for e in errors), errors
    _, errors = run_ranks(2, lambda r: dataclasses.replace(cfg, batch_size=5))
    assert all(isinstance(e, AgreedError) and "--batch-size 5: not divisible by the 2 ranks" in str(e)
               for e in errors), errors


def test_shard_and_pack():
    assert [shard(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match=r"--batch-size 6: not divisible by the 4 ranks"):
        shard(6, 0, 4)
    arrays = {"a": np.arange(6.0).reshape(2, 3), "b": np.arange(4.0)}
    buf = pack(arrays, np.empty(flat_size(arrays) + 2), (7.0, 8.0))
    assert buf.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 7, 8]
    out = {"a": np.zeros((2, 3)), "b": np.zeros(4)}
    assert unpack(buf, out).tolist() == [7, 8]
    assert all(np.array_equal(out[k], arrays[k]) for k in arrays)


def test_a_team_alone_changes_nothing():
    team = Team()
    assert (team.rank, team.size, team.root, team.alone) == (0, 1, True, True)
    g = {"w": np.ones(3)}
    assert team.average_gradients(g, 2.5) == 2.5 and g["w"].tolist() == [1, 1, 1]
    assert team.agree_to_stop(True, 3.0, 1.0) == (True, 3.0, 1.0)
    assert team.sum_floats(1.5, 2.0) == (1.5, 2.0)
    h = np.ones((2, 4, 3))
    assert team.gather_streams(h) is h
    assert team.threads(None) is None and team.threads(3) == 3
    with pytest.raises(ValueError, match="boom"):
        team.agree(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_threads_per_rank(monkeypatch):
    import grumpy.lm.distributed as d

    monkeypatch.setattr(d.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(d.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert [d.cores_per_rank(n) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    monkeypatch.setattr(d.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert d.cores_per_rank(2) == 4  # the launcher bound this rank to 4 cores: those


def test_the_core_never_imports_mpi4py():
    code = ("import sys, grumpy, grumpy.lm.loop, grumpy.lm.distributed, grumpy.cli.train; "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_distributed_outside_mpi_is_a_usage_error(tmp_path):
    (tmp_path / "t.txt").write_text(corpus(), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "grumpy", "train", str(tmp_path / "t.txt"), "--distributed",
                        "--max-steps", "1", "--out", str(tmp_path / "r")], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--distributed:" in r.stderr and "Traceback" not in r.stderr
    assert ("mpi extra" in r.stderr) or ("mpiexec -n N" in r.stderr)
    assert not (tmp_path / "r").exists()


# -- with mpiexec: the real transport ------------------------------------------------------

MPIEXEC = shutil.which("mpiexec")
# dropout 0: with dropout each rank draws its own masks, so ranks equal one process only without it
TINY = ["--dropout", "0", "--hidden-size", "16", "--num-layers", "2", "--embedding-dim", "8", "--seq-len", "8",
        "--batch-size", "4",
        "--eval-every", "3", "--eval-batch-size", "5", "--sample-length", "0", "--no-progress", "--seed", "3",
        "--schedule", "constant", "--warmup-steps", "0", "--clip-norm", "0.5"]


def needs_mpi():
    pytest.importorskip("mpi4py")
    if MPIEXEC is None:
        pytest.skip("no mpiexec on PATH (pip install -e '.[mpi]' brings MPICH's)")


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def grumpy_argv(*args):
    return [sys.executable, "-m", "mpi4py", "-m", "grumpy", "train", *map(str, args)]


def mpirun(n, *args, timeout=90):
    """mpiexec -n n python -m mpi4py -m grumpy train ARGS --distributed -> (rc, stdout, stderr), never hanging."""
    return launch([MPIEXEC, "-n", str(n), *grumpy_argv(*args, "--distributed")], timeout)


def launch(argv, timeout):
    p = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(p)
        raise AssertionError(f"{argv} did not finish in {timeout} s") from None
    return p.returncode, out, err


def stop(p):
    """End an mpiexec we started: Ctrl-C first (hydra passes it on and cleans up), then kill."""
    for sig, wait in ((signal.SIGINT, 5), (signal.SIGINT, 5), (signal.SIGKILL, 5)):
        if p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def one_process(*args, timeout=90):
    r = subprocess.run([sys.executable, "-m", "grumpy", "train", *map(str, args)], env=env(), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(corpus(), encoding="utf-8")
    return p


def assert_close(a, b, tol):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for k, p in cb.model.params.items():
        assert rel_err(ca.model.params[k], p) <= tol, k
    for k, s in cb.optim_state.items():
        assert rel_err(ca.optim_state[k], s) <= tol, k
    assert ca.hidden.shape == cb.hidden.shape and rel_err(ca.hidden, cb.hidden) <= tol
    assert ca.meta["data_position"] == cb.meta["data_position"] and ca.meta["step"] == cb.meta["step"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_ranks_equal_one_process(text, tmp_path, dtype):
    needs_mpi()
    one_process(text, "--out", tmp_path / "one", "--max-steps", 6, "--dtype", dtype, *TINY)
    rc, out, err = mpirun(2, text, "--out", tmp_path / "two", "--max-steps", 6, "--dtype", dtype, *TINY)
    assert rc == 0, err
    assert "the 2 ranks end with bit-identical parameters (checked)" in out
    threads = cores_per_rank(2)  # both ranks on this machine: its cores shared between them
    assert f"2 MPI ranks of 2 streams each, {threads} thread(s) per rank" in out
    assert out.count("stopped (max steps) at step 6") == 1  # rank 0 alone prints
    assert_close(tmp_path / "two" / "latest.safetensors", tmp_path / "one" / "latest.safetensors", TOL[dtype])
    written = sorted(set(os.listdir(tmp_path / "two")) - {"loss.png"})  # loss.png: with the plot extra
    assert written == ["best.safetensors", "latest.safetensors", "metrics.jsonl"]


def test_three_ranks_equal_one_process(text, tmp_path):
    """A number of ranks that is not a power of two (MPI's Allreduce takes other routes)."""
    needs_mpi()
    args = ["--max-steps", 4, "--dtype", "float64", *TINY, "--batch-size", 6]
    one_process(text, "--out", tmp_path / "one", *args)
    rc, out, err = mpirun(3, text, "--out", tmp_path / "three", *args)
    assert rc == 0, err
    assert "the 3 ranks end with bit-identical parameters (checked)" in out
    assert_close(tmp_path / "three" / "latest.safetensors", tmp_path / "one" / "latest.safetensors", 1e-12)


def test_resume_on_another_number_of_ranks(text, tmp_path):
    """The checkpoint holds the whole batch's state: 2 ranks -> 1 process -> 4 ranks equals one run."""
    needs_mpi()
    one_process(text, "--out", tmp_path / "one", "--max-steps", 9, "--dtype", "float64", *TINY)
    rc, _, err = mpirun(2, text, "--out", tmp_path / "r", "--max-steps", 3, "--dtype", "float64", *TINY)
    assert rc == 0, err
    one_process("--resume", tmp_path / "r" / "latest.safetensors", "--max-steps", 6)
    rc, _, err = mpirun(4, "--resume", tmp_path / "r" / "latest.safetensors", "--max-steps", 9)
    assert rc == 0, err
    assert_close(tmp_path / "r" / "latest.safetensors", tmp_path / "one" / "latest.safetensors", 1e-12)
    rc, _, err = mpirun(3, "--resume", tmp_path / "r" / "latest.safetensors", "--max-steps", 12)
    assert rc == 2 and "--batch-size 4: not divisible by the 3 ranks" in err


def rank_pids(out_dir):
    """The ranks' process ids: the python processes whose command line names out_dir."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if os.path.basename(argv[0]).startswith(b"python") and b"mpi4py" in argv and str(out_dir).encode() in argv:
            pids.append(int(d))
    return sorted(pids)


def start_long_run(text, out):
    argv = [MPIEXEC, "-n", "2", *grumpy_argv(text, "--out", out, "--max-steps", 100000, "--time-budget", 120,
                                             "--dtype", "float64", *TINY, "--distributed")]
    p = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not (out / "latest.safetensors").exists() or len(rank_pids(out)) < 2:  # a checkpoint is on disk
        if p.poll() is not None or time.monotonic() - t0 > 60:
            stop(p)
            raise AssertionError(f"the run did not start: {p.communicate()}")
        time.sleep(0.1)
    return p


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_every_rank_and_leaves_a_resumable_checkpoint(text, tmp_path):
    needs_mpi()
    out = tmp_path / "run"
    p = start_long_run(text, out)
    pids = rank_pids(out)
    time.sleep(0.5)
    os.kill(pids[-1], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        stop(p)
        raise AssertionError("the other rank did not end within 30 s of the kill") from None
    assert time.monotonic() - t0 < 30
    assert p.returncode != 0
    deadline = time.monotonic() + 10
    while rank_pids(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not rank_pids(out), "a rank outlived the job"
    step = load_checkpoint(out / "latest.safetensors").meta["step"]  # intact
    rc, _, err = mpirun(2, "--resume", out / "latest.safetensors", "--max-steps", step + 2, "--time-budget", 0)
    assert rc == 0, err
    assert load_checkpoint(out / "latest.safetensors").meta["step"] == step + 2


def test_ctrl_c_stops_every_rank_after_a_step_with_a_checkpoint(text, tmp_path):
    needs_mpi()
    out = tmp_path / "run"
    p = start_long_run(text, out)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)  # to the launcher, as Ctrl-C in a terminal
    try:
        stdout, stderr = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        stop(p)
        raise AssertionError("Ctrl-C did not stop the ranks within 30 s") from None
    assert p.returncode == 0, stderr
    assert stdout.count("interrupted at step") == 1 and "Traceback" not in stderr
    ck = load_checkpoint(out / "latest.safetensors")
    assert f"interrupted at step {ck.meta['step']};" in stdout
    assert ck.hidden.shape == (2, 4, 16)


def test_bad_input_on_one_rank_fails_every_rank_with_one_message(text, tmp_path):
    needs_mpi()
    other = tmp_path / "other.txt"
    other.write_text(corpus(seed=1).upper(), encoding="utf-8")  # another text and vocabulary
    common = ["--max-steps", 3, "--dtype", "float64", *TINY, "--distributed"]
    for rank1_text, says in ((tmp_path / "missing.txt", "rank 1: TEXT_FILE"),
                             (other, "rank 1 read the text or checkpoint different from rank 0's")):
        out = tmp_path / f"out-{rank1_text.stem}"
        rc, stdout, stderr = launch([MPIEXEC, "-n", "1", *grumpy_argv(text, "--out", out, *common), ":",
                                     "-n", "1", *grumpy_argv(rank1_text, "--out", out, *common)], timeout=90)
        assert rc == 2, stderr
        assert stderr.count("error:") == 1 and says in stderr, stderr
        assert "Traceback" not in stderr and "Abort" not in stderr
        assert not (out / "latest.safetensors").exists()
    rc, _, stderr = mpirun(2, text, "--out", tmp_path / "odd", "--batch-size", 5, "--max-steps", 2)
    assert rc == 2 and stderr.count("error:") == 1
    assert "--batch-size 5: not divisible by the 2 ranks" in stderr
