"""Draft verification: greedy golden cases and the exactness of rejection sampling.

The statistical tests draw many independent verification steps (vectorized
through ``rejection_sample_batch``) and run a chi-square goodness-of-fit test
against the target distribution at significance 0.001. Seeds are fixed, so
the outcome is deterministic; the negative controls show that the same test
rejects samplers with known bugs.
"""
import pytest
import torch

from kernelplane.spec.verify import (
    greedy_accept, greedy_accept_batch, rejection_sample, rejection_sample_batch, row_offsets,
)

# Upper 0.001 quantiles of the chi-square distribution, by degrees of freedom.
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}

# A target over 6 tokens; token 5 has probability 0 (as after top-k / top-p).
P0 = torch.tensor([0.10, 0.25, 0.30, 0.05, 0.30, 0.00], dtype=torch.float64)
P1 = torch.tensor([0.40, 0.05, 0.15, 0.20, 0.20, 0.00], dtype=torch.float64)
P2 = torch.tensor([0.05, 0.05, 0.60, 0.10, 0.20, 0.00], dtype=torch.float64)
WRONG_Q = torch.tensor([0.02, 0.02, 0.02, 0.70, 0.04, 0.20], dtype=torch.float64)  # the proposer's bad guess
N = 20_000


# ---- greedy -----------------------------------------------------------------

@pytest.mark.parametrize("drafts, argmax, expected", [
    ([5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8]),   # all accepted + bonus
    ([5, 6, 7], [5, 9, 7, 8], [5, 9]),         # second draft wrong: target's token replaces it
    ([5, 6, 7], [1, 6, 7, 8], [1]),            # first draft wrong
    ([], [4], [4]),                            # no drafts: just the target's token
    ([3, 3], [3, 3, 3], [3, 3, 3]),
])
def test_greedy_golden(drafts, argmax, expected):
    assert greedy_accept(drafts, argmax) == expected
    assert greedy_accept(drafts, torch.tensor(argmax)) == expected


def test_greedy_batch_ragged_rows():
    drafts = [[1, 2], [], [7, 8, 9], [4]]
    argmax = torch.tensor([1, 2, 3,  5,  7, 0, 9, 9,  4, 6])
    assert row_offsets(drafts) == [0, 3, 4, 8, 10]
    assert greedy_accept_batch(drafts, argmax) == [[1, 2, 3], [5], [7, 0], [4, 6]]


def test_greedy_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="need 4"):
        greedy_accept([1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="one-dimensional"):
        greedy_accept([1], torch.zeros(2, 3, dtype=torch.long))


# ---- rejection sampling: basics ----------------------------------------------

def test_rejection_sample_shapes_and_errors():
    probs = torch.softmax(torch.randn(3, 10), dim=-1)
    out = rejection_sample([1, 2], probs, torch.Generator().manual_seed(0))
    assert 1 <= len(out) <= 3 and all(0 <= t < 10 for t in out)
    with pytest.raises(ValueError, match=r"target_probs must be \[3, vocab\]"):
        rejection_sample([1, 2], probs[:2])
    with pytest.raises(ValueError, match="draft token ids"):
        rejection_sample([1, 12], probs)
    with pytest.raises(ValueError, match="draft_probs must be"):
        rejection_sample([1, 2], probs, draft_probs=torch.ones(3, 10) / 10)
    with pytest.raises(ValueError, match="one generator per request"):
        rejection_sample_batch([[1], [2]], torch.softmax(torch.randn(4, 10), -1), [None])
    assert rejection_sample_batch([], torch.empty(0, 10), []) == []


def test_certain_target_is_followed_exactly():
    # One-hot target rows: a draft equal to the one-hot token is always kept,
    # any other is always replaced by it; the bonus is the last row's token.
    probs = torch.nn.functional.one_hot(torch.tensor([3, 1, 4]), 8).float()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert rejection_sample([3, 1], probs, g) == [3, 1, 4]
        assert rejection_sample([3, 2], probs, g) == [3, 1]
        assert rejection_sample([0, 1], probs, g) == [3]


def test_reproducible_per_request_generator_whatever_the_batch():
    torch.manual_seed(0)
    probs_a = torch.softmax(torch.randn(3, 50), -1)
    probs_b = torch.softmax(torch.randn(2, 50), -1)
    alone = rejection_sample([7, 8], probs_a, torch.Generator().manual_seed(42))
    for _ in range(3):
        batched = rejection_sample_batch([[9], [7, 8]], torch.cat([probs_b, probs_a]),
                                         [torch.Generator().manual_seed(1), torch.Generator().manual_seed(42)])
        assert batched[1] == alone


def test_zero_probability_tokens_are_never_emitted():
    probs = torch.stack([P0, P1, P2]).repeat(2000, 1)
    drafts = [[5, 5]] * 2000  # drafts the target forbids: always rejected
    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    out = rejection_sample_batch(drafts, probs, gens)
    assert all(len(o) == 1 and o[0] != 5 for o in out)


# ---- rejection sampling: the output distribution is the target's ---------------

def chi_square(samples: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens with p > 0, and its degrees of freedom.

    Any sample on a zero-probability token makes the statistic infinite.
    """
    counts = torch.bincount(samples, minlength=len(p)).double()
    if counts[p == 0].sum() > 0:
        return float("inf"), int((p > 0).sum()) - 1
    expected = counts.sum() * p[p > 0]
    return float(((counts[p > 0] - expected) ** 2 / expected).sum()), int((p > 0).sum()) - 1


def fits(samples: torch.Tensor, p: torch.Tensor) -> bool:
    stat, df = chi_square(samples, p)
    return stat < CHI2_CRITICAL_0_001[df]


def run_steps(sampler, draft_source: str, seed: int = 0):
    """N independent verification steps with k = 2 drafts over a context-free target.

    The target rows are P0, P1, P2 whatever the drafts (a model that ignores
    its context), so the true distribution of the second emitted token is P1
    whatever the first one was. Returns (first tokens, second tokens where emitted).
    """
    g = torch.Generator().manual_seed(seed + 1000)
    if draft_source == "constant":
        drafts_t = torch.full((N, 2), 2)
    else:
        drafts_t = torch.multinomial(WRONG_Q, 2 * N, replacement=True, generator=g).view(N, 2)
    drafts = drafts_t.tolist()
    probs = torch.stack([P0, P1, P2]).repeat(N, 1).float()
    gens = [torch.Generator().manual_seed(seed * N + i) for i in range(N)]
    draft_probs = WRONG_Q.repeat(2 * N, 1).float() if draft_source == "wrong_q_with_probs" else None
    out = sampler(drafts, probs, gens, draft_probs)
    first = torch.tensor([o[0] for o in out])
    second = torch.tensor([o[1] for o in out if len(o) > 1])
    return first, second


@pytest.mark.parametrize("draft_source", ["constant", "wrong_q_as_point_mass", "wrong_q_with_probs"])
def test_rejection_sampling_preserves_the_target_distribution(draft_source):
    first, second = run_steps(rejection_sample_batch, draft_source)
    assert len(second) > 1000, "too few second tokens for the test to have power"
    assert fits(first, P0), chi_square(first, P0)
    assert fits(second, P1), chi_square(second, P1)


# Samplers with known bugs: the same test must reject them.

def accept_always(drafts, probs, gens, draft_probs):
    offsets = row_offsets(drafts)
    return [list(d) + [int(torch.multinomial(probs[offsets[i] + len(d)], 1, generator=gens[i]))]
            for i, d in enumerate(drafts)]


def resample_from_p_not_residual(drafts, probs, gens, draft_probs):
    """Accepts correctly but, on rejection, samples from p instead of the residual."""
    out, offsets = [], row_offsets(drafts)
    for i, d in enumerate(drafts):
        row, toks = offsets[i], []
        for j, t in enumerate(d):
            if torch.rand((), generator=gens[i]) < probs[row + j, t]:
                toks.append(t)
            else:
                toks.append(int(torch.multinomial(probs[row + j], 1, generator=gens[i])))
                break
        else:
            toks.append(int(torch.multinomial(probs[row + len(d)], 1, generator=gens[i])))
        out.append(toks)
    return out


@pytest.mark.parametrize("sampler", [accept_always, resample_from_p_not_residual])
def test_negative_control_the_test_catches_a_wrong_sampler(sampler):
    first, _ = run_steps(sampler, "constant")
    assert not fits(first, P0)
