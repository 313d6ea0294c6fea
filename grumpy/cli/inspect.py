"""``grumpy inspect``: one HTML page showing what a character model's units do on a text."""

from __future__ import annotations

import argparse
from typing import Any

from grumpy.cli.args import checkpoint, text_for
from grumpy.lm.checkpoint import atomic_write_bytes
from grumpy.lm.inspect import inspect_page


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect", help="an HTML page colouring a text by a model's units and gates",
        description="Write one self-contained HTML page (no network needed to view it) that shows TEXT_FILE "
                    "with each character coloured by a chosen unit's state or gate (z, r, n, h), a control to "
                    "switch unit and layer, and the units whose activity correlates best with things visible "
                    "in the text.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors file written by grumpy train")
    p.add_argument("text_file", metavar="TEXT_FILE", help="UTF-8 text to run the model over")
    p.add_argument("--out", metavar="PAGE.html", required=True, help="the page to write")
    p.add_argument("--max-chars", type=int, default=3000, metavar="N",
                   help="show the first N characters (default 3000: the page holds 4 values per unit and character)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.max_chars < 2:
        raise ValueError(f"--max-chars: expected an integer >= 2, got {args.max_chars}")
    model, meta = checkpoint(args.checkpoint)
    text = text_for(args.text_file, meta["vocab"])
    shown = text[: args.max_chars]
    page = inspect_page(model, meta["vocab"], shown, title=f"grumpy inspect: {args.checkpoint}")
    atomic_write_bytes(args.out, page.encode("utf-8"))
    note = f" (the first {len(shown):,} of {len(text):,} characters; --max-chars)" if len(shown) < len(text) else ""
    print(f"wrote {args.out}: {len(shown):,} characters{note}, {model.config.num_layers} layer(s) of "
          f"{model.config.hidden_size} units")
    return 0
