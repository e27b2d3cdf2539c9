"""The matching rule: golden cases, and the incremental index against the full scan."""
import random

import pytest

from kernelplane_spec_ngram import NgramIndex, scan_draft
from kernelplane_spec_ngram.match_rule import continue_from

# (tokens, min_n, max_n, k, draft) under "longest, then most recent" matching.
GOLDEN = [
    ([1, 2, 3, 4, 1, 2, 3], 3, 4, 2, [4, 1]),
    ([2, 3, 4, 5, 1, 2, 3, 4, 1, 2, 3, 4], 3, 4, 2, [1, 2]),  # n=4 matches; n=3's earliest match would give [5, 1]
    ([1, 2, 3, 100, 1, 2, 3, 200, 1, 2, 3], 3, 3, 2, [200, 1]),  # most recent; vLLM (earliest) gives [100, 1]
    ([1, 2, 3, 100, 1, 2, 3, 200, 9, 9, 1, 2, 3], 3, 3, 3, [200, 9, 9]),
    ([5, 6, 7], 1, 3, 2, []),  # nothing recurs
    ([7], 1, 1, 3, []),  # the suffix never matches itself
    ([], 1, 2, 3, []),
    ([7, 7], 1, 1, 3, [7, 7, 7]),  # the draft repeats the period past the end
    ([7, 7, 7, 7], 2, 2, 3, [7, 7, 7]),
    ([1, 2, 1, 2, 1], 2, 3, 5, [2, 1, 2, 1, 2]),  # period 2
    ([4, 1, 2, 3, 9, 1, 2, 3], 2, 3, 0, []),  # k = 0
    ([8, 1, 2, 9, 1, 2, 5, 2], 1, 2, 2, [5, 2]),  # only n=1 matches: most recent 2 -> [5, 2]
]


@pytest.mark.parametrize("tokens,lo,hi,k,want", GOLDEN)
def test_golden_scan(tokens, lo, hi, k, want):
    assert scan_draft(tokens, lo, hi, k) == want


@pytest.mark.parametrize("tokens,lo,hi,k,want", GOLDEN)
def test_golden_index_whole(tokens, lo, hi, k, want):
    assert NgramIndex(lo, hi, tokens).draft(k) == want


@pytest.mark.parametrize("tokens,lo,hi,k,want", GOLDEN)
def test_golden_index_token_by_token(tokens, lo, hi, k, want):
    index = NgramIndex(lo, hi)
    for t in tokens:
        index.append([t])
    assert index.draft(k) == want


def test_continue_from_repeats_period():
    assert continue_from([1, 2, 3], 1, 5) == [2, 3, 2, 3, 2]
    assert continue_from([1, 2, 3], 3, 0) == []


def test_index_rejects_bad_range():
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex(3, 2)
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex(0, 2)


@pytest.mark.parametrize("seed", range(40))
def test_incremental_matches_full_scan(seed):
    """Random streams with planted repeats, fed in random chunks; every step agrees with the scan."""
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5, 20, 1000])
    lo = rng.randint(1, 4)
    hi = rng.randint(lo, 6)
    stream: list[int] = []
    while len(stream) < 300:
        if stream and rng.random() < 0.4:  # copy an earlier span: the case drafts exist for
            start = rng.randrange(len(stream))
            stream += stream[start:start + rng.randint(1, 12)]
        else:
            stream += [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
    cut = rng.randrange(0, 40)
    index = NgramIndex(lo, hi, stream[:cut])
    seen = list(stream[:cut])
    pos = cut
    while pos < len(stream):
        for k in (1, rng.randint(1, 8)):
            assert index.draft(k) == scan_draft(seen, lo, hi, k), f"after {len(seen)} tokens, n={lo}..{hi}, k={k}"
        chunk = stream[pos:pos + rng.randint(1, 6)]
        index.append(chunk)
        seen += chunk
        pos += len(chunk)
    assert index.tokens == seen
    assert index.draft(4) == scan_draft(seen, lo, hi, 4)
