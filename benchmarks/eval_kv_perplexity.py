"""Perplexity and greedy agreement of SmolLM2-135M with quantized KV caches (CPU).

Text: the English reference documentation that ships inside CPython
(``pydoc_data.topics``: the language reference's topics, sorted by name,
joined with blank lines), so nothing is downloaded. It is cut into windows
of ``--window`` tokens; each window is one prefill whose attention reads
every key and value back from the cache in the format under test (the
current token's own K/V included), so every position sees what a decode
step would see.

Formats: the plain float32 cache; TurboQuant 4/3/2 bits (the
quant_turboquant plugin as shipped: centred keys, norm mode per bits; and
``turboquantN:paper``, the paper's MSE quantizer without centring;
``turboquantN:nosearch``, the shipped format without the encoder's scale search); the core's
round-to-nearest int8 (absmax per token and head); and round-to-nearest at
4/3/2 bits (``rtn4`` ...: asymmetric min-max per token and head, float16
scale and offset, implemented here as the same-bits baseline).

Quantized caches are primed as the engine primes them (one prefill of its
fixed start-up text), so TurboQuant's key offset comes from that text.

``--exact-tail N``: the quantized caches also keep each sequence's first and
latest N tokens exact (``kernelplane.exact_tail``, as the engine does by
default), and each window is fed one token per step, as decoding would: a
prefill reads the tail only for its sequence's last N positions.

Per format: perplexity over all windows, its change against the plain
cache, the mean KL divergence of each position's next-token distribution from
the plain cache's (steadier than the perplexity change, which hangs on the
few tokens whose probability happens to move), top-1 agreement of next-token
predictions with the plain cache (teacher-forced, every position), and greedy generation from ``--prompts``
prompts: tokens generated before the first divergence from the plain
cache's greedy output, out of ``--gen`` tokens.

    python benchmarks/eval_kv_perplexity.py [--windows 6] [--window 1024] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import torch

from kernelplane import AttentionMetadata, AttentionRequest, KVPages, KVQuantRequest
from kernelplane.engine.engine import prime_kv_cache
from kernelplane.exact_tail import ExactTail
from kernelplane.kv_cache import allocate_plain_pages
from kernelplane.models import load_model
from kernelplane.reference.attention import ReferenceAttention
from kernelplane.reference.kv_quant import RoundToNearestKVQuantizer

BLOCK = 16


def log(*args):
    print(*args, flush=True)


class MinMaxRTN:
    """Round-to-nearest b-bit KV cache: per token and head, codes in [0, 2^b - 1]
    over [min, max] (float16 scale and offset). Codes are kept one per byte
    here (the baseline's accuracy is what is measured, not its size)."""

    def __init__(self, bits: int):
        self.bits, self.levels, self.format = bits, 2 ** bits - 1, f"rtn{bits}"

    def bytes_per_token(self, heads, dim, dim_v) -> float:
        """Bytes if packed: b bits per value plus two float16 per vector."""
        return heads * ((dim + dim_v) * self.bits / 8 + 2 * 4)

    def allocate(self, num_blocks, block_size, heads, dim, dim_v, device) -> KVPages:
        t = {}
        for plane, d in (("key", dim), ("value", dim_v)):
            t[plane] = torch.zeros(num_blocks, block_size, heads, d, dtype=torch.uint8, device=device)
            t[plane + "_scale"] = torch.zeros(num_blocks, block_size, heads, 2, dtype=torch.float16, device=device)
        return KVPages(self.format, block_size, heads, dim, dim_v, t, quantizer=self)

    def write(self, pages, key, value, slot_mapping):
        for plane, x in (("key", key), ("value", value)):
            x = x.float()
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            scale = ((hi - lo) / self.levels).clamp_min(1e-8).half()
            lo = lo.half()
            q = ((x - lo.float()) / scale.float()).round().clamp(0, self.levels).to(torch.uint8)
            pages.tensors[plane].view(-1, *q.shape[1:]).index_copy_(0, slot_mapping, q)
            meta = torch.cat([scale, lo], dim=-1)
            pages.tensors[plane + "_scale"].view(-1, *meta.shape[1:]).index_copy_(0, slot_mapping, meta)

    def dequantize(self, pages, block_ids):
        out = []
        for plane in ("key", "value"):
            q = pages.tensors[plane].index_select(0, block_ids).float()
            s = pages.tensors[plane + "_scale"].index_select(0, block_ids).float()
            out.append(q * s[..., :1] + s[..., 1:])
        return out[0], out[1]


def make_quantizer(fmt: str, config, norm_mode: str, rotation_draw: int = 0):
    name, _, variant = fmt.partition(":")
    request = KVQuantRequest(format=name if not name.startswith("rtn") else "int8", num_kv_heads=config.num_kv_heads,
                             head_dim=config.head_dim, dtype="float32", block_size=BLOCK)
    if name.startswith("turboquant"):
        from kernelplane_quant_turboquant.quantizer import TurboQuantKVQuantizer

        options = dict(norm_mode=norm_mode or None, rotation_draw=rotation_draw)
        if variant == "paper":
            options.update(norm_mode="mse", center_keys=False)
        elif variant == "nosearch":
            options.update(scale_search=1)
        return TurboQuantKVQuantizer(request, **options)
    if fmt == "int8":
        return RoundToNearestKVQuantizer(request)
    if fmt.startswith("rtn"):
        return MinMaxRTN(int(fmt[3:]))
    return None


class Runner:
    """Runs the model over one sequence at a time with a fresh cache of one format."""

    def __init__(self, lm, fmt: str, norm_mode: str, max_tokens: int, exact_tail: int = 0, rotation_draw: int = 0):
        self.model, self.config = lm.model, lm.config
        c = self.config
        self.quantizer = make_quantizer(fmt, c, norm_mode, rotation_draw)
        self.exact_tail = exact_tail if self.quantizer is not None else 0
        blocks = math.ceil(max_tokens / BLOCK)
        if self.quantizer is None:
            self.caches = [allocate_plain_pages(blocks, BLOCK, c.num_kv_heads, c.head_dim, c.head_dim, torch.float32, "cpu")
                           for _ in range(c.num_layers)]
        else:
            self.caches = [self.quantizer.allocate(blocks, BLOCK, c.num_kv_heads, c.head_dim, c.head_dim, "cpu")
                           for _ in range(c.num_layers)]
            for pages in self.caches if self.exact_tail else []:
                pages.exact_tail = ExactTail.allocate(self.exact_tail, 1, c.num_kv_heads, c.head_dim, c.head_dim,
                                                      torch.float32, "cpu")
        self.table = list(range(blocks))
        kv_format = "float32" if self.quantizer is None else self.quantizer.format
        self.attention = ReferenceAttention(AttentionRequest(
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype="float32",
            kv_cache_format=kv_format if kv_format != "float32" else "auto", block_size=BLOCK))
        if self.quantizer is not None:  # as the engine does at start-up, so the key offset is the engine's
            self.model.set_attention_backend(self.attention)
            prime_kv_cache(self.model, lm.tokenizer, self.caches, blocks, BLOCK, "cpu")

    @torch.inference_mode()
    def step(self, token_ids: list[int], start: int) -> torch.Tensor:
        """Logits [len(token_ids), vocab] for tokens at positions start.. (earlier ones already cached)."""
        n = len(token_ids)
        meta = AttentionMetadata.build([n], [start + n], [self.table[: math.ceil((start + n) / BLOCK)]], BLOCK,
                                       seq_slots=[0] if self.exact_tail else None)
        self.model.set_attention_backend(self.attention)
        hidden = self.model(torch.tensor(token_ids), torch.arange(start, start + n), self.caches, meta)
        return self.model.compute_logits(hidden)


def evaluate(lm, fmt, norm_mode, windows, prompts, gen_tokens, reference=None, exact_tail=0, rotation_draw=0):
    max_tokens = max(max(len(w) for w in windows), max(len(p) for p in prompts) + gen_tokens)
    runner = Runner(lm, fmt, norm_mode, max_tokens, exact_tail, rotation_draw)
    nll, count, preds, logps, divergence = 0.0, 0, [], [], 0.0
    for index, w in enumerate(windows):
        if runner.exact_tail:  # one token per step: every position reads the tail as a decode step does
            logits = torch.cat([runner.step([t], i) for i, t in enumerate(w)])
        else:
            logits = runner.step(w, 0)
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        target = torch.tensor(w[1:])
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += len(w) - 1
        preds.append(logits[:-1].argmax(-1))
        if reference is None:
            logps.append(logp.float())
        else:
            ref = reference["logps"][index].double()
            divergence += (ref.exp() * (ref - logp)).sum().item()
    generations = []
    for p in prompts:
        out = []
        logits = runner.step(p, 0)
        for i in range(gen_tokens):
            token = int(logits[-1].argmax())
            out.append(token)
            if i + 1 < gen_tokens:
                logits = runner.step([token], len(p) + i)
        generations.append(out)
    q = runner.quantizer
    mode = (q.key_codec.norm_mode + (", centred keys" if q.center_keys else "")
            + (f", {q.key_codec.scale_search} scales searched" if q.key_codec.scale_search > 1 else "")
            if hasattr(q, "key_codec") else "")
    if runner.exact_tail:
        mode += f"{', ' if mode else ''}first + latest {runner.exact_tail} exact"
    if rotation_draw and hasattr(q, "key_codec"):
        mode += f", rotation draw {rotation_draw}"
    result = dict(format=fmt, norm_mode=mode, ppl=math.exp(nll / count), tokens=count)
    if runner.quantizer is not None and hasattr(runner.quantizer, "bytes_per_token"):
        c = lm.config
        result["bytes_per_token_layer"] = runner.quantizer.bytes_per_token(c.num_kv_heads, c.head_dim, c.head_dim)
    if reference is not None:
        same = sum(int((a == b).sum()) for a, b in zip(preds, reference["preds"]))
        result["top1_agreement"] = same / count
        result["kl"] = divergence / count
        prefix = []
        for g, r in zip(generations, reference["generations"]):
            k = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r))
            prefix.append(k)
        result["greedy_prefix"] = prefix
    return result, dict(preds=preds, generations=generations, logps=logps)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--formats", default="turboquant4,turboquant3,turboquant2,turboquant4:paper,turboquant3:paper,"
                                         "turboquant2:paper,int8,rtn4,rtn3,rtn2")
    ap.add_argument("--norm-modes", default="", help="TurboQuant norm modes to try, comma-separated "
                                                     "(mse,length,unbiased); default: the plugin's choice per bits")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--exact-tail", type=int, default=0, metavar="N",
                    help="quantized caches keep each sequence's first and latest N tokens exact (windows decoded "
                         "one token per step)")
    ap.add_argument("--rotation-draw", type=int, default=0, metavar="S",
                    help="TurboQuant caches under another pair of random rotations (0: the engine's); how much a "
                         "result owes to the draw")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    lm = load_model("default", device="cpu", dtype="float32", progress=False)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    need = args.windows * args.window
    if len(ids) < need + args.prompts * args.prompt_len:
        raise SystemExit(f"text has {len(ids)} tokens, need {need + args.prompts * args.prompt_len}")
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    prompts = [ids[need + i * args.prompt_len: need + (i + 1) * args.prompt_len] for i in range(args.prompts)]
    log(f"text: pydoc_data.topics (CPython {sys.version.split()[0]}), {len(ids)} tokens; "
        f"{args.windows} windows x {args.window} tokens; {args.prompts} prompts x {args.prompt_len}, {args.gen} generated")

    t0 = time.time()
    base, ref = evaluate(lm, "float32", "", windows, prompts, args.gen)
    log(f"float32: ppl {base['ppl']:.4f} ({time.time() - t0:.0f}s)")
    results = [base]
    for fmt in args.formats.split(","):
        modes = args.norm_modes.split(",") if fmt.startswith("turboquant") and ":" not in fmt else [""]
        for mode in modes:
            t = time.time()
            r, _ = evaluate(lm, fmt, mode, windows, prompts, args.gen, reference=ref, exact_tail=args.exact_tail,
                            rotation_draw=args.rotation_draw)
            r["delta_ppl"] = r["ppl"] / base["ppl"] - 1
            results.append(r)
            log(f"{fmt} {mode}: ppl {r['ppl']:.4f} ({100 * r['delta_ppl']:+.2f} %), KL {1000 * r['kl']:.3f} millinats "
                f"per token, top-1 agreement "
                f"{100 * r['top1_agreement']:.2f} %, greedy prefix {r['greedy_prefix']} of {args.gen} ({time.time() - t:.0f}s)")

    lines = [f"SmolLM2-135M-Instruct (GGUF Q4_1 weights, float32 compute, CPU); text: pydoc_data.topics of CPython "
             f"{sys.version.split()[0]}, {args.windows} windows x {args.window} tokens; greedy: {args.prompts} prompts "
             f"x {args.gen} tokens.", "",
             "| KV cache | TurboQuant settings | bytes/token/layer | perplexity | Δ ppl | KL, millinats/token | "
             "top-1 agreement | greedy tokens before divergence |",
             "|---|---|---|---|---|---|---|---|"]
    plain_bytes = 2 * lm.config.num_kv_heads * lm.config.head_dim * 4  # the float32 cache used here
    for r in results:
        delta = f"{100 * r['delta_ppl']:+.2f} %" if "delta_ppl" in r else "-"
        agree = f"{100 * r['top1_agreement']:.2f} %" if "top1_agreement" in r else "-"
        kl = f"{1000 * r['kl']:.3f}" if "kl" in r else "-"
        prefix = "/".join(map(str, r["greedy_prefix"])) if "greedy_prefix" in r else "-"
        size = r.get("bytes_per_token_layer", plain_bytes)
        lines.append(f"| {r['format']} | {r['norm_mode']} | {size} | {r['ppl']:.4f} | {delta} | {kl} | {agree} | "
                     f"{prefix} |")
    md = "\n".join(lines) + "\n"
    log(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kv_perplexity.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "kv_perplexity.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
