"""Smoke test of `grumpy bench --quick`: the table's structure, never its timings."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_table_and_json(tmp_path):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--quick", "--repeats", "1", "--sides", "grumpy,composed,torch",
         "--json", str(out_json)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:7] == ["measure", "H", "B", "grumpy tok/s", "composed tok/s", "torch tok/s", "JAX tok/s"]
    first = lines[: lines.index("")] if "" in lines else lines  # the main table, before the notes
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in first[2:] if ln.startswith("| ")]
    assert {r[0] for r in rows} == {"train", "infer", "gen"}
    assert all(len(r) == len(header) for r in rows)
    res = json.loads(out_json.read_text())
    assert {"grumpy", "composed", "torch"} <= set(res["sides"])
    for p in res["points"]:
        assert not p["error"], p["error"]
        for side in res["sides"]:
            assert p["tok_s"][side] > 0
    for side in res["sides"]:
        assert res["memory"][side]["step_peak_mb"] >= 0
    assert res["roofline_gflops"] > 0
    assert "Peak memory" in proc.stdout and "Roofline" in proc.stdout
    # the reduced-precision rows: every side of every point ran, and the table shows them
    prec = res["precision"]["points"]
    assert {(p["mode"], p["B"]) for p in prec} == {("gen", 1), ("infer", 1), ("infer", 32)}
    for p in prec:
        assert not p["errors"], p["errors"]
        assert set(p["tok_s"]) == {"grumpy-f32", "grumpy-int8", "grumpy-bf16", "torch-f32", "torch-int8"}
        assert min(p["tok_s"].values()) > 0
    assert "Reduced precision" in proc.stdout and "| int8 / torch int8 |" in proc.stdout


def test_bench_rejects_unknown_side():
    from grumpy.cli import main

    assert main(["bench", "--sides", "grumpy,tensorflow"]) == 2


def test_bandwidth_script_prints_the_single_stream_bound(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bandwidth.py"
    spec = importlib.util.spec_from_file_location("bandwidth", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([64])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 2  # one thread and all threads
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        us, gbs, bound = float(cells[3]), float(cells[4]), float(cells[5].replace(",", ""))
        assert us > 0 and gbs > 0
        assert bound == pytest.approx(1e6 / us, rel=0.05)  # tokens/s = 1 / seconds per product
