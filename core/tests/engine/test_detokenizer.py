"""Incremental detokenization: the streamed text is the decoded text, stop strings cut it."""
import random

import pytest

from kernelplane.engine.detokenizer import IncrementalDetokenizer


def feed(tokenizer, ids, stop=(), chunk=1):
    detok = IncrementalDetokenizer(tokenizer, list(stop))
    pieces = []
    for i in range(0, len(ids), chunk):
        detok.add(ids[i:i + chunk])
        pieces.append(detok.delta(final=False))
        if detok.stopped:
            break
    detok.flush()
    pieces.append(detok.delta(final=True))
    return detok, pieces


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("chunk", [1, 3])
def test_any_token_sequence_streams_to_its_decoding(tiny, seed, chunk):
    # Random ids include lone bytes of multi-byte characters: text held back must still come out at the end.
    rng = random.Random(seed)
    ids = [rng.randrange(3, tiny.tokenizer.vocab_size) for _ in range(40)]
    detok, pieces = feed(tiny.tokenizer, ids, chunk=chunk)
    assert detok.text == tiny.tokenizer.decode(ids)
    assert "".join(pieces) == detok.text


def test_split_character_is_held_back_until_complete(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("ok 🎉 done")
    assert len(ids) > 4  # the emoji is several byte tokens here
    detok, pieces = feed(tok, ids)
    assert "".join(pieces) == "ok 🎉 done"
    assert not any("\ufffd" in p for p in pieces)


def test_incomplete_character_at_the_end_is_flushed(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("ok 🎉")
    cut = ids[:-1]  # the emoji's last byte never comes
    detok, pieces = feed(tok, cut)
    assert detok.text == tok.decode(cut) and detok.text.startswith("ok ")
    assert "".join(pieces) == detok.text


def test_stop_string_across_tokens_is_cut_and_never_streamed(tiny):
    tok = tiny.tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    detok, pieces = feed(tok, ids, stop=["fox jumps"])
    assert detok.stopped and detok.text == "The quick brown "
    assert "".join(pieces) == "The quick brown "
    assert not any("fox" in p for p in pieces)


def test_stop_prefix_is_held_back_then_released(tiny):
    tok = tiny.tokenizer
    # "over the" starts like the stop string "over there" but never completes it.
    detok, pieces = feed(tok, tok.encode("jumps over the lazy dog"), stop=["over there"])
    assert not detok.stopped and "".join(pieces) == "jumps over the lazy dog"
