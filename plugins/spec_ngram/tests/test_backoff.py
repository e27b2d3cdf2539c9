"""The draft-length back-off policy, step by step and through the proposer."""
import pytest

from kernelplane.capabilities import SpecRequest
from kernelplane_spec_ngram import DraftBackoff, NgramProposer
from kernelplane_spec_ngram.backoff import INITIAL_COOLDOWN, MAX_COOLDOWN


def test_misses_halve_then_cool_down_then_probe():
    b = DraftBackoff(4)
    assert b.limit() == 4
    b.record(4, 0)
    assert b.limit() == 2
    b.record(2, 0)
    assert b.limit() == 1
    b.record(1, 0)
    assert b.limit() == 0
    for _ in range(INITIAL_COOLDOWN - 1):
        b.record(0, 0)
        assert b.limit() == 0
    b.record(0, 0)
    assert b.limit() == 1  # the probe


def test_failed_probes_double_the_cooldown_up_to_the_cap():
    b = DraftBackoff(1)
    expected = INITIAL_COOLDOWN
    for _ in range(6):
        b.record(1, 0)  # a missed draft (or a failed probe)
        quiet = 0
        while b.limit() == 0:
            b.record(0, 0)
            quiet += 1
        assert quiet == expected
        expected = min(MAX_COOLDOWN, 2 * expected)
    assert expected == MAX_COOLDOWN


def test_success_regrows_and_resets_the_cooldown():
    b = DraftBackoff(8)
    for proposed in (8, 4, 2, 1):
        b.record(proposed, 0)
    for _ in range(INITIAL_COOLDOWN):
        b.record(0, 0)
    assert b.limit() == 1
    b.record(1, 1)
    assert b.limit() == 2
    b.record(2, 2)
    assert b.limit() == 4
    b.record(4, 4)
    b.record(8, 8)
    assert b.limit() == 8  # capped at k
    b.record(8, 3)
    assert b.limit() == 8  # partial acceptance keeps the allowance
    for proposed in (8, 4, 2, 1):
        b.record(proposed, 0)
    quiet = 0
    while b.limit() == 0:
        b.record(0, 0)
        quiet += 1
    assert quiet == INITIAL_COOLDOWN  # the earlier success reset it


def test_steps_without_a_proposal_keep_the_allowance():
    b = DraftBackoff(4)
    b.record(4, 0)
    for _ in range(100):
        b.record(0, 0)
    assert b.limit() == 2


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="accepted 3 of 2"):
        DraftBackoff(4).record(2, 3)
    with pytest.raises(ValueError, match="k must be"):
        DraftBackoff(0)


def _run(proposer, rid, truth, prompt_len, steps):
    """Feed ``truth`` as the target's output, the way the engine would; return drafts proposed per step."""
    proposer.add_request(rid, truth[:prompt_len])
    pos, sizes = prompt_len, []
    for _ in range(steps):
        [draft] = proposer.propose([rid], [8])
        sizes.append(len(draft))
        accepted = 0
        while accepted < len(draft) and draft[accepted] == truth[pos + accepted]:
            accepted += 1
        kept = truth[pos:pos + accepted + 1]  # accepted drafts + the bonus token
        proposer.extend(rid, kept)
        pos += len(kept)
    return sizes


def test_proposer_backs_off_on_a_stream_that_never_repeats_its_continuations():
    # Every bigram recurs, but always followed by something new: drafts always miss.
    truth = [0, 1]
    for i in range(400):
        truth += [0, 1, 100 + i]
    on = NgramProposer.from_request(SpecRequest(method="ngram", num_speculative_tokens=4))
    off = NgramProposer.from_request(SpecRequest(method="ngram", num_speculative_tokens=4, options={"backoff": False}))
    sizes_on = _run(on, "a", truth, 2, 150)
    sizes_off = _run(off, "a", truth, 2, 150)
    assert on.acceptance("a")[1] == off.acceptance("a")[1] == 0
    assert sum(sizes_off) > 3 * sum(sizes_on), (sum(sizes_off), sum(sizes_on))
    drafting = [s for s in sizes_on if s]
    assert drafting[:3] == [4, 2, 1]  # halved after each miss, then cooling down


def test_proposer_keeps_full_drafts_on_a_repeating_stream():
    passage = list(range(50, 90))
    truth = passage + [7] + passage
    proposer = NgramProposer.from_request(SpecRequest(method="ngram", num_speculative_tokens=5))
    sizes = _run(proposer, "r", truth, len(passage) + 3, 6)
    proposed, accepted = proposer.acceptance("r")
    assert accepted == proposed > 0
    assert all(s == 5 for s in sizes)
