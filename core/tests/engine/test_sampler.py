"""Batched sampling: each row follows its own request's distribution."""
import torch

from kernelplane.engine import SamplingParams
from kernelplane.engine.sampler import sample_batch, target_probs, target_probs_batch

MIXED = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
         SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=0.5, top_k=20, top_p=0.9),
         SamplingParams(temperature=2.0, top_k=1)]


def textbook_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row, one token at a time: temperature, keep the top k, then the smallest top-p prefix."""
    probs = torch.softmax(logits.double() / params.temperature, -1)
    order = probs.argsort(descending=True).tolist()
    keep = order[: params.top_k] if params.top_k else order
    kept = torch.zeros_like(probs)
    kept[keep] = probs[keep]
    kept /= kept.sum()
    out, mass = torch.zeros_like(probs), 0.0
    for t in keep:
        if mass >= params.top_p:
            break
        out[t], mass = kept[t], mass + float(kept[t])
    return (out / out.sum()).float()


def test_batched_probabilities_follow_each_rows_settings():
    logits = torch.randn(len(MIXED), 300, generator=torch.Generator().manual_seed(0)) * 3
    batched = target_probs_batch(logits, MIXED)
    for i, params in enumerate(MIXED):
        torch.testing.assert_close(batched[i], textbook_probs(logits[i], params), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(target_probs(logits[i], params), batched[i])  # the one-request form
    assert int((batched[1] > 0).sum()) == 5 and int((batched[4] > 0).sum()) == 1  # top-k 5, top-k 1
    assert (batched[0] > 0).all()  # top_p 1 keeps every token


def test_samples_follow_each_rows_distribution():
    """Chi-square per row over 3000 draws (p = 0.001); filtered tokens never come up."""
    vocab, n = 12, 3000
    logits = torch.randn(len(MIXED), vocab, generator=torch.Generator().manual_seed(1)) * 1.5
    probs = target_probs_batch(logits, MIXED).double()
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(MIXED))]
    counts = torch.zeros(len(MIXED), vocab, dtype=torch.float64)
    for _ in range(n):
        for i, t in enumerate(sample_batch(logits, MIXED, gens)):
            counts[i, t] += 1
    critical = [0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26]  # by df
    for i in range(len(MIXED)):
        allowed = probs[i] > 0
        assert counts[i][~allowed].sum() == 0, f"row {i} drew a filtered token"
        common = probs[i] * n >= 5
        observed = torch.cat([counts[i][common], counts[i][allowed & ~common].sum()[None]])
        expected = torch.cat([probs[i][common], probs[i][allowed & ~common].sum()[None]]) * n
        keep = expected > 0
        stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        df = int(keep.sum()) - 1
        if df >= 1:
            assert stat < critical[df], (i, stat, df)


def test_a_seeded_row_draws_the_same_whatever_the_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.0, seed=7)] * 3
    alone = [sample_batch(logits[1:2], params[:1], [torch.Generator().manual_seed(7)])[0] for _ in range(5)]
    together = [sample_batch(logits, params, [torch.Generator().manual_seed(s) for s in (1 + r, 7, 3 * r)])[1]
                for r in range(5)]
    assert together == alone
