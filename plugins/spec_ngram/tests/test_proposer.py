"""The proposer object: protocol behaviour, bad input, options."""
import pytest

from kernelplane.capabilities import SpecRequest
from kernelplane.interfaces import SpeculativeProposer
from kernelplane_spec_ngram import NgramOptions, NgramProposer, UnknownRequestError


def make(k=3, **options):
    return NgramProposer.from_request(SpecRequest(method="ngram", num_speculative_tokens=k, options=options))


def test_is_a_speculative_proposer():
    assert isinstance(make(), SpeculativeProposer)


def test_golden_cases_through_the_proposer():
    p = make(k=2, prompt_lookup_min=3, prompt_lookup_max=4)
    p.add_request("a", [1, 2, 3, 4, 1, 2, 3])
    p.add_request("b", [2, 3, 4, 5, 1, 2, 3, 4, 1, 2, 3, 4])
    p.add_request("c", [1, 2, 3, 100, 1, 2, 3, 200])
    p.extend("c", [1, 2, 3])
    assert p.propose(["a", "b", "c"], [2, 2, 2]) == [[4, 1], [1, 2], [200, 1]]


def test_respects_max_tokens_and_k():
    p = make(k=3, prompt_lookup_min=1, prompt_lookup_max=1)
    p.add_request("r", [5, 5])
    assert p.propose(["r"], [10]) == [[5, 5, 5]]  # capped by k
    assert p.propose(["r"], [2]) == [[5, 5]]
    assert p.propose(["r"], [0]) == [[]]


def test_disable_by_batch_size():
    p = make(k=2, prompt_lookup_min=1, prompt_lookup_max=1, disable_by_batch_size=2)
    for rid in "abc":
        p.add_request(rid, [4, 5, 4])
    assert p.propose(["a", "b"], [2, 2]) == [[5, 4], [5, 4]]
    assert p.propose(["a", "b", "c"], [2, 2, 2]) == [[], [], []]
    p.extend("a", [5])  # an empty proposal scores nothing
    assert p.acceptance("a") == (0, 0)
    assert NgramOptions.from_request(SpecRequest(method="ngram")).disable_by_batch_size is None


def test_requests_are_independent():
    p = make(k=2, prompt_lookup_min=1, prompt_lookup_max=2)
    p.add_request("x", [1, 2, 1])
    p.add_request("y", [1, 3, 1])
    assert p.propose(["x", "y"], [2, 2]) == [[2, 1], [3, 1]]
    p.extend("x", [9])
    assert p.propose(["y"], [2]) == [[3, 1]]


def test_acceptance_is_the_common_prefix():
    p = make(k=3, prompt_lookup_min=1, prompt_lookup_max=1, backoff=False)
    p.add_request("r", [1, 2, 3, 4, 1])
    assert p.propose(["r"], [3]) == [[2, 3, 4]]
    p.extend("r", [2, 3, 9])  # two accepted, then the target's own token
    assert p.acceptance("r") == (3, 2)
    p.extend("r", [1])  # no proposal since the last extend: nothing to score
    assert p.acceptance("r") == (3, 2)
    [draft] = p.propose(["r"], [3])
    assert draft
    p.extend("r", [draft[0] + 1])  # a rejected draft
    assert p.acceptance("r") == (3 + len(draft), 2)


def test_unknown_request_ids_are_errors():
    p = make()
    for call in (lambda: p.propose(["nope"], [2]), lambda: p.extend("nope", [1]),
                 lambda: p.remove_request("nope"), lambda: p.acceptance("nope")):
        with pytest.raises(UnknownRequestError, match="unknown request id 'nope'"):
            call()
    p.add_request("r", [1])
    p.remove_request("r")
    with pytest.raises(KeyError, match="already removed"):
        p.propose(["r"], [1])


def test_bad_calls_are_errors():
    p = make()
    p.add_request("r", [1, 2])
    with pytest.raises(ValueError, match="already added"):
        p.add_request("r", [3])
    with pytest.raises(ValueError, match="2 request ids but 1 max_tokens"):
        p.propose(["r", "r"], [1])
    with pytest.raises(ValueError, match="negative"):
        p.propose(["r"], [-1])


def test_option_defaults_and_aliases():
    req = lambda **o: SpecRequest(method="ngram", num_speculative_tokens=5, options=o)
    assert NgramOptions.from_request(req()) == NgramOptions(2, 4, 5)
    assert NgramOptions.from_request(req(prompt_lookup_min=1, prompt_lookup_max=7)) == NgramOptions(1, 7, 5, True)
    assert NgramOptions.from_request(req(ngram_prompt_lookup_min=3, ngram_prompt_lookup_max=5)) == NgramOptions(3, 5, 5, True)
    # One bound alone pulls the other along when it crosses its default.
    assert NgramOptions.from_request(req(prompt_lookup_min=6)) == NgramOptions(6, 6, 5, True)
    assert NgramOptions.from_request(req(prompt_lookup_max=1)) == NgramOptions(1, 1, 5, True)
    assert NgramOptions.from_request(req(prompt_lookup_max=3)) == NgramOptions(2, 3, 5, True)
    assert NgramOptions.from_request(req(backoff=False)).backoff is False
    assert NgramOptions.from_request(req(prompt_lookup_max=4, ngram_prompt_lookup_max=4)).max_n == 4


@pytest.mark.parametrize("options,message", [
    ({"prompt_lookup_min": 5, "prompt_lookup_max": 3}, "prompt_lookup_min 5 is greater than prompt_lookup_max 3"),
    ({"prompt_lookup_min": 0}, "prompt_lookup_min must be an integer >= 1, got 0"),
    ({"prompt_lookup_max": -2}, "prompt_lookup_max must be an integer >= 1, got -2"),
    ({"prompt_lookup_max": 2.5}, "prompt_lookup_max must be an integer >= 1, got 2.5"),
    ({"prompt_lookup_min": True}, "prompt_lookup_min must be an integer >= 1, got True"),
    ({"prompt_lookup_max": 1000}, "prompt_lookup_max 1000 is above the limit"),
    ({"prompt_lookup_mx": 3}, "unknown ngram option 'prompt_lookup_mx'"),
    ({"backoff": "yes"}, "backoff must be true or false"),
    ({"disable_by_batch_size": 0}, "disable_by_batch_size must be an integer >= 1"),
    ({"prompt_lookup_max": 3, "ngram_prompt_lookup_max": 4}, "given twice with different values"),
])
def test_bad_options_are_explained(options, message):
    with pytest.raises(ValueError, match=message):
        NgramProposer.from_request(SpecRequest(method="ngram", options=options))
