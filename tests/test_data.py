import gzip

import numpy as np
import pytest

from grumpy.lm.data import (
    StreamBatcher,
    Vocab,
    decode_utf8,
    eval_windows,
    load_text,
    min_text_length,
    split_text,
)


def test_vocab_roundtrip_and_order():
    v = Vocab.from_text("hello world")
    assert v.chars == " dehlorw"
    ids = v.encode("hello")
    assert ids.dtype == np.int32
    assert v.decode(ids) == "hello"
    assert [v.chars[i] for i in ids] == list("hello")


def test_vocab_non_bmp_characters():
    text = "a𝄞b€"
    v = Vocab.from_text(text)
    assert v.decode(v.encode(text)) == text


def test_vocab_unknown_characters_listed():
    v = Vocab.from_text("abc")
    with pytest.raises(ValueError, match=r"'x'.*'z'|'z'.*'x'"):
        v.encode("abxz")
    assert v.missing("abxzx") == ["x", "z"]


def test_vocab_rejects_duplicates_and_empty():
    with pytest.raises(ValueError):
        Vocab("aa")
    with pytest.raises(ValueError):
        Vocab("")
    with pytest.raises(ValueError):
        Vocab.from_text("")


def test_shipped_corpus_loads():
    text = load_text()
    assert len(text) > 900_000
    assert "HAMLET" in text.upper()
    assert len(set(text)) < 100


def test_load_text_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_text(empty)
    with pytest.raises(ValueError, match="directory"):
        load_text(tmp_path)


def test_non_utf8_names_byte_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"UTF-8.*byte offset 3"):
        load_text(p)


def test_binary_file_rejected(tmp_path):
    p = tmp_path / "data.bin"
    p.write_bytes(gzip.compress(b"some text" * 100))
    with pytest.raises(ValueError, match="byte offset"):
        load_text(p)
    with pytest.raises(ValueError, match="NUL byte at byte offset 2"):
        decode_utf8(b"ab\x00cd", "x")


def test_crlf_normalised():
    assert decode_utf8(b"a\r\nb", "x") == "a\nb"


def test_split_is_contiguous():
    ids = np.arange(1000)
    tr, va = split_text(ids, 0.1)
    assert len(tr) == 900 and len(va) == 100
    assert np.array_equal(np.concatenate([tr, va]), ids)
    with pytest.raises(ValueError):
        split_text(ids, 0.0)


def test_min_text_length_is_tight():
    n = min_text_length(4, 10, 0.1)
    tr, va = split_text(np.arange(n), 0.1)
    assert len(tr) >= 41 and len(va) >= 2
    tr, va = split_text(np.arange(n - 1), 0.1)
    assert len(tr) < 41 or len(va) < 2


def test_stream_batcher_targets_and_continuity():
    ids = np.arange(1001)
    b = StreamBatcher(ids, batch_size=4, seq_len=10)
    x1, y1, new1 = b.next()
    x2, y2, new2 = b.next()
    assert new1 and not new2
    assert x1.shape == (10, 4)
    assert np.array_equal(y1, x1 + 1)  # targets are the next character
    # each stream continues where the previous window stopped
    assert np.array_equal(x2[0], x1[-1] + 1)
    # streams are contiguous, disjoint chunks
    assert len(set(x1[0].tolist())) == 4


def test_stream_batcher_epochs_and_position():
    ids = np.arange(203)
    b = StreamBatcher(ids, batch_size=2, seq_len=10, seed=3)
    n = b.windows_per_epoch
    epochs, flags = [], []
    for _ in range(3 * n + 1):
        flags.append(b.next()[2])
        epochs.append(b.pos.epoch)
        assert flags[-1] == (b.pos.offset == 10)  # the flag marks exactly the first window of an epoch
    assert flags[0] and sum(flags) == len(set(epochs)) >= 3
    # The position alone reproduces what comes next.
    c = StreamBatcher(ids, batch_size=2, seq_len=10, seed=3)
    c.pos = b.pos
    xb, yb, _ = b.next()
    xc, yc, _ = c.next()
    assert np.array_equal(xb, xc) and np.array_equal(yb, yc)


def test_stream_batcher_too_short():
    with pytest.raises(ValueError, match="too short"):
        StreamBatcher(np.arange(40), batch_size=4, seq_len=10)


@pytest.mark.parametrize("n,bs,T", [(2, 4, 3), (11, 3, 4), (101, 8, 7), (50, 64, 10)])
def test_eval_windows_cover_every_prediction_once(n, bs, T):
    ids = np.arange(n)
    seen = []
    for x, y, _ in eval_windows(ids, bs, T):
        assert np.array_equal(y, x + 1)
        seen += x.T.ravel().tolist() if x.shape[1] > 1 else x.ravel().tolist()
    assert sorted(seen) == list(range(n - 1))
