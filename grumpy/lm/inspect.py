"""A look inside a character model: one self-contained HTML page showing a text with each
character coloured by a chosen unit's state or gate, and the units whose activity best
tracks something visible in the text (found by correlation, and stated as such)."""

from __future__ import annotations

import base64
import html
import json
from typing import Any

import numpy as np

from grumpy.lm.data import Vocab
from grumpy.lm.model import CharModel

QUANTITIES = {"h": ("state h", -1.0, 1.0), "z": ("update gate z", 0.0, 1.0), "r": ("reset gate r", 0.0, 1.0),
              "n": ("candidate n", -1.0, 1.0)}


def text_features(text: str) -> dict[str, np.ndarray]:
    """Things visible in the text, one value per character (T,): what units are matched against."""
    inside, quote = [], False
    for c in text:
        quote = quote != (c == '"')
        inside.append(quote)
    pos, speech_start, previous_blank = [], [], True
    for line in text.split("\n"):
        opens = previous_blank and line.strip() != ""  # the first line after a blank one: a speaker's name
        pos += list(range(len(line) + 1))  # the newline ends its line
        speech_start += [opens] * (len(line) + 1)
        previous_blank = line.strip() == ""
    pos, speech_start = pos[: len(text)], speech_start[: len(text)]
    chars = np.array(list(text))
    return {
        "inside double quotes": np.array(inside, float),
        "position in the line": np.array(pos, float),
        "first line of a speech (the speaker's name)": np.array(speech_start, float),
        "upper-case letter": np.char.isupper(chars).astype(float),
        "space": (chars == " ").astype(float),
        "vowel": np.isin(np.char.lower(chars), list("aeiou")).astype(float),
        "end of line": (chars == "\n").astype(float),
    }


def correlations(acts: dict[str, np.ndarray], feats: dict[str, np.ndarray], top: int = 2) -> list[dict[str, Any]]:
    """For each feature, the ``top`` (quantity, layer, unit) whose activity (T,) has the largest
    |Pearson correlation| with it. acts: quantity -> (L, T, H)."""
    rows = []
    for name, f in feats.items():
        if f.std() == 0:
            continue
        fz = (f - f.mean()) / f.std()
        best: list[dict[str, Any]] = []
        for q, a in acts.items():
            sd = a.std(axis=1)
            ok = sd > 1e-6
            corr = np.where(ok, ((a - a.mean(axis=1, keepdims=True)) * fz[None, :, None]).mean(axis=1)
                            / np.where(ok, sd, 1.0), 0.0)  # (L, H)
            for layer, unit in zip(*np.unravel_index(np.argsort(-np.abs(corr), axis=None)[:top], corr.shape)):
                best.append({"feature": name, "quantity": q, "layer": int(layer), "unit": int(unit),
                             "corr": float(corr[layer, unit])})
        rows += sorted(best, key=lambda r: -abs(r["corr"]))[:top]
    return rows


def _pack(a: np.ndarray, lo: float, hi: float) -> str:
    """(T, H) values in [lo, hi] as base64 bytes, row after row (0 = lo, 255 = hi)."""
    q = np.clip(np.rint((a - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    return base64.b64encode(np.ascontiguousarray(q).tobytes()).decode("ascii")


def inspect_page(model: CharModel, vocab: str, text: str, *, title: str = "grumpy inspect") -> str:
    """The page as one HTML string (styles, data and script inline: no network needed)."""
    if len(text) < 2:
        raise ValueError(f"TEXT_FILE: need at least 2 characters, got {len(text)}")
    idx = Vocab(vocab).encode(text)
    g = model.gates(idx[:, None])
    acts = {q: g[q][:, :, 0, :].astype(np.float64) for q in QUANTITIES}  # (L, T, H)
    L, T, H = acts["h"].shape
    data = {
        "text": text, "layers": L, "units": H,
        "quantities": {q: {"label": lab, "lo": lo, "hi": hi, "data": [_pack(acts[q][k], lo, hi) for k in range(L)]}
                       for q, (lab, lo, hi) in QUANTITIES.items()},
        "tracks": correlations(acts, text_features(text)),
    }
    payload = json.dumps(data).replace("</", "<\\/")  # no "</script>" inside the data
    return _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<script>  // first, so that any later error is caught: the test suite reads the title
window.addEventListener("error", e => { document.title = "error: " + e.message; });
const consoleError = console.error;
console.error = (...a) => { document.title = "error: " + a.join(" "); consoleError(...a); };
</script>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
#controls { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ddd; }
#controls label { margin-right: 1em; }
#text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.5; margin-top: 1em; }
#text span { border-radius: 2px; }
#tracks td, #tracks th { padding: .15em .6em; text-align: left; }
#tracks button { font-size: .85em; }
.note { color: #666; font-size: .9em; }
</style></head>
<body>
<h1>__TITLE__</h1>
<div id="controls">
  <label>layer <select id="layer"></select></label>
  <label>show <select id="quantity"></select></label>
  <label>unit <input id="unit" type="number" min="0" value="0" style="width:5em"></label>
  <span id="scale" class="note"></span>
</div>
<h2>Units that track something visible</h2>
<p class="note">Found by correlation over this text (Pearson's r between the unit's value and the
feature, character by character). A correlation says the unit moves with the feature here; it does
not show that the unit computes it.</p>
<table id="tracks"><tr><th>feature</th><th>layer</th><th>unit</th><th>shows</th><th>r</th><th></th></tr></table>
<div id="text"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const decode = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
const Q = {};
for (const [q, v] of Object.entries(D.quantities)) Q[q] = { ...v, bytes: v.data.map(decode) };
const layerSel = document.getElementById("layer"), qSel = document.getElementById("quantity");
const unitIn = document.getElementById("unit"), textDiv = document.getElementById("text");
for (let k = 0; k < D.layers; k++) layerSel.add(new Option(String(k), String(k)));
for (const [q, v] of Object.entries(Q)) qSel.add(new Option(v.label, q));
unitIn.max = String(D.units - 1);
const spans = [];
for (const c of D.text) {
  const s = document.createElement("span");
  s.textContent = c === "\\n" ? "\\u21b5\\n" : c;
  textDiv.appendChild(s); spans.push(s);
}
function colour(b, signed) {  // b in 0..255; signed: blue below the middle, red above
  if (!signed) { const t = b / 255; return `rgba(200, 60, 40, ${t.toFixed(3)})`; }
  const t = (b - 127.5) / 127.5;
  return t >= 0 ? `rgba(200, 60, 40, ${t.toFixed(3)})` : `rgba(40, 90, 200, ${(-t).toFixed(3)})`;
}
function paint() {
  const q = Q[qSel.value], k = Number(layerSel.value);
  const u = Math.max(0, Math.min(D.units - 1, Number(unitIn.value) || 0));
  const bytes = q.bytes[k], signed = q.lo < 0;
  for (let t = 0; t < spans.length; t++) {
    const b = bytes[t * D.units + u];
    spans[t].style.backgroundColor = colour(b, signed);
    spans[t].title = (q.lo + (q.hi - q.lo) * b / 255).toFixed(3);
  }
  document.getElementById("scale").textContent =
    `${q.label}, layer ${k}, unit ${u}: ` + (signed ? "blue -1 ... white 0 ... red +1" : "white 0 ... red 1");
}
const table = document.getElementById("tracks");
for (const r of D.tracks) {
  const row = table.insertRow();
  for (const v of [r.feature, r.layer, r.unit, Q[r.quantity].label, r.corr.toFixed(2)]) {
    row.insertCell().textContent = v;
  }
  const b = document.createElement("button");
  b.textContent = "show";
  b.onclick = () => {
    layerSel.value = String(r.layer); qSel.value = r.quantity; unitIn.value = String(r.unit); paint();
  };
  row.insertCell().appendChild(b);
}
for (const el of [layerSel, qSel, unitIn]) el.addEventListener("input", paint);
if (D.tracks.length) {  // open on the unit that tracks the first feature best
  const r = D.tracks[0];
  layerSel.value = String(r.layer); qSel.value = r.quantity; unitIn.value = String(r.unit);
}
paint();
if (location.hash === "#selftest") {  // for the test suite: does switching the unit change the colours?
  const before = spans.map(s => s.style.backgroundColor).join("|");
  unitIn.value = String((Number(unitIn.value) + 1) % D.units);
  unitIn.dispatchEvent(new Event("input"));
  const after = spans.map(s => s.style.backgroundColor).join("|");
  document.title = before !== after ? "selftest: ok" : "selftest: unchanged";
}
</script>
</body></html>
"""
