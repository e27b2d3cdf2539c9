"""Does the 1-bit QJL residual sketch pay for keys? (TurboQuant's inner-product variant)

The paper's unbiased quantizer for inner products spends b - 1 bits on the
MSE quantizer and 1 bit on a QJL sketch of the residual r = k - k_mse:
``sign(S r)`` with S a d x d Gaussian matrix, plus |r|; then
``<q, k> ~ <q, k_mse> + |r| sqrt(pi/2) / d <S q, sign(S r)>`` (unbiased).
This script compares, at the same b bits per coordinate:

- ``mse``: the b-bit MSE quantizer (shrinks inner products by 1 - MSE);
- ``unbiased-norm``: the same codes with the norm rescaled so that the
  decoded key's component along k is k (what the plugin ships at 3-4 bits);
- ``qjl``: (b-1)-bit MSE + 1-bit QJL residual (one more float16 norm).

on (1) random unit vectors, d = 128: d x mean squared inner-product error
against random unit queries (FACTS.md: 1.55 / 0.57 / 0.18 / 0.054 for the
QJL variant at b = 1..4) and the mean ratio <q, k_hat> / <q, k>;
(2) SmolLM2-135M's real keys and queries (one 512-token window of
``pydoc_data.topics``, every layer and KV head, keys centred as the plugin
does): relative error of the causal attention output (values exact) and
RMS error of the logits.

    python benchmarks/bench_turboquant_qjl.py [--tokens 512]
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from kernelplane_quant_turboquant.codec import TurboQuantCodec


def qjl_sketch(codec_low, k, gen):
    """(k_mse, sign(S r), |r|, S) for keys k [K, d]: (b-1)-bit MSE codes plus a 1-bit QJL sketch of the residual."""
    d = k.shape[-1]
    k_mse = codec_low.decode(*codec_low.encode(k)) if codec_low is not None else torch.zeros_like(k)
    r = k - k_mse
    s = torch.randn(d, d, generator=gen)
    signs = torch.sign(r @ s.T)
    signs[signs == 0] = 1
    return k_mse, signs, r.norm(dim=-1).half().float(), s  # |r| stored as float16, like the other norm


def qjl_logits(sketch, q):
    """Unbiased estimates of q . k for all queries q [Q, d] and sketched keys: [Q, K]."""
    k_mse, signs, r_norm, s = sketch
    d = k_mse.shape[-1]
    return q @ k_mse.T + math.sqrt(math.pi / 2) / d * (q @ s.T) @ signs.T * r_norm[None, :]


def synthetic(bits_list, d=128, n=4000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, d, generator=gen)
    k /= k.norm(dim=-1, keepdim=True)
    q = torch.randn(n, d, generator=gen)
    q /= q.norm(dim=-1, keepdim=True)
    true = (q * k).sum(-1)
    rows = []
    for b in bits_list:
        est = {}
        for mode in ("mse", "unbiased"):
            c = TurboQuantCodec(b, d, seed=11, norm_mode=mode)
            est[mode] = (q * c.decode(*c.encode(k))).sum(-1)
        low = TurboQuantCodec(b - 1, d, seed=11) if b > 1 else None
        k_mse, signs, r_norm, s = qjl_sketch(low, k, gen)
        est["qjl"] = (q * k_mse).sum(-1) + math.sqrt(math.pi / 2) / d * ((q @ s.T) * signs).sum(-1) * r_norm
        for name, e in est.items():
            rows.append((b, name, d * (e - true).pow(2).mean().item(), ((e * true).sum() / (true * true).sum()).item()))
    return rows


def capture_qk(tokens: int):
    """Per layer: queries [T, Hq, D], keys and values [T, Hkv, D] of one window."""
    import pydoc_data.topics as topics

    from kernelplane import AttentionMetadata, AttentionRequest
    from kernelplane.kv_cache import allocate_plain_pages
    from kernelplane.models import load_model
    from kernelplane.reference.attention import ReferenceAttention

    lm = load_model("default", device="cpu", dtype="float32", progress=False)
    c = lm.config
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = lm.tokenizer.encode(text, add_special_tokens=False)[:tokens]
    blocks = math.ceil(tokens / 16)
    caches = [allocate_plain_pages(blocks, 16, c.num_kv_heads, c.head_dim, c.head_dim, torch.float32, "cpu")
              for _ in range(c.num_layers)]
    captured = []
    reference = ReferenceAttention(AttentionRequest(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                                                    head_dim=c.head_dim, dtype="float32", block_size=16))

    class Recorder:
        def forward(self, query, pages, meta):
            k = pages.key.reshape(-1, c.num_kv_heads, c.head_dim)[:tokens].clone()
            v = pages.value.reshape(-1, c.num_kv_heads, c.head_dim)[:tokens].clone()
            captured.append((query.clone(), k, v))
            return reference.forward(query, pages, meta)

    lm.model.set_attention_backend(Recorder())
    meta = AttentionMetadata.build([tokens], [tokens], [list(range(blocks))], 16)
    with torch.inference_mode():
        lm.model(torch.tensor(ids), torch.arange(tokens), caches, meta)
    return captured, c


def real(bits_list, tokens: int):
    captured, c = capture_qk(tokens)
    group = c.num_heads // c.num_kv_heads
    scale = c.head_dim ** -0.5
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    gen = torch.Generator().manual_seed(1)
    totals: dict = {}
    for q_all, k_all, v_all in captured:
        for h in range(c.num_kv_heads):
            k, v = k_all[:, h], v_all[:, h]
            k_c = k - k.mean(dim=0)  # the plugin centres keys: logits move by q . mu, softmax does not
            for b in bits_list:
                logits_by = {}
                for mode in ("mse", "unbiased"):
                    codec = TurboQuantCodec(b, c.head_dim, seed=11, norm_mode=mode)
                    logits_by[mode] = lambda q, kk=codec.decode(*codec.encode(k_c)): q @ kk.T
                low = TurboQuantCodec(b - 1, c.head_dim, seed=11) if b > 1 else None
                logits_by["qjl"] = lambda q, sk=qjl_sketch(low, k_c, gen): qjl_logits(sk, q)
                for qh in range(group):
                    q = q_all[:, h * group + qh]
                    exact = (q @ k_c.T) * scale
                    out = torch.softmax(exact.masked_fill(~mask, float("-inf")), -1) @ v
                    for name, fn in logits_by.items():
                        approx = fn(q) * scale
                        out_q = torch.softmax(approx.masked_fill(~mask, float("-inf")), -1) @ v
                        err = ((out_q - out).norm() / out.norm()).item()
                        logit_rms = (approx - exact)[mask].pow(2).mean().sqrt().item()
                        acc = totals.setdefault((b, name), [0.0, 0.0, 0])
                        acc[0] += err
                        acc[1] += logit_rms
                        acc[2] += 1
    return [(b, name, e / n, l / n) for (b, name), (e, l, n) in sorted(totals.items())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args(argv)
    print("## Random unit vectors, d = 128 (4000 pairs)\n")
    print("| bits | keys | d · E[(<q,k̂> - <q,k>)²] | slope of <q,k̂> on <q,k> |")
    print("|---|---|---|---|")
    for b, name, dist, slope in synthetic([2, 3, 4]):
        print(f"| {b} | {name} | {dist:.4f} | {slope:.4f} |")
    print(f"\n## SmolLM2-135M keys and queries ({args.tokens} tokens of pydoc_data.topics, 30 layers x 3 KV heads x 3 "
          "queries each; keys centred; values exact)\n")
    print("| bits | keys | attention output rel. error (mean) | logit RMS error (mean) |")
    print("|---|---|---|---|")
    for b, name, err, logit in real([2, 3, 4], args.tokens):
        print(f"| {b} | {name} | {err:.4f} | {logit:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
