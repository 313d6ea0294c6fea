"""The worked examples of docs/tasks.md: grumpy's estimators against the same model in Keras 3.

Two tasks on real public data that needs no download:
  digits    scikit-learn's handwritten digits (1797 images of 8x8 pixels) read row by row
            as sequences of T=8 steps with F=8 features; 10 classes; test accuracy.
  sunspots  monthly mean sunspot numbers 1749-2008 (NOAA NGDC, public domain, as shipped by
            statsmodels; docs/data/sunspots_monthly.csv): the last 36 months -> the next 6,
            time-ordered split (last 20% of the months test); test RMSE in sunspots.

Both sides train the same architecture (one GRU layer, reset_after=True, last state ->
linear layer) with the same split, epochs, batch size, optimiser (Adam) and learning rate,
on the same standardised inputs (grumpy learns the scaling in fit; Keras gets the data
scaled with the same training statistics). Every fit runs in its own process, grumpy and
Keras alternating, three seeds;
fit time is the wall time of the fit call alone, after a warm-up fit of one epoch on 128
sequences in the same process (grumpy loads its compiled kernels there, Keras and torch
their own first-call work).

    pip install -e ".[test]"          # scikit-learn, keras, torch==2.13.0
    python benchmarks/tasks.py        # prints a markdown table; about 5 minutes on 2 cores
    python benchmarks/tasks.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (0, 1, 2)
TASKS = {
    "digits": dict(hidden_size=64, epochs=20, batch_size=32, lr=1e-3),
    "sunspots": dict(hidden_size=32, epochs=15, batch_size=64, lr=1e-3, window=24, horizon=6),
}


def load_task(task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """X_train, y_train, X_test, y_test, all float64 except the digit labels."""
    if task == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        X = d.images / 16.0  # (1797, 8, 8): 8 rows of 8 pixels
        X_tr, X_te, y_tr, y_te = train_test_split(X, d.target, test_size=0.25, random_state=0, stratify=d.target)
        return X_tr, y_tr, X_te, y_te
    import grumpy

    cfg = TASKS["sunspots"]
    data = np.loadtxt(ROOT / "docs" / "data" / "sunspots_monthly.csv", delimiter=",", skiprows=1)
    w = grumpy.forecast_windows(data[:, 2], window=cfg["window"], horizon=cfg["horizon"], test_size=0.2)
    return w.X_train, w.y_train, w.X_test, w.y_test


def evaluate(task: str, pred: np.ndarray, y_test: np.ndarray) -> float:
    if task == "digits":
        return float(np.mean(pred == y_test))
    return float(np.sqrt(np.mean((pred - y_test) ** 2)))


def run_grumpy(task: str, seed: int) -> dict:
    import grumpy

    cfg = TASKS[task]
    X_tr, y_tr, X_te, y_te = load_task(task)
    kw = dict(hidden_size=cfg["hidden_size"], epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
              optimizer="adam", seed=seed)
    make = grumpy.GRUClassifier if task == "digits" else grumpy.GRURegressor
    t0 = time.perf_counter()
    make(**{**kw, "epochs": 1}).fit(X_tr[:128], y_tr[:128])  # warm-up: loads the compiled kernels
    warmup_s = time.perf_counter() - t0
    est = make(**kw)
    t0 = time.perf_counter()
    est.fit(X_tr, y_tr)
    fit_s = time.perf_counter() - t0
    return {"score": evaluate(task, est.predict(X_te), y_te), "fit_s": fit_s, "warmup_s": warmup_s}


def run_keras(task: str, seed: int) -> dict:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import torch

    if os.environ.get("TASKS_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["TASKS_TORCH_THREADS"]))

    cfg = TASKS[task]
    X_tr, y_tr, X_te, y_te = load_task(task)
    # The scaling grumpy's standardize=True learns in fit: per feature over the training steps.
    mean, std = X_tr.reshape(-1, X_tr.shape[-1]).mean(0), X_tr.reshape(-1, X_tr.shape[-1]).std(0)
    std = np.where(std > 0, std, 1.0)
    X_tr, X_te = ((X_tr - mean) / std).astype(np.float32), ((X_te - mean) / std).astype(np.float32)
    if task == "digits":
        n_out, loss, targets = 10, keras.losses.SparseCategoricalCrossentropy(from_logits=True), y_tr
    else:  # the regressor also standardises its targets
        y_mean, y_std = y_tr.mean(0), y_tr.std(0)
        n_out, loss, targets = y_tr.shape[1], "mse", ((y_tr - y_mean) / y_std).astype(np.float32)
    def fit(X, y, epochs):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input(X_tr.shape[1:]), keras.layers.GRU(cfg["hidden_size"]),
                                  keras.layers.Dense(n_out)])
        model.compile(optimizer=keras.optimizers.Adam(cfg["lr"]), loss=loss)
        model.fit(X, y, epochs=epochs, batch_size=cfg["batch_size"], shuffle=True, verbose=0)
        return model

    t0 = time.perf_counter()
    fit(X_tr[:128], targets[:128], 1)  # warm-up, as for grumpy
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = fit(X_tr, targets, cfg["epochs"])
    fit_s = time.perf_counter() - t0
    out = model.predict(X_te, verbose=0, batch_size=512)
    pred = out.argmax(1) if task == "digits" else out * y_std + y_mean
    return {"score": evaluate(task, pred, y_te), "fit_s": fit_s, "warmup_s": warmup_s}


def one_run(lib: str, task: str, seed: int) -> dict:
    """One fit in a fresh process, so neither library's threads or imports touch the other."""
    cmd = [sys.executable, __file__, "--one", lib, task, str(seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{lib} {task} seed {seed} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def baseline(task: str) -> str:
    _, y_tr, X_te, y_te = load_task(task)
    if task == "digits":
        return f"most frequent class: {np.mean(y_te == np.bincount(y_tr).argmax()):.3f}"
    persistence = np.repeat(X_te[:, -1, :], y_te.shape[1], axis=1)  # repeat the last month
    return f"repeat the last month: RMSE {evaluate(task, persistence, y_te):.1f}"


def print_table(runs: list[dict], tasks: list[str], torch_threads: int | None) -> None:
    print("| task | measure | model | per seed | mean | fit time per seed (s) | median fit (s) "
          "| grumpy speed-up (medians) |")
    print("|---|---|---|---|---:|---|---:|---:|")
    for task in tasks:
        measure = "test accuracy" if task == "digits" else "test RMSE (sunspots)"
        fmt = "{:.4f}" if task == "digits" else "{:.2f}"
        rows = {lib: [r for r in runs if r["task"] == task and r["lib"] == lib] for lib in ("grumpy", "keras")}
        med = {lib: statistics.median(r["fit_s"] for r in rs) for lib, rs in rows.items()}
        for lib, rs in rows.items():
            scores = ", ".join(fmt.format(r["score"]) for r in rs)
            mean = fmt.format(statistics.mean(r["score"] for r in rs))
            times = ", ".join(f"{r['fit_s']:.1f}" for r in rs)
            speed = f"{med['keras'] / med['grumpy']:.1f}x" if lib == "grumpy" else ""
            threads = f", {torch_threads} thread" if torch_threads else ""
            name = "grumpy" if lib == "grumpy" else f"Keras 3 (torch{threads})"
            print(f"| {task} | {measure} | {name} | {scores} | {mean} | {times} | {med[lib]:.1f} | {speed} |")
    for task in tasks:
        print(f"\n{task} baseline, {baseline(task)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=3, metavar=("LIB", "TASK", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--json", help="also write every run's figures to this file")
    ap.add_argument("--table", help="print the table of a file written by --json, without running")
    ap.add_argument("--torch-threads", type=int, help="torch.set_num_threads for Keras (default: torch's own)")
    args = ap.parse_args()
    if args.one:
        lib, task, seed = args.one
        print(json.dumps((run_grumpy if lib == "grumpy" else run_keras)(task, int(seed))))
        return
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print_table(saved["runs"], sorted({r["task"] for r in saved["runs"]}, key=list(TASKS).index),
                    saved.get("torch_threads"))
        return
    if args.torch_threads:
        os.environ["TASKS_TORCH_THREADS"] = str(args.torch_threads)

    runs: list[dict] = []
    for task in args.tasks:
        for i, seed in enumerate(SEEDS):
            # alternate which library goes first, so slow phases of a shared machine hit both
            for lib in (("grumpy", "keras") if i % 2 == 0 else ("keras", "grumpy")):
                load = os.getloadavg()[0]
                r = {"task": task, "lib": lib, "seed": seed, **one_run(lib, task, seed),
                     "load_before": load, "load_after": os.getloadavg()[0]}
                runs.append(r)
                print(f"{task:9s} {lib:7s} seed {seed}: score {r['score']:.4f}, fit {r['fit_s']:.1f} s",
                      file=sys.stderr)
    if args.json:
        saved = {"tasks": TASKS, "torch_threads": args.torch_threads, "runs": runs}
        Path(args.json).write_text(json.dumps(saved, indent=1))
    print_table(runs, args.tasks, args.torch_threads)


if __name__ == "__main__":
    main()
