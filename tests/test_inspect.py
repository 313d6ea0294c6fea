"""`grumpy inspect`: the page's data, and the page itself in a real headless browser."""

import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("safetensors")

from test_train_cli import TINY, run, text_file  # noqa: E402, F401  (text_file is a fixture)

from grumpy.lm.inspect import correlations, text_features  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_features_mark_what_they_say():
    t = 'ROMEO:\nHe said "hi".\n\nJULIET:\nNo.\n'
    f = text_features(t)
    assert all(len(v) == len(t) for v in f.values())
    assert [c for c, v in zip(t, f["inside double quotes"]) if v] == list('"hi')
    assert "".join(c for c, v in zip(t, f["first line of a speech (the speaker's name)"]) if v) == "ROMEO:\nJULIET:\n"
    assert f["position in the line"][t.index("H")] == 0 and f["position in the line"][t.index("e")] == 1


def test_correlation_finds_a_unit_that_copies_a_feature():
    rng = np.random.default_rng(0)
    feat = {"f": (rng.random(200) > 0.5).astype(float)}
    acts = {"h": rng.standard_normal((2, 200, 6))}
    acts["h"][1, :, 4] = 2 * feat["f"] - 1 + 0.01 * rng.standard_normal(200)  # layer 1, unit 4 tracks it
    top = correlations(acts, feat, top=1)[0]
    assert (top["layer"], top["unit"], top["quantity"]) == (1, 4, "h") and top["corr"] > 0.99


@pytest.fixture
def page(tmp_path, text_file, capsys):
    rc, _, err = run(["train", text_file, "--out", tmp_path / "m", "--max-steps", "3", *TINY], capsys)
    assert rc == 0, err
    out = tmp_path / "page.html"
    rc, stdout, err = run(["inspect", tmp_path / "m" / "latest.safetensors", text_file, "--out", out,
                           "--max-chars", "400"], capsys)
    assert rc == 0, err
    assert "the first 400 of" in stdout  # what is left out is said
    return out


def test_page_is_self_contained(page):
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from the network
    assert "application/json" in html and "selftest" in html


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")
def test_page_loads_without_errors_and_the_unit_switch_recolours(page, tmp_path):
    r = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         page.as_uri() + "#selftest"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", r.stdout, re.S)
    assert title is not None, r.stdout[:500]
    assert title.group(1) == "selftest: ok", title.group(1)  # no error caught, and the colours changed


def test_inspect_refuses_bad_input(tmp_path, text_file, capsys):
    rc, _, err = run(["inspect", tmp_path / "nope.safetensors", text_file, "--out", tmp_path / "p.html"], capsys)
    assert rc == 2 and "CHECKPOINT" in err
