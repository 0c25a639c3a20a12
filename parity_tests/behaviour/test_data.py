"""Corpus, vocabulary and batching: the framework-neutral inputs both backends share."""

from __future__ import annotations

import numpy as np
import pytest

from charclip import corpus
from charclip.batching import Position, Streams, split
from charclip.errors import CharclipError
from charclip.vocab import Vocab

PLAY = """# A Play

## ACT I

### SCENE I. A street.

_Enter ROMEO and a Servant,
with a torch_

**ROMEO**  
What, shall this speech be spoke for our excuse?  
Or shall we on _\\[Aside]_ without apology?

**First Servant**  
__\\[Awaking]_  
The date is out of such prolixity.

_Exeunt_

And yet I stay.

**ROMEO**  
*Sound a horn.*
Give me a torch.
"""


def test_markdown_becomes_tiny_shakespeare_layout():
    text = corpus.markdown_to_text(PLAY)
    assert text == (
        "ROMEO:\nWhat, shall this speech be spoke for our excuse?\nOr shall we on without apology?\n\n"
        "FIRST SERVANT:\nThe date is out of such prolixity.\nAnd yet I stay.\n\n"
        "ROMEO:\nGive me a torch.\n"
    )


def test_embedded_corpus_is_plain_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARCLIP_CACHE", str(tmp_path))
    first = corpus.shakespeare()
    cached = list(tmp_path.glob("shakespeare-*.txt"))
    assert len(cached) == 1 and cached[0].read_text(encoding="utf-8") == first
    assert corpus.shakespeare() == first  # served from the cache
    cached[0].unlink()
    assert corpus.shakespeare() == first  # rebuilt identically
    assert len(first) > 4_000_000
    for mark in ("**", "_", "#", "\\"):
        assert mark not in first, f"markdown mark {mark!r} left in the corpus"
    speakers = [l for l in first.splitlines() if l.endswith(":") and l.upper() == l]
    assert len(speakers) > 20_000 and "HAMLET:" in speakers


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"", "is empty"),
        (b"abc\xff\xfe", "not UTF-8"),
        (b"ab\x00cd", "binary"),
    ],
)
def test_bad_corpus_files_are_refused_with_one_line(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CharclipError, match=message) as e:
        corpus.read_text(path)
    assert "\n" not in str(e.value)


def test_vocabulary_is_sorted_and_round_trips():
    v = Vocab.from_text("hello, world")
    assert v.chars == " ,dehlorw"
    assert v.decode(v.encode("low hello")) == "low hello"
    with pytest.raises(CharclipError, match="outside the model's vocabulary: 'z'"):
        v.encode("hello z")


def test_split_is_contiguous_with_validation_at_the_end():
    tokens = np.arange(1000)
    train, val = split(tokens, 0.1)
    assert len(val) == 100 and np.array_equal(np.concatenate([train, val]), tokens)


def test_batches_continue_each_stream_and_targets_are_shifted():
    tokens = np.arange(10_000)
    s = Streams(tokens, batch_size=4, seq_len=8)
    pos = Position()
    x0, y0 = s.batch(seed=3, pos=pos)
    x1, _ = s.batch(seed=3, pos=s.next(pos))
    assert x0.shape == (4, 8)
    np.testing.assert_array_equal(y0, x0 + 1)  # next-character targets
    np.testing.assert_array_equal(x1[:, 0], x0[:, -1] + 1)  # the next batch continues each stream
    np.testing.assert_array_equal(np.diff(x0[:, 0]), s.stream_len)  # streams are evenly spaced cuts


def test_batch_order_is_a_function_of_seed_and_epoch():
    s = Streams(np.arange(10_000), batch_size=4, seq_len=16)
    a = [s.offset(seed=0, epoch=e) for e in range(8)]
    assert a == [s.offset(seed=0, epoch=e) for e in range(8)]
    assert a != [s.offset(seed=1, epoch=e) for e in range(8)]
    last = Position(0, s.batches_per_epoch - 1)
    assert s.next(last) == Position(1, 0)


def test_a_corpus_shorter_than_one_batch_is_refused():
    with pytest.raises(CharclipError, match="fewer than one batch needs"):
        Streams(np.arange(100), batch_size=8, seq_len=16)
