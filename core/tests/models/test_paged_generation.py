"""The model driven over the paged KV cache the way the engine drives it (several
sequences per batch, chunked prefill, sequences joining mid-decode), against
transformers' greedy decoding of each sequence on its own."""
from __future__ import annotations

import random

import pytest
import torch

from kernelplane import select
from kernelplane.kv_cache import AttentionMetadata, allocate_plain_pages
from kernelplane.models import load_model, load_model_config


class PagedDriver:
    """Greedy decoding of several sequences in shared batches over a paged cache.

    Blocks are handed out in shuffled order (sequences never get contiguous
    pages) and the cache starts as random garbage, so a slot read before it
    is written shows up as a wrong token. Prompts are prefilled in chunks of
    ``prefill_chunk`` tokens; sequence ``b`` joins the batch at step
    ``join_steps[b]``, so prefill chunks and decode tokens share steps.
    """

    def __init__(self, loaded, block_size: int = 4, num_blocks: int = 256, seed: int = 0, backend: str = "reference"):
        self.model, cfg = loaded.model, loaded.config
        self.dtype = next(self.model.parameters()).dtype
        dtype_name = str(self.dtype).removeprefix("torch.")
        self.block_size = block_size
        self.attention = select("attention", cfg.attention_request(dtype=dtype_name, block_size=block_size),
                                override=backend).implementation
        self.model.set_attention_backend(self.attention)
        gen = torch.Generator().manual_seed(seed)
        self.caches = []
        for _ in range(cfg.num_layers):
            pages = allocate_plain_pages(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim, self.dtype, "cpu")
            for t in pages.tensors.values():
                t.copy_(torch.randn(t.shape, generator=gen) * 3)
            self.caches.append(pages)
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, prefill_chunk: int = 1 << 30,
                 join_steps: list[int] | None = None) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy tokens per sequence, and float32 logits for every position fed ([len(prompt)+n-1, vocab])."""
        n = len(prompts)
        join_steps = join_steps or [0] * n
        tokens = [list(p) for p in prompts]
        fed = [0] * n
        generated: list[list[int]] = [[] for _ in range(n)]
        logits_rows: list[list[torch.Tensor]] = [[] for _ in range(n)]
        tables = []
        for p in prompts:
            need = -(-(len(p) + max_new_tokens) // self.block_size)
            tables.append([self.free_blocks.pop() for _ in range(need)])

        step = 0
        while any(len(g) < max_new_tokens for g in generated):
            batch = []
            for b in range(n):
                if step < join_steps[b] or len(generated[b]) == max_new_tokens:
                    continue
                end = min(fed[b] + prefill_chunk, len(prompts[b])) if fed[b] < len(prompts[b]) else len(tokens[b])
                batch.append((b, fed[b], end))
            step += 1
            if not batch:
                continue
            ids = [t for b, s, e in batch for t in tokens[b][s:e]]
            positions = [p for _, s, e in batch for p in range(s, e)]
            meta = AttentionMetadata.build([e - s for _, s, e in batch], [e for _, _, e in batch],
                                           [tables[b] for b, _, _ in batch], self.block_size)
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.caches, meta)
            logits = self.model.compute_logits(hidden)
            row = 0
            for b, s, e in batch:
                logits_rows[b].append(logits[row:row + e - s])
                row += e - s
                fed[b] = e
                if fed[b] == len(tokens[b]):  # everything fed: the last row picks the next token
                    nxt = int(logits[row - 1].argmax())
                    generated[b].append(nxt)
                    tokens[b].append(nxt)
        return generated, [torch.cat(rows) for rows in logits_rows]


TINY_TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.",
              "A paged KV cache stores keys and values in fixed-size blocks. Continuous batching admits new requests",
              "def add(a, b):\n    return a + b\n", "12345 and 3.14159"]


@pytest.mark.parametrize("name", ["llama", "llama-tied", "llama3-rope", "qwen2", "qwen3"])
def test_tiny_batched_greedy_matches_transformers(zoo, name):
    loaded, hf = zoo.tiny_kp(name), zoo.tiny_hf(name)
    prompts = [loaded.tokenizer.encode(t) for t in TINY_TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    driver = PagedDriver(loaded, block_size=4)
    tokens, logits = driver.generate(prompts, 20, prefill_chunk=7, join_steps=[0, 0, 1, 3, 6])
    for prompt, ours, rows in zip(prompts, tokens, logits):
        assert ours == zoo.hf_greedy(hf, prompt, 20)
        torch.testing.assert_close(rows, zoo.hf_prefill_logits(hf, prompt + ours[:-1]), atol=1e-4, rtol=1e-5)


def test_tiny_bfloat16_weights(zoo):
    loaded = load_model(str(zoo.tiny_checkpoint("llama")), dtype="bfloat16", progress=False)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.rotary.cos.dtype == torch.float32  # positions stay exact
    prompt = loaded.tokenizer.encode(TINY_TEXTS[2])
    _, (rows,) = PagedDriver(loaded, block_size=4).generate([prompt], 1)
    theirs = zoo.hf_prefill_logits(zoo.tiny_hf("llama"), prompt)
    assert rows.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits: close to float32 transformers, not equal.
    assert (rows - theirs).abs().max() < 0.05 * theirs.abs().max()
    assert (rows.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_wrong_number_of_kv_caches_is_refused(zoo):
    loaded = zoo.tiny_kp("llama")
    driver = PagedDriver(loaded)
    meta = AttentionMetadata.build([2], [2], [[0]], driver.block_size)
    with pytest.raises(ValueError, match="one per layer"):
        loaded.model(torch.tensor([1, 2]), torch.arange(2), driver.caches[:1], meta)


def test_config_and_attention_request(zoo):
    loaded = zoo.tiny_kp("qwen3")
    assert load_model_config(str(zoo.tiny_checkpoint("qwen3"))) == loaded.config
    request = loaded.config.attention_request(dtype="float32", block_size=8)
    assert (request.num_heads, request.num_kv_heads, request.head_dim, request.block_size) == (4, 2, 32, 8)
    assert request.causal and request.kind == "mha"


SMOL_CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def test_smollm2_batched_greedy_matches_transformers(zoo):
    loaded, hf = zoo.smollm2_kp(), zoo.smollm2_hf()
    prompts = [loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template([{"role": "user", "content": c}]))
               for c in SMOL_CHATS]
    prompts[2] = prompts[2][:-5]  # different lengths
    tokens, _ = PagedDriver(loaded, block_size=16).generate(prompts, 16, prefill_chunk=24, join_steps=[0, 1, 2])
    for prompt, ours in zip(prompts, tokens):
        assert ours == zoo.hf_greedy(hf, prompt, 16)
