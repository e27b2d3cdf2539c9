"""Discovery through the installed entry point, selection, and the core's conformance kit."""
import pytest

from kernelplane import Capability
from kernelplane.capabilities import SpecRequest
from kernelplane.registry import Registry
from kernelplane.selection import SelectionError, select
from kernelplane.testing import ProposerConformance
from kernelplane_spec_ngram import NgramProposer


@pytest.fixture(scope="module")
def registry():
    return Registry()  # loads every installed entry point, as the engine does


def test_entry_point_is_discovered(registry):
    info = next((p for p in registry.plugins if p.distribution == "kernelplane-spec-ngram"), None)
    assert info is not None, "pip install -e plugins/spec_ngram first"
    assert info.error is None
    assert info.hooks == ["kernelplane_spec_proposers"]
    [ngram] = [p for p in registry.providers(Capability.SPEC_PROPOSER) if p.name == "ngram"]
    assert ngram.priority == 50 and ngram.plugin == "kernelplane-spec-ngram"


def test_chosen_for_method_ngram(registry):
    sel = select(Capability.SPEC_PROPOSER, SpecRequest(method="ngram", num_speculative_tokens=5,
                                                      options={"prompt_lookup_max": 3}), registry=registry)
    assert sel.chosen.name == "ngram"
    assert isinstance(sel.implementation, NgramProposer)
    assert (sel.implementation.options.max_n, sel.implementation.options.num_speculative_tokens) == (3, 5)


def test_refuses_other_methods(registry):
    sel = select(Capability.SPEC_PROPOSER, SpecRequest(method="none"), registry=registry)
    assert sel.chosen.name == "none"
    row = next(r for r in sel.rows() if r["candidate"] == "ngram")
    assert row["verdict"] == "refused" and "method 'none' not supported" in row["reason"]


def test_bad_options_surface_in_the_selection_error(registry):
    with pytest.raises(SelectionError, match="prompt_lookup_min 5 is greater than prompt_lookup_max 2"):
        select(Capability.SPEC_PROPOSER, SpecRequest(method="ngram", options={"prompt_lookup_min": 5,
                                                                              "prompt_lookup_max": 2}),
               registry=registry)


class TestNgramConformance(ProposerConformance):
    provider_name = "ngram"
    method = "ngram"
