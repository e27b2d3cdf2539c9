"""Quick ablations of TurboQuant KV-cache choices on SmolLM2-135M perplexity (CPU).

Faster and more flexible than ``eval_kv_perplexity.py``: the cache is not
paged; each layer's attention quantizes and dequantizes its whole window's
K and V with ``TurboQuantCodec`` (keys centred on their mean as the plugin
does, values as they are) before causal attention, so a variant is a few
lines. Text: CPython's ``pydoc_data.topics``, as in ``eval_kv_perplexity.py``.

Variants printed (perplexity, change against the float32 cache):
- keys and/or values at 4 / 3 / 2 bits, the plugin's choices;
- the first token (the attention sink) kept exact;
- values centred like keys; keys centred on the first token's key;
- 2-bit centroids moved (the shipped grid point, and small moves either way);
- with ``--per-layer BITS``: each layer alone quantized, then every layer but
  the most sensitive ones (which layers carry the damage);
- with ``--recent``: each query reading its latest 16 / 64 positions exact
  (a page not yet quantized), then also the first token (16 / 32 / 64);
  ``--first-and-latest N``: only that, against all quantized, at 4 / 3 / 2 bits;
  adding ``--first S``: the first S tokens exact against the first one, at 4 / 3 bits;
- with ``--offsets N`` (the first and latest N tokens exact): the key offset
  taken from the window, from the engine's start-up text (its tokens after the
  first), or from the
  window's first 128 tokens (a per-sequence offset from its prompt), and a
  per-channel key scale from the start-up text's queries and keys;
- with ``--mixed-bits N`` (the first and latest N tokens exact): keys at more
  bits than values (4 + 2, 4 + 3) against uniform 3 and 4 bits;
- with ``--split-channels``: the mixed 2.5-bit layout (half of each head's
  channels at 3 bits, half at 2) against the uniform formats;
- with ``--outliers N`` (the first and latest N tokens exact): also the keys and
  values of the tokens whose centred key is longest (per layer and KV head, a
  fraction of the window's tokens) exact, against the same fraction chosen at
  random (whether an outlier side table would pay);
- with ``--norm-modes N`` (the first and latest N tokens exact): the stored norm
  (``codec.NORM_MODES``) for keys and values at 3 and 4 bits, and the default
  under other random rotations (``--seeds S`` draws, each its own seed);
- with ``--debias N`` (the first and latest N tokens exact): each quantized key's
  scores less half their noise variance over queries, ``|q|^2 |e|^2 / (2 d^2)``
  (``e``: the key's error, its own or the codec's mean
  times the key's length): a key's error inflates its softmax weight by
  ``exp(variance / 2)`` on average, more for longer keys;
- with ``--draws S`` (the first and latest 64 tokens exact): S random rotations
  (keys and values each their own seed) at 3 and 4 bits, each on the usual
  windows and on as many windows of the text after them: whether a draw that
  does well on one text does well on another;
- with ``--scale-search N`` (the first and latest 64 tokens exact): encoders that try
  N input scales per vector (``TurboQuantCodec.scale_search``) against the plain
  encoder, at 3 and 4 bits, under ``--seeds S`` rotation draws (paired: the same
  draw with and without the search);
- with ``--rotations R`` (the first and latest 64 tokens exact): each token quantized
  under one of R rotation draws (token t under draw t % R; keys only; by runs of 16
  tokens), or under one rotation with the scale search's grid shifted by (t % R) / R
  of a step, against one draw for all tokens (``--seeds S`` such comparisons):
  whether decorrelating the errors of similar tokens pays;
- with ``--query-weighted`` (the first and latest 64 tokens exact): keys coded for the
  least expected score error under a query covariance (per layer and KV head): their
  codes chosen coordinate by coordinate with each rounding error carried into the
  coordinates still to code (greedy least ``e^T C e``), or the codec's own, and the norm
  unbiased or least squares under ``C``; ``C`` from the window's own queries (an oracle),
  from the engine's start-up text or from 2048 tokens after the windows;
- with ``--combined`` (the first and latest 64 tokens exact): the two leads above
  together, at 3 and 4 bits under ``--seeds S`` pairs of rotation draws: keys coded
  for the query covariance of 2048 later tokens, tokens by runs of 16 under two draws,
  and both;
- with ``--principal N`` (the first and latest N tokens exact): keys split in
  the basis of their principal directions (from held-out text of the same
  corpus), the 16 strongest directions at more bits than the other 48, each
  part its own rotated vector with its own norm, at the bytes of a uniform
  format or fewer; values uniform.

    python benchmarks/ablate_turboquant_kv.py [--windows 2] [--window 512] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

import torch

from kernelplane import AttentionMetadata
from kernelplane.kv_cache import allocate_plain_pages
from kernelplane.models import load_model
from kernelplane_quant_turboquant.codebook import codebook_for
from kernelplane_quant_turboquant.codec import SEARCH_STEP, TurboQuantCodec
from kernelplane_quant_turboquant.quantizer import DEFAULT_NORM_MODE, DEFAULT_SCALE_SEARCH

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def unit_error(codec: TurboQuantCodec) -> float:
    """The codec's mean squared error on random unit vectors."""
    x = torch.nn.functional.normalize(torch.randn(8192, codec.dim, generator=torch.Generator().manual_seed(5)), dim=-1)
    return (codec.decode(*codec.encode(x)) - x).pow(2).sum(-1).mean().item()


def round_trip(codec: TurboQuantCodec, x: torch.Tensor, mu: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [tokens, heads, dim]`` quantized and dequantized, stored relative to ``mu``."""
    y = x - mu if mu is not None else x
    return codec.decode(*codec.encode(y)) + (mu if mu is not None else 0)


def split_by_runs(k: torch.Tensor, v: torch.Tensor, pairs, period: int = 1, planes: str = "both",
                  code_keys: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v [tokens, heads, dim]`` with the first token exact and token t after it through
    codec pair ``pairs[t // period % len(pairs)]`` (values: only with ``planes="both"``, else
    the first pair's), keys centred on their mean. ``code_keys(codec, centred keys)`` codes
    and decodes keys some other way than the codec's own round trip."""
    head_k, head_v, k, v = k[:1], v[:1], k[1:], v[1:]
    mu = k.mean(0)
    out_k, out_v = torch.empty_like(k), torch.empty_like(v)
    group = torch.arange(k.shape[0]) // period % len(pairs)
    for i, (kc, vc) in enumerate(pairs):
        pick = group == i
        out_k[pick] = code_keys(kc, k[pick] - mu) + mu if code_keys else round_trip(kc, k[pick], mu)
        out_v[pick] = round_trip(vc if planes == "both" else pairs[0][1], v[pick], None)
    return torch.cat([head_k, out_k]), torch.cat([head_v, out_v])


def through_runs(pairs, period: int = 1, planes: str = "both") -> Transform:
    """``split_by_runs`` as a transform, each codec's own round trip."""
    return lambda k, v: split_by_runs(k, v, pairs, period, planes)


class WindowAttention:
    """An attention backend for one layer: exact causal attention over K/V passed through ``transform``.
    ``recent``: each query reads its last ``recent`` positions (itself included) exact. A
    transform may return a third tensor, each key's squared error (``[tokens, KV heads]``):
    its scores then lose the softmax weight that error adds on average (``--debias``)."""

    def __init__(self, group: int, transform: Optional[Transform], recent: int = 0):
        self.group, self.transform, self.recent = group, transform, recent

    def forward(self, query, pages, meta):
        n = query.shape[0]
        k, v = pages.key.flatten(0, 1)[:n], pages.value.flatten(0, 1)[:n]
        exact_k, exact_v = k, v
        noise = None
        if getattr(self.transform, "wants_queries", False):  # --query-weighted: the window's queries too
            k, v = self.transform(k, v, query.reshape(n, -1, self.group, query.shape[-1]))
        elif self.transform is not None:
            k, v, *noise = self.transform(k, v)
            noise = noise[0].repeat_interleave(self.group, dim=1).transpose(0, 1) if noise else None
        k, v, exact_k, exact_v = (t.repeat_interleave(self.group, dim=1).transpose(0, 1)
                                  for t in (k, v, exact_k, exact_v))
        q = query.transpose(0, 1)
        if not self.recent:
            out = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
            return out.transpose(0, 1)
        i = torch.arange(n)
        lag = i[:, None] - i[None, :]  # query position - key position
        near = (lag >= 0) & (lag < self.recent)
        quantized = q @ k.transpose(1, 2)
        if noise is not None:
            # A key's error e adds q.e / sqrt(d) to its scores: over queries about N(0, |q|^2 |e|^2 / d^2),
            # which inflates its softmax weight by exp(var / 2) on average; take that back (here before
            # the scores' 1 / sqrt(d)).
            quantized = quantized - q.pow(2).sum(-1, keepdim=True) * noise[:, None, :] / (2 * q.shape[-1] ** 1.5)
        scores = torch.where(near, q @ exact_k.transpose(1, 2), quantized) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(lag < 0, float("-inf")).softmax(-1)
        out = (weights * near) @ exact_v + (weights * ~near) @ v
        return out.transpose(0, 1)


def _for_layer(transform, index: int):
    """``transform`` with the layer's index as its last argument (queries kept if it wants them)."""
    if getattr(transform, "wants_queries", False):
        def with_queries(k, v, q):
            return transform(k, v, q, index)
        with_queries.wants_queries = True
        return with_queries
    return lambda k, v: transform(k, v, index)


@torch.inference_mode()
def perplexity(lm, windows: list[list[int]], transform: Optional[Transform],
               layers: Optional[set[int]] = None, recent: int = 0, per_layer: bool = False,
               reference: Optional[list[torch.Tensor]] = None) -> tuple[float, float]:
    """(perplexity, mean KL divergence from ``reference`` in nats per token, or nan).
    ``layers``: the layers whose K/V pass through ``transform`` (default: all);
    ``recent``: that many latest positions of each query read exact; ``reference``: each
    window's next-token log-probabilities under the float32 cache, to compare against, or
    an empty list that this run fills. The divergence moves with every token's
    distribution, not only the next token's probability, so it tells variants apart with
    less noise than the perplexity."""
    model, c = lm.model, lm.config
    group = c.num_heads // c.num_kv_heads
    nll, count, divergence = 0.0, 0, 0.0
    fill = reference is not None and not reference
    for w, ids in enumerate(windows):
        n = len(ids)
        blocks = math.ceil(n / 16)
        caches = [allocate_plain_pages(blocks, 16, c.num_kv_heads, c.head_dim, c.head_dim, torch.float32, "cpu")
                  for _ in range(c.num_layers)]
        for index, layer in enumerate(model.layers):
            wanted = layers is None or index in layers
            t = transform if wanted else None
            if per_layer and t is not None:  # the transform also takes the layer's index
                t = _for_layer(transform, index)
            layer.self_attn.backend = WindowAttention(group, t, recent)
        meta = AttentionMetadata.build([n], [n], [list(range(blocks))], 16)
        logits = model.compute_logits(model(torch.tensor(ids), torch.arange(n), caches, meta))
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll -= logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        count += n - 1
        if fill:
            reference.append(logp.float())
        elif reference is not None:
            ref = reference[w].double()
            divergence += (ref.exp() * (ref - logp)).sum().item()
    return math.exp(nll / count), (divergence / count if reference is not None and not fill else math.nan)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--recent", action="store_true",
                    help="instead: the latest tokens (a partial page) and the first token read exact")
    ap.add_argument("--first-and-latest", type=int, metavar="N", default=0,
                    help="instead: K+V at 4 / 3 / 2 bits, all quantized and with the first and latest N tokens exact")
    ap.add_argument("--mixed-bits", type=int, metavar="N", default=0,
                    help="with the first and latest N tokens exact: keys at more bits than values, against uniform")
    ap.add_argument("--split-channels", action="store_true",
                    help="instead: 2.5 bits as half the channels at 3 bits and half at 2 (the paper's mixed "
                         "layout), against 2, 3 and keys 3 + values 2")
    ap.add_argument("--first", type=int, metavar="S", default=1,
                    help="with --first-and-latest: the first S tokens exact instead of the first one (attention "
                         "sinks), compared in the same run at 4 and 3 bits")
    ap.add_argument("--offsets", type=int, metavar="N", default=0,
                    help="instead: with the first and latest N tokens exact, where the key offset comes from "
                         "(the window, the engine's start-up text, the window's first 128 tokens) and a "
                         "per-channel key scale from the start-up text's queries and keys")
    ap.add_argument("--norm-modes", type=int, metavar="N", default=0,
                    help="with the first and latest N tokens exact: the stored norm's modes, and rotation draws")
    ap.add_argument("--seeds", type=int, default=1, metavar="S",
                    help="with --norm-modes: S rotation draws of the default (the first is the usual seed)")
    ap.add_argument("--draws", type=int, metavar="S", default=0,
                    help="S rotation draws at 3 and 4 bits, on the usual windows and on later ones")
    ap.add_argument("--debias", type=int, metavar="N", default=0,
                    help="with the first and latest N tokens exact: scores less the weight each key's error adds")
    ap.add_argument("--outliers", type=int, metavar="N", default=0,
                    help="with the first and latest N tokens exact: the longest centred keys exact too")
    ap.add_argument("--scale-search", type=int, metavar="N", default=0,
                    help="encoders trying N input scales per vector against the plain one (latest 64 exact)")
    ap.add_argument("--rotations", type=int, metavar="R", default=0,
                    help="tokens spread over R rotation draws (or R scale grids) against one (latest 64 exact)")
    ap.add_argument("--combined", action="store_true",
                    help="the 3- and 4-bit leads together: keys coded for a query covariance from 2048 later "
                         "tokens, and two rotations by runs of 16 tokens (--seeds S pairs of draws)")
    ap.add_argument("--query-weighted", action="store_true",
                    help="keys coded for least score error under a query covariance (latest 64 exact)")
    ap.add_argument("--principal", type=int, metavar="N", default=0,
                    help="instead: with the first and latest N tokens exact, keys split by principal directions "
                         "(the 16 strongest at more bits) against uniform keys at the same or more bytes")
    ap.add_argument("--strong", type=int, default=16, metavar="M",
                    help="with --principal: how many of the 64 directions get more bits")
    ap.add_argument("--rotation-seed", type=int, default=0, metavar="S",
                    help="with --principal: other random rotations for the split's parts")
    ap.add_argument("--score-order", action="store_true",
                    help="with --principal: also directions ordered by their share of the score variance, and "
                         "values split by their own principal directions")
    ap.add_argument("--per-layer", type=int, metavar="BITS", default=0,
                    help="instead: each layer alone with K and V at BITS bits, then all layers but the most "
                         "sensitive ones")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import pydoc_data.topics as topics

    lm = load_model("default", device="cpu", dtype="float32", progress=False)
    dim = lm.config.head_dim
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    codecs = {b: TurboQuantCodec(b, dim, seed=0x7C5A_0001 + dim, norm_mode=DEFAULT_NORM_MODE[b],
                                 scale_search=DEFAULT_SCALE_SEARCH[b]) for b in (2, 3, 4)}
    value_codecs = {b: TurboQuantCodec(b, dim, seed=0x7C5A_0001 + dim, norm_mode=DEFAULT_NORM_MODE[b],
                                       scale_search=DEFAULT_SCALE_SEARCH[b], role="value") for b in (2, 3, 4)}

    def variant(kbits=None, vbits=None, sink=0, center_values=False, key_mu="mean", outliers=0.0,
                random_outliers=False, key_codec=None, value_codec=None, debias=None) -> Transform:
        expected_error = unit_error(key_codec or codecs[kbits]) if debias == "expected" else None

        def transform(k, v):
            head_k, head_v, k, v = k[:sink], v[:sink], k[sink:], v[sink:]
            exact_k, exact_v = k, v
            noise = None
            if kbits:
                mu = k.mean(0) if key_mu == "mean" else head_k[0] if sink else k[0]
                k = round_trip(key_codec or codecs[kbits], k, mu)
                if debias == "actual":  # each key's own squared error
                    noise = (k - exact_k).pow(2).sum(-1)
                elif debias == "expected":  # the codec's mean relative error times the stored vector's length
                    noise = expected_error * (exact_k - mu).pow(2).sum(-1)
            if vbits:
                v = round_trip(value_codec or value_codecs[vbits], v, v.mean(0) if center_values else None)
            if outliers:  # [tokens, heads]: the longest centred keys (or random tokens) exact
                length = (exact_k - exact_k.mean(0)).norm(dim=-1)
                if random_outliers:
                    length = torch.rand(length.shape, generator=torch.Generator().manual_seed(k.shape[0]))
                count = max(1, round(outliers * length.shape[0]))
                keep = torch.zeros_like(length, dtype=torch.bool).scatter_(0, length.topk(count, dim=0).indices, True)
                k = torch.where(keep[..., None], exact_k, k)
                v = torch.where(keep[..., None], exact_v, v)
                noise = torch.where(keep, 0.0, noise) if noise is not None else None
            if noise is not None:
                return torch.cat([head_k, k]), torch.cat([head_v, v]), torch.cat([noise.new_zeros(head_k.shape[:2]),
                                                                                  noise])
            return torch.cat([head_k, k]), torch.cat([head_v, v])
        return transform

    def drawn_codecs(bits: int, draw: int, scale_search: Optional[int] = None) -> tuple[TurboQuantCodec, TurboQuantCodec]:
        """Key and value codecs of rotation draw ``draw``, each its own seed, the default norms
        and (unless given) scale search."""
        return tuple(TurboQuantCodec(bits, dim, seed=0x7C5A_0001 + dim + 7919 * draw + part,
                                     norm_mode=DEFAULT_NORM_MODE[bits],
                                     scale_search=scale_search or DEFAULT_SCALE_SEARCH[bits], role=role)
                     for part, role in ((0, "key"), (1, "value")))

    reference: list[torch.Tensor] = []
    base, _ = perplexity(lm, windows, None, reference=reference)
    print(f"SmolLM2-135M, {args.windows} windows of {args.window} tokens; float32 cache: {base:.4f}")

    def report(name: str, transform: Transform, **kw) -> float:
        """One table row; ``kw`` goes to ``perplexity`` (layers, recent)."""
        p, kl = perplexity(lm, windows, transform, reference=reference, **kw)
        print(f"| {name} | {p:.4f} | {100 * (p / base - 1):+.2f} % | {1000 * kl:.3f} |", flush=True)
        return p

    print("| variant | perplexity | change | KL from float32, millinats per token |\n|---|---|---|---|")
    if args.split_channels:
        split_channels(report, variant, dim)
        return 0
    if args.mixed_bits:
        n = args.mixed_bits
        for kbits, vbits in ((3, 3), (4, 2), (4, 3), (4, 4)):
            report(f"keys {kbits} + values {vbits} bits, first token and latest {n} exact",
                   variant(kbits=kbits, vbits=vbits, sink=1), recent=n)
        return 0
    if args.first_and_latest and args.first > 1:
        n = args.first_and_latest
        for bits in (4, 3):
            for sink in (1, args.first):
                report(f"K+V {bits} bits, first {sink} and latest {n} exact",
                       variant(kbits=bits, vbits=bits, sink=sink), recent=n)
        return 0
    if args.first_and_latest:
        n = args.first_and_latest
        for bits in (4, 3, 2):
            report(f"K+V {bits} bits", variant(kbits=bits, vbits=bits))
            report(f"K+V {bits} bits, first token and latest {n} exact", variant(kbits=bits, vbits=bits, sink=1),
                   recent=n)
        return 0
    if args.recent:
        for bits in (4, 3, 2):
            for recent in (16, 64):
                report(f"K+V {bits} bits, latest {recent} exact", variant(kbits=bits, vbits=bits), recent=recent)
            for recent in (16, 32, 64):
                report(f"K+V {bits} bits, first token and latest {recent} exact",
                       variant(kbits=bits, vbits=bits, sink=1), recent=recent)
        return 0
    if args.offsets:
        offsets(report, codecs, priming_statistics(lm), args.offsets)
        return 0
    if args.norm_modes:
        n = args.norm_modes
        for bits in (3, 4):
            for key_mode, value_mode in (("unbiased", "unbiased"), ("mse", "mse"), ("unbiased", "mse"),
                                         ("length", "length")):
                kc, vc = (TurboQuantCodec(bits, dim, seed=0x7C5A_0001 + dim, norm_mode=mode, role=role)
                          for mode, role in ((key_mode, "key"), (value_mode, "value")))
                report(f"K+V {bits} bits, norms: keys {key_mode}, values {value_mode}; first and latest {n} exact",
                       variant(kbits=bits, vbits=bits, sink=1, key_codec=kc, value_codec=vc), recent=n)
            for seed in range(1, args.seeds):
                kc, vc = drawn_codecs(bits, seed)
                report(f"K+V {bits} bits, default norms, rotation draw {seed}; first and latest {n} exact",
                       variant(kbits=bits, vbits=bits, sink=1, key_codec=kc, value_codec=vc), recent=n)
        return 0
    if args.draws:
        later = [ids[(args.windows + i) * args.window:(args.windows + i + 1) * args.window]
                 for i in range(args.windows)]
        later_base, _ = perplexity(lm, later, None)
        print(f"| (float32 cache on the {args.windows} later windows: {later_base:.4f}) | | |")
        for bits in (3, 4):
            for seed in range(args.draws):
                kc, vc = drawn_codecs(bits, seed)
                transform = variant(kbits=bits, vbits=bits, sink=1, key_codec=kc, value_codec=vc)
                report(f"K+V {bits} bits, rotation draw {seed}, usual windows", transform, recent=64)
                q, _ = perplexity(lm, later, transform, recent=64)
                print(f"| K+V {bits} bits, rotation draw {seed}, later windows | {q:.4f} | "
                      f"{100 * (q / later_base - 1):+.2f} % |", flush=True)
        return 0
    if args.scale_search:
        for bits in (3, 4):
            for seed in range(args.seeds):
                for search in (1, args.scale_search):
                    kc, vc = drawn_codecs(bits, seed, search)
                    print(f"| ({bits}-bit codec, {search} scale(s): squared error on unit vectors "
                          f"{unit_error(kc):.5f}) | | |")
                    report(f"K+V {bits} bits, rotation draw {seed}, {search} input scale(s); first and latest 64 exact",
                           variant(kbits=bits, vbits=bits, sink=1, key_codec=kc, value_codec=vc), recent=64)
        return 0
    if args.rotations:
        def shifted(codec: TurboQuantCodec, shift: float) -> TurboQuantCodec:
            """``codec`` searching scales ``shift`` grid steps away from its own."""
            import copy

            other = copy.copy(codec)
            other._device_cache = {}
            scales = [s * math.exp(shift * SEARCH_STEP) for s in codec.search_scales()]
            other.search_scales = lambda: scales
            return other

        r = args.rotations
        for bits in (3, 4):
            for seed in range(args.seeds):
                draws = [drawn_codecs(bits, seed * r + i) for i in range(r)]
                name = f"K+V {bits} bits, draw {seed * r}"
                report(f"{name}; first and latest 64 exact", through_runs(draws[:1]), recent=64)
                report(f"{name}, token t under draw {seed * r} + t % {r}", through_runs(draws), recent=64)
                report(f"{name}, keys of token t under draw {seed * r} + t % {r}",
                       through_runs(draws, planes="keys"), recent=64)
                report(f"{name}, token t under draw {seed * r} + t // 16 % {r}", through_runs(draws, period=16),
                       recent=64)
                grids = [tuple(shifted(c, i / r) for c in draws[0]) for i in range(r)]
                report(f"{name}, token t searching scales shifted by (t % {r}) / {r} steps",
                       through_runs(grids), recent=64)
        return 0
    if args.query_weighted:
        from kernelplane.engine.engine import KV_PRIMING_TEXT

        sources = {"the start-up text's": query_covariances(lm, lm.tokenizer.encode(KV_PRIMING_TEXT)),
                   "2048 later tokens'": query_covariances(lm, ids[args.windows * args.window:
                                                                 args.windows * args.window + 2048])}
        for bits in (3, 4):
            kc, vc = drawn_codecs(bits, 0)
            name = f"K+V {bits} bits, draw 0"
            report(f"{name}; first and latest 64 exact", variant(kbits=bits, vbits=bits, sink=1, key_codec=kc,
                                                                 value_codec=vc), recent=64)
            for norm in ("unbiased", "weighted"):
                report(f"{name}, keys coded under the window's query covariance, {norm} norm",
                       query_weighted(kc, vc, norm), recent=64)
            report(f"{name}, keys as coded, norm weighted by the window's query covariance",
                   query_weighted(kc, vc, "weighted", codes="codec"), recent=64)
            for source, covs in sources.items():
                report(f"{name}, keys as coded, norm weighted by {source} query covariance",
                       query_weighted(kc, vc, "weighted", codes="codec", covariances=covs), recent=64, per_layer=True)
                report(f"{name}, keys coded and norm weighted by {source} query covariance",
                       query_weighted(kc, vc, "weighted", covariances=covs), recent=64, per_layer=True)
        return 0
    if args.combined:
        covs = query_covariances(lm, ids[args.windows * args.window:args.windows * args.window + 2048])
        for bits in (3, 4):
            for seed in range(args.seeds):
                one, other = drawn_codecs(bits, 2 * seed), drawn_codecs(bits, 2 * seed + 1)
                name = f"K+V {bits} bits, draw {2 * seed}"
                report(f"{name}; first and latest 64 exact", variant(kbits=bits, vbits=bits, sink=1, key_codec=one[0],
                                                                     value_codec=one[1]), recent=64)
                report(f"{name}, keys coded and norm weighted by 2048 later tokens' query covariance",
                       query_weighted(*one, "weighted", covariances=covs), recent=64, per_layer=True)
                report(f"{name} and {2 * seed + 1} by runs of 16 tokens, keys coded and norm weighted by 2048 later "
                       f"tokens' query covariance",
                       query_weighted(*one, "weighted", covariances=covs, more_pairs=(other,)), recent=64,
                       per_layer=True)
                report(f"{name} and {2 * seed + 1} by runs of 16 tokens", through_runs((one, other), period=16),
                       recent=64)
        return 0
    if args.debias:
        n = args.debias
        for bits in (3, 4):
            print(f"| ({bits}-bit codec's squared error on unit vectors: {unit_error(codecs[bits]):.4f}) | | |")
            for debias in (None, "expected", "actual"):
                report(f"K+V {bits} bits, first and latest {n} exact" + (f", scores debiased ({debias} error)"
                                                                        if debias else ""),
                       variant(kbits=bits, vbits=bits, sink=1, debias=debias), recent=n)
        return 0
    if args.outliers:
        n = args.outliers
        for bits in (3, 4):
            report(f"K+V {bits} bits, first token and latest {n} exact", variant(kbits=bits, vbits=bits, sink=1),
                   recent=n)
            for share in (0.01, 0.03):
                for chosen in ("longest centred keys", "random tokens"):
                    report(f"K+V {bits} bits, first, latest {n} and {share:.0%} {chosen} exact",
                           variant(kbits=bits, vbits=bits, sink=1, outliers=share,
                                   random_outliers=chosen == "random tokens"), recent=n)
        return 0
    if args.principal:
        held_out = ids[args.windows * args.window:args.windows * args.window + 2048]
        principal(report, codecs, key_statistics(lm, held_out), args.principal, strong=args.strong,
                  score_order=args.score_order, seed=args.rotation_seed)
        return 0
    if args.per_layer:
        per_layer(report, variant(kbits=args.per_layer, vbits=args.per_layer), args.per_layer,
                  lm.config.num_layers)
        return 0
    for bits in (4, 3):
        report(f"keys {bits} bits", variant(kbits=bits))
        report(f"keys {bits} bits, first token exact", variant(kbits=bits, sink=1))
    report("values 3 bits", variant(vbits=3))
    report("values 3 bits, first token exact", variant(vbits=3, sink=1))
    report("keys + values 4 bits", variant(kbits=4, vbits=4))
    report("keys + values 4 bits, first token exact", variant(kbits=4, vbits=4, sink=1))
    report("keys + values 4 bits, values centred", variant(kbits=4, vbits=4, center_values=True))
    report("keys + values 4 bits, keys centred on the first key", variant(kbits=4, vbits=4, key_mu="first"))
    report("keys + values 3 bits", variant(kbits=3, vbits=3))
    report("keys + values 3 bits, first token exact", variant(kbits=3, vbits=3, sink=1))
    a0, b0 = codebook_for(2, dim).positive_centroids
    shipped = tuple(codecs[2].table[:2].tolist())
    for name, (a, b) in [("Lloyd-Max", (a0, b0)), ("shipped grid point", shipped),
                         ("inner +0.00095", (a0 + 0.00095, b0)), ("inner +0.005", (a0 + 0.005, b0)),
                         ("outer -0.03", (a0, b0 - 0.03)), ("outer +0.03", (a0, b0 + 0.03))]:
        mags = torch.tensor([a, b], dtype=torch.float64)
        codecs[2].table = torch.cat([mags, -mags]).float()
        ascending = torch.cat([-mags.flip(0), mags])
        codecs[2].thresholds = ((ascending[1:] + ascending[:-1]) / 2).float()
        codecs[2]._device_cache.clear()
        report(f"keys + values 2 bits, centroids {name} ({a:.5f}, {b:.5f})", variant(kbits=2, vbits=2))
    return 0


def query_weighted_codes(codec: TurboQuantCodec, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Codes (as centroids, ``[n, d]``) for the scaled unit vectors ``y`` that keep the error
    small where ``h`` (a query covariance in the rotated basis) weighs it: coordinate by
    coordinate, each rounding error carried into the coordinates not yet coded along the
    rows of the Cholesky factor of ``h``'s inverse (least ``e^T h e`` greedily)."""
    d = y.shape[-1]
    damp = 0.01 * h.diagonal().mean()
    u = torch.linalg.cholesky(torch.linalg.inv(h + damp * torch.eye(d, dtype=h.dtype)), upper=True)
    y = y.clone()
    out = torch.empty_like(y)
    for i in range(d):
        c = codec.table[codec.code_of_cell[torch.bucketize(y[:, i], codec.thresholds)]]
        out[:, i] = c
        err = (y[:, i] - c) / u[i, i]
        y[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
    return out


def query_weighted(key_codec: TurboQuantCodec, value_codec: TurboQuantCodec, norm: str, codes: str = "gptq",
                   covariances: Optional[list[torch.Tensor]] = None, more_pairs: tuple = (), period: int = 16):
    """A transform (keys centred, the first token exact) whose keys are coded with a query
    covariance per KV head: the window's own (an oracle), or ``covariances`` (per layer,
    ``[kv_heads, d, d]``, measured on other text; the transform then takes the layer's
    index). ``codes``: ``gptq`` (``query_weighted_codes``) or ``codec`` (the codec's own);
    ``norm``: ``unbiased`` or ``weighted`` (least squares under the covariance: least
    expected score error for those codes). ``more_pairs``: other (key, value) codec pairs;
    token t then goes through pair ``t // period % (1 + len(more_pairs))`` (each rotation
    its own runs of tokens)."""
    pairs = ((key_codec, value_codec),) + tuple(more_pairs)
    d = key_codec.dim

    def transform(k, v, q, layer=None):
        return split_by_runs(k, v, pairs, period, code_keys=lambda kc, x: code_keys(kc, x, q, layer))

    def code_keys(kc, x, q, layer):
        rot = kc.rotation.matrix("cpu")
        out = torch.empty_like(x)
        for h in range(x.shape[1]):
            if covariances is None:
                qh = q[:, h].reshape(-1, d)
                cov = qh.T @ qh / qh.shape[0]
            else:
                cov = covariances[layer][h]
            cov = (rot @ cov @ rot.T).double()  # in the rotated basis
            y = x[:, h] @ rot.T
            length = y.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            scaled = y / length * math.sqrt(d)
            if codes == "gptq":
                c = query_weighted_codes(kc, scaled.double(), cov).float()
            else:
                c = kc.table[kc.codes_of(scaled)]
            c = c / math.sqrt(d)
            if norm == "unbiased":
                scale = length.pow(2) / (c * y).sum(-1, keepdim=True).clamp_min(1e-6)
            else:
                cw = c @ cov.float()
                scale = (cw * y).sum(-1, keepdim=True) / (cw * c).sum(-1, keepdim=True).clamp_min(1e-30)
            out[:, h] = (c * scale) @ rot
        return out

    transform.wants_queries = True
    return transform


def query_covariances(lm, ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the queries' covariance (second moment) per KV head over its query group,
    ``[kv_heads, d, d]``, from one exact prefill of ``ids`` (its first token left out)."""
    c = lm.config
    group = c.num_heads // c.num_kv_heads
    out = []
    for store in record_prefill(lm, ids):
        q = store["q"][1:].unflatten(1, (c.num_kv_heads, group)).transpose(0, 1).flatten(1, 2)  # [kv, n*g, d]
        out.append(q.transpose(1, 2) @ q / q.shape[1])
    return out


def split_round_trip(x: torch.Tensor, mu: Optional[torch.Tensor], by_energy: bool, dim: int) -> torch.Tensor:
    """``x [tokens, heads, dim]`` with half its channels at 3 bits and half at 2, each half
    its own TurboQuant vector (own rotation). ``by_energy``: per head, the half with the
    larger mean square (after ``mu``) gets 3 bits; else the first half does."""
    half = dim // 2
    hi, lo = (TurboQuantCodec(b, half, seed=0x7C5A_0101 + b, norm_mode=DEFAULT_NORM_MODE[b]) for b in (3, 2))
    y = x - mu if mu is not None else x
    if by_energy:
        order = y.pow(2).mean(0).argsort(dim=-1, descending=True)  # [heads, dim]
    else:
        order = torch.arange(dim).expand(x.shape[1], dim)
    index = order.expand(x.shape[0], -1, -1)
    picked = y.gather(2, index)
    out = torch.cat([hi.decode(*hi.encode(picked[..., :half])), lo.decode(*lo.encode(picked[..., half:]))], dim=-1)
    restored = torch.empty_like(out).scatter_(2, index, out)
    return restored + (mu if mu is not None else 0)


def split_channels(report, variant, dim: int) -> None:
    """The issue's mixed 2.5-bit layout against the uniform formats and keys 3 + values 2 bits."""
    def mixed(by_energy):
        return lambda k, v: (split_round_trip(k, k.mean(0), by_energy, dim), split_round_trip(v, None, by_energy, dim))

    report("K+V 2 bits", variant(kbits=2, vbits=2))
    report("K+V 3 bits", variant(kbits=3, vbits=3))
    report("keys 3 + values 2 bits (2.5 on average)", variant(kbits=3, vbits=2))
    report("K+V 2.5 bits: the higher-energy half of each head's channels at 3 bits", mixed(True))
    report("K+V 2.5 bits: a fixed half of the channels at 3 bits", mixed(False))


class RecordingAttention:
    """Exact causal attention that keeps one layer's queries, keys and values (``record_prefill``)."""

    def __init__(self, group: int, store: dict):
        self.group, self.store = group, store

    def forward(self, query, pages, meta):
        n = query.shape[0]
        self.store["q"], self.store["k"], self.store["v"] = query, pages.key.flatten(0, 1)[:n], pages.value.flatten(0, 1)[:n]
        return WindowAttention(self.group, None).forward(query, pages, meta)


@torch.inference_mode()
def record_prefill(lm, ids: list[int]) -> list[dict]:
    """One exact prefill of ``ids``; per layer, its queries, keys and values (``q``, ``k``, ``v``)."""
    model, c = lm.model, lm.config
    stores = [dict() for _ in model.layers]
    for layer, store in zip(model.layers, stores):
        layer.self_attn.backend = RecordingAttention(c.num_heads // c.num_kv_heads, store)
    n = len(ids)
    blocks = math.ceil(n / 16)
    caches = [allocate_plain_pages(blocks, 16, c.num_kv_heads, c.head_dim, c.head_dim, torch.float32, "cpu")
              for _ in range(c.num_layers)]
    model(torch.tensor(ids), torch.arange(n), caches, AttentionMetadata.build([n], [n], [list(range(blocks))], 16))
    return stores


@torch.inference_mode()
def priming_statistics(lm) -> list[dict]:
    """Per layer, from one prefill of the engine's start-up text, over its tokens after the
    first: the key mean (the engine's offset also counts the first token), the keys'
    per-channel variance and the queries' per-channel mean square (per KV head, over its
    query group), each ``[kv_heads, dim]``."""
    from kernelplane.engine.engine import KV_PRIMING_TEXT
    c = lm.config
    group = c.num_heads // c.num_kv_heads
    stats = []
    for store in record_prefill(lm, lm.tokenizer.encode(KV_PRIMING_TEXT)):
        k = store["k"][1:]  # the first token is exact in the tail and would dominate the mean
        q = store["q"][1:].unflatten(1, (c.num_kv_heads, group))
        stats.append({"mu": k.mean(0), "key_var": k.var(0), "query_ms": q.pow(2).mean((0, 2))})
    return stats


def offsets(report, codecs, stats: list[dict], recent: int) -> None:
    """Where the key offset comes from, and a per-channel key scale, with the first and
    latest ``recent`` tokens exact. The scale ``s = (E q^2 / var k)^(1/4)`` multiplies the
    centred keys before quantization (and divides the query, so scores keep their value):
    it minimizes the expected score error when the quantization error is isotropic."""
    def variant(bits, source, scaled=False):
        def transform(k, v, layer):
            head_k, head_v, k, v = k[:1], v[:1], k[1:], v[1:]
            st = stats[layer]
            mu = {"window": k.mean(0), "priming": st["mu"], "prompt": k[:127].mean(0)}[source]
            s = (st["query_ms"] / st["key_var"].clamp_min(1e-6)).pow(0.25) if scaled else torch.ones_like(mu)
            s = s / s.pow(2).mean(-1, keepdim=True).sqrt()
            k = codecs[bits].decode(*codecs[bits].encode((k - mu) * s)) / s + mu
            v = codecs[bits].decode(*codecs[bits].encode(v))
            return torch.cat([head_k, k]), torch.cat([head_v, v])
        return transform

    for bits in (4, 3):
        for source in ("window", "priming", "prompt"):
            report(f"K+V {bits} bits, offset from the {source}", variant(bits, source), recent=recent, per_layer=True)
        for source in ("priming", "prompt"):
            report(f"K+V {bits} bits, offset from the {source}, key scale from the priming text",
                   variant(bits, source, True), recent=recent, per_layer=True)


@torch.inference_mode()
def key_statistics(lm, ids: list[int]) -> list[dict]:
    """Per layer, from one prefill of ``ids`` (tokens after the first): the key mean; the
    principal directions of the centred keys (``[kv_heads, dim, dim]``, columns strongest
    first) with the share of the key energy along each; the same directions ordered by
    their share of the score variance (key energy times the queries' mean square along
    them); the values' principal directions (not centred, as the plugin stores them)."""
    c = lm.config
    group = c.num_heads // c.num_kv_heads
    stats = []
    for store in record_prefill(lm, ids):
        k = store["k"][1:].double()
        mu = k.mean(0)
        y = (k - mu).transpose(0, 1)  # [heads, tokens, dim]
        energy, basis = torch.linalg.eigh(y.transpose(1, 2) @ y)
        energy, basis = energy.flip(-1), basis.flip(-1)
        q = store["q"][1:].double().unflatten(1, (c.num_kv_heads, group))  # [tokens, heads, group, dim]
        query_ms = torch.einsum("thgd,hde->the", q, basis).pow(2).mean(0)
        order = (energy * query_ms).argsort(dim=-1, descending=True)
        v = store["v"][1:].double().transpose(0, 1)
        v_basis = torch.linalg.eigh(v.transpose(1, 2) @ v)[1].flip(-1)
        stats.append({"mu": mu.float(), "basis": basis.float(), "share": (energy / energy.sum(-1, keepdim=True)).float(),
                      "score_basis": basis.gather(2, order[:, None, :].expand_as(basis)).float(),
                      "value_basis": v_basis.float()})
    return stats


def sphere_levels(bits: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Lloyd-Max levels (ascending) for one coordinate of a random unit vector of ``dim``
    times sqrt(dim), from samples (any bit width; the plugin's codebooks stop at 4)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200_000, dim, generator=gen, dtype=torch.float64)
    x = (x / x.norm(dim=1, keepdim=True) * math.sqrt(dim)).flatten()[:1_000_000].sort().values
    levels = x[torch.linspace(0, x.numel() - 1, 2 ** bits + 2).long()[1:-1]]
    for _ in range(60):
        cell = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
        levels = torch.zeros_like(levels).index_add_(0, cell, x) / torch.bincount(cell, minlength=levels.numel())
    return levels.float()


def part_round_trip(z: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    """``z [..., m]`` as TurboQuant stores a vector: a random rotation, each coordinate of
    the unit direction at its nearest level, the norm kept (the "mse" scale)."""
    m = z.shape[-1]
    rot = torch.linalg.qr(torch.randn(m, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]
    rot = rot.float()
    levels = sphere_levels(bits, m)
    norm = z.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    u = (z / norm) @ rot.T * math.sqrt(m)
    q = levels[torch.bucketize(u, (levels[1:] + levels[:-1]) / 2)]
    return (q / math.sqrt(m)) @ rot * norm


def principal(report, codecs, stats: list[dict], recent: int, strong: int = 16, score_order: bool = False,
              seed: int = 0) -> None:
    """Keys split by principal directions against uniform keys, first and latest ``recent``
    exact; offsets and directions from held-out text. Bytes per key at head dim 64
    (codes + fp16 norms): uniform b bits 8b + 2; split 16 at s bits + 48 at w bits
    (16 s + 48 w) / 8 + 4. ``score_order``: also the strongest directions by their share of
    the score variance, and values split too. ``seed``: moves the parts' random rotations
    (how much a result owes to one draw)."""
    print(f"share of the centred keys' energy along the {strong} strongest directions (mean over layers and heads): "
          f"{torch.stack([st['share'][:, :strong].sum(-1) for st in stats]).mean():.3f}")

    def split_round_trip(x, basis, split):
        z = torch.einsum("thd,hde->the", x, basis)
        z = torch.cat([part_round_trip(z[..., :strong], split[0], 1 + 2 * seed),
                       part_round_trip(z[..., strong:], split[1], 2 + 2 * seed)], dim=-1)
        return torch.einsum("the,hde->thd", z, basis)

    def variant(bits, split=None, order="basis", value_split=None):
        def transform(k, v, layer):
            head_k, head_v, k, v = k[:1], v[:1], k[1:], v[1:]
            st = stats[layer]
            if split is None:
                k = codecs[bits].decode(*codecs[bits].encode(k - st["mu"])) + st["mu"]
            else:
                k = split_round_trip(k - st["mu"], st[order], split) + st["mu"]
            if value_split is None:
                v = codecs[bits].decode(*codecs[bits].encode(v))
            else:
                v = split_round_trip(v, st["value_basis"], value_split)
            return torch.cat([head_k, k]), torch.cat([head_v, v])
        return transform

    def name(hi, lo):
        return f"{strong} strongest directions {hi} bits + rest {lo} ({(strong * hi + (64 - strong) * lo) // 8 + 4} B)"

    def split_for(bits):
        """The most bits for the strong part with the rest at ``bits - 1``, within the uniform format's bytes."""
        lo = bits - 1
        return min(8, (8 * (8 * bits - 2) - (64 - strong) * lo) // strong), lo

    for bits, splits in ((4, [split_for(4)]), (3, [(4, 2), split_for(3)] if strong == 16 else [split_for(3)])):
        report(f"keys {bits} bits ({8 * bits + 2} B), values {bits}", variant(bits), recent=recent, per_layer=True)
        for hi, lo in splits if not score_order else []:
            report(f"keys {name(hi, lo)}, values {bits}", variant(bits, (hi, lo)), recent=recent, per_layer=True)
    if score_order:
        for bits in (4, 3):
            report(f"keys {name(*split_for(bits))} by score share, values {bits}",
                   variant(bits, split_for(bits), "score_basis"), recent=recent, per_layer=True)
        if strong == 16:
            report(f"keys and values {name(6, 3)}", variant(4, (6, 3), value_split=(6, 3)), recent=recent,
                   per_layer=True)


def per_layer(report, transform: Transform, bits: int, num_layers: int) -> None:
    """Which layers carry the damage: each alone quantized, then all but the k most sensitive."""
    layers = range(num_layers)
    alone = {i: report(f"layer {i} alone, K+V {bits} bits", transform, layers={i}) for i in layers}
    ranked = sorted(layers, key=lambda i: -alone[i])
    for k in (0, 1, 2, 3, 4, 6):
        kept = set(ranked[:k])
        report(f"all layers K+V {bits} bits but {sorted(kept)}", transform, layers=set(layers) - kept)


if __name__ == "__main__":
    raise SystemExit(main())
