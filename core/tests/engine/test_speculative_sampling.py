"""Sampled requests under speculation keep the target's distribution, end to end.

``kernelplane.spec.verify`` proves rejection sampling exact on given
probabilities; this checks the engine's wiring around it (which logit rows
are verified, temperature and top-k applied to them, the bonus token, the
KV rollback) on the tiny Llama: the joint law of the first two tokens, the
second one coming from verifying a point-mass draft, must equal the one
computed from the model's logits (chi-square test, fixed seeds). The same
counts must be far from the law at another temperature: the check has power.
"""
import torch

from kernelplane import Capability, Provider, Requirements, hookimpl
from kernelplane.engine import SamplingParams

CHI2_CRITICAL_0_001 = {8: 26.124}  # upper 0.001 quantile, 8 degrees of freedom
TEMPERATURE, TOP_K, N = 0.7, 3, 2000


class FixedDraftProposer:
    """Always proposes the same single token (limited by what the engine allows)."""

    def __init__(self, token: int):
        self.token = token

    def add_request(self, request_id, prompt_token_ids):
        pass

    def extend(self, request_id, token_ids):
        pass

    def remove_request(self, request_id):
        pass

    def propose(self, request_ids, max_tokens):
        return [[self.token][:limit] for limit in max_tokens]


def register(registry, proposer) -> None:
    class Plugin:
        @hookimpl
        def kernelplane_spec_proposers(self):
            return [Provider("fixed", Capability.SPEC_PROPOSER, 100, lambda request, hardware: proposer,
                             requirements=Requirements(methods=["fixed"]))]

    registry.register(Plugin(), name="fixed-draft-proposer")


def test_joint_law_of_first_two_tokens(tiny, zoo, make_engine, tiny_prompts, fresh_registry):
    prompt = tiny_prompts[0]

    def target(ids, temperature):  # the tempered top-k distribution after ``ids``, from the model's logits
        logits = zoo.kp_prefill_logits(tiny, ids)[-1].double() / temperature
        top = logits.topk(TOP_K)
        return dict(zip(top.indices.tolist(), torch.softmax(top.values, 0).tolist()))

    def joint_law(temperature):
        first = target(prompt, temperature)
        return first, {(a, b): pa * pb for a, pa in first.items()
                       for b, pb in target(prompt + [a], temperature).items()}

    first, joint = joint_law(TEMPERATURE)
    likely = max(first, key=first.get)
    second = {b: p for (a, b), p in joint.items() if a == likely}
    draft = max(second, key=second.get)  # often right, often wrong: both paths run

    register(fresh_registry, FixedDraftProposer(draft))
    engine = make_engine(speculative_method="fixed", num_speculative_tokens=1, max_num_seqs=128,
                         num_kv_blocks=2048, max_waiting=N)
    params = [SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_tokens=3, seed=s, ignore_eos=True)
              for s in range(N)]
    outputs = engine.generate([prompt] * N, params)

    stats = engine.stats()
    assert stats["draft_tokens"] == N  # each request verified exactly one draft, for its second token
    assert 0 < stats["accepted_tokens"] < N
    assert engine.allocator.num_free == engine.allocator.num_blocks
    counts: dict[tuple, int] = {}
    for out in outputs:
        pair = tuple(out.token_ids[:2])
        counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) <= set(joint), f"sampled pairs outside the top-{TOP_K} support: {set(counts) - set(joint)}"

    def chi2(law):
        return sum((counts.get(pair, 0) - N * p) ** 2 / (N * p) for pair, p in law.items())

    critical = CHI2_CRITICAL_0_001[len(joint) - 1]
    assert chi2(joint) < critical, f"chi-square {chi2(joint):.1f}: counts {counts}, target {joint}"
    _, other = joint_law(1.0)
    assert set(other) == set(joint) and chi2(other) > critical, "the test cannot tell temperature 0.7 from 1.0"

