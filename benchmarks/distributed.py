"""Data-parallel training on one machine: 1 process x 2 threads against 2 MPI ranks x 1 thread.

For each hidden size and global batch, times training steps of the default character
model (2 layers, embedding 64, T=50, the shipped corpus) and, under MPI, the Allreduce of
the gradient buffer within each step. The driver runs every case in its own processes:

    python benchmarks/distributed.py                      # the table (needs the mpi extra)
    python benchmarks/distributed.py --hidden 256 --batch 64 --steps 5   # fewer cases

One case by hand (what the driver runs):

    python benchmarks/distributed.py --case --hidden 256 --batch 64 --threads 2
    mpiexec -n 2 python -m mpi4py benchmarks/distributed.py --case --hidden 256 --batch 64 --mpi
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

from grumpy.lm.config import TrainConfig
from grumpy.lm.data import StreamBatcher, Vocab, load_text, split_text
from grumpy.lm.distributed import Team, columns, flat_size, thread_limit
from grumpy.lm.loop import apply_gradients, local_gradients
from grumpy.lm.model import CharModel
from grumpy.optim import make_optimizer

SEQ_LEN = 50


def case(hidden: int, batch: int, steps: int, threads: int | None, use_mpi: bool) -> dict[str, Any] | None:
    """Time ``steps`` training steps (after 2 untimed ones); the row on rank 0, None elsewhere."""
    comm = None
    if use_mpi:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    team = Team(comm)
    threads = team.threads(threads)
    text = load_text()
    vocab = Vocab.from_text(text)
    train_ids, _ = split_text(vocab.encode(text))
    cfg = TrainConfig(hidden_size=hidden, batch_size=batch, seq_len=SEQ_LEN)
    model = CharModel(cfg.model_config(len(vocab)), seed=0)
    team.broadcast_params(model.params)
    opt = make_optimizer("adam", cfg.lr)
    batcher = StreamBatcher(train_ids, batch, SEQ_LEN, seed=0)
    b0, b1 = team.streams(batch)
    h = model.init_state(b1 - b0)
    step_s, reduce_s = [], []
    with thread_limit(threads, compiled=True), np.errstate(over="ignore", invalid="ignore"):
        for i in range(steps + 2):
            x, y, _ = batcher.next()
            if comm is not None:
                comm.Barrier()  # every step starts together: the time is the slowest rank's
            t0 = time.perf_counter()
            model.zero_grad()
            loss, h = local_gradients(model, columns(x, b0, b1), columns(y, b0, b1), h)
            t1 = time.perf_counter()
            team.average_gradients(model.grads, loss)
            t2 = time.perf_counter()
            apply_gradients(model, opt, cfg, cfg.lr)
            t3 = time.perf_counter()
            if i >= 2:
                step_s.append(t3 - t0)
                reduce_s.append(t2 - t1)
    if not team.root:
        return None
    step = float(np.median(step_s))
    return {"hidden": hidden, "batch": batch, "ranks": team.size, "threads": threads,
            "step_s": step, "chars_per_s": batch * SEQ_LEN / step, "allreduce_s": float(np.median(reduce_s)),
            "allreduce_bytes": (flat_size(model.grads) + 1) * model.dtype.itemsize}


def drive(hiddens: list[int], batches: list[int], steps: int) -> None:
    mpiexec = shutil.which("mpiexec")
    rows = []
    for H in hiddens:
        for B in batches:
            base = [sys.executable, "benchmarks/distributed.py", "--case", "--hidden", str(H), "--batch", str(B),
                    "--steps", str(steps)]
            runs = [base + ["--threads", "2"]]
            if mpiexec is not None:
                runs.append([mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", *base[1:], "--mpi"])
            for argv in runs:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| H | B | 1 process x 2 threads, chars/s | 2 ranks x 1 thread, chars/s | ratio | step | Allreduce "
          "(bytes, time) |\n|---:|---:|---:|---:|---:|---:|---|")
    for one, two in zip(rows[::2], rows[1::2]):
        print(f"| {one['hidden']} | {one['batch']} | {one['chars_per_s']:,.0f} | {two['chars_per_s']:,.0f} | "
              f"{two['chars_per_s'] / one['chars_per_s']:.2f} | {two['step_s'] * 1e3:.0f} ms | "
              f"{two['allreduce_bytes'] / 1e6:.2f} MB, {two['allreduce_s'] * 1e3:.2f} ms |")


def main() -> None:
    ap = argparse.ArgumentParser(description="1 process x 2 threads against 2 MPI ranks x 1 thread")
    ap.add_argument("--case", action="store_true", help="run one case (under mpiexec with --mpi)")
    ap.add_argument("--mpi", action="store_true")
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    if a.case:
        row = case(a.hidden[0], a.batch[0], a.steps, a.threads, a.mpi)
        if row is not None:
            print(json.dumps(row), flush=True)
    else:
        drive(a.hidden, a.batch, a.steps)


if __name__ == "__main__":
    main()
