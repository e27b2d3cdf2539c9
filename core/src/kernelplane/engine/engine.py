"""The engine: paged KV cache, continuous batching, sampling, speculative decoding.

Every step schedules running requests first (each contributes its next
token, plus draft tokens when speculating, or the next chunk of a long
prompt), then admits waiting requests while sequence slots, the token budget
and KV blocks allow. All of them run in one forward over one varlen batch.
When blocks run out, the most recently admitted request is preempted: its
blocks are freed and it is recomputed later, its tokens kept.
"""
from __future__ import annotations

import collections
import logging
import math
import random
import time
import uuid
from typing import Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..capabilities import PLAIN_KV_FORMATS, Capability, KVQuantRequest, SpecRequest
from ..hardware import hardware_for_device
from ..exact_tail import ExactTail
from ..kv_cache import AttentionMetadata, KVPages, allocate_plain_pages, torch_dtype
from ..models.pointwise import compiled_ops
from ..selection import Selection, select
from ..spec.verify import greedy_accept, rejection_sample_batch
from .block_allocator import BlockAllocator
from .cuda_graphs import StepGraphs
from .detokenizer import IncrementalDetokenizer
from .params import PromptTooLongError, QueueFullError, RequestOutput, SamplingParams
from .request import Request
from .sampler import sample_batch, target_probs_batch, token_logprobs

log = logging.getLogger("kernelplane")
# Written once into the cache at start-up when the KV cache is quantized (see prime_kv_cache).
KV_PRIMING_TEXT = ("The museum opened its new wing on a rainy Tuesday. Visitors asked about the paintings, the "
                   "price of tickets and where to find lunch; a guide explained that the oldest piece was carved "
                   "around 1200 and had travelled through three countries before arriving here.")


@torch.inference_mode()
def prime_kv_cache(model, tokenizer, kv_caches: list[KVPages], num_blocks: int, block_size: int, device) -> None:
    """One prefill of ``KV_PRIMING_TEXT`` into the cache's first blocks (no
    request owns them yet): a quantizer that learns from its first write
    (TurboQuant's key offset) then learns from real text, the same on every
    start, whatever the first request is."""
    ids = tokenizer.encode(KV_PRIMING_TEXT)[: num_blocks * block_size]
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(math.ceil(len(ids) / block_size)))],
                                   block_size, device)
    model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device), kv_caches, meta)


CPU_KV_CACHE_BYTES = 2 * 2**30  # cap on an automatically sized CPU cache
GPU_MEMORY_FRACTION = 0.85  # of the memory free after loading the model


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_num_seqs: int = Field(default=8, ge=1)
    max_model_len: Optional[int] = Field(default=None, ge=2)
    block_size: int = Field(default=16, ge=1)
    num_kv_blocks: Optional[int] = Field(default=None, ge=1)
    max_waiting: int = Field(default=256, ge=0)
    attention_backend: Optional[str] = None
    kv_cache_dtype: str = "auto"
    kv_exact_tail: int = Field(default=64, ge=0, description=(
        "quantized KV caches: each running sequence's first and latest N tokens are also kept unquantized and "
        "read exact by attention backends that know the tail (0: off)"))
    speculative_method: Optional[str] = None
    num_speculative_tokens: int = Field(default=3, ge=1, le=16)
    speculative_options: dict = Field(default_factory=dict)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    strict: bool = False
    enforce_eager: bool = Field(default=False, description="plain PyTorch only: no CUDA graphs, no torch.compile fusion")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        return self.device

    def resolved_dtype(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if device == "cpu" else "bfloat16"


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded=None):
        from ..models import load_model

        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype(self.device)
        lm = loaded or load_model(config.model, device=self.device, dtype=self.dtype)
        self.model, self.model_config, self.tokenizer = lm.model, lm.config, lm.tokenizer
        mc = self.model_config
        self.max_model_len = config.max_model_len or min(mc.max_position_embeddings, 4096)
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's {mc.max_position_embeddings} positions")
        self.block_size = config.block_size
        self.eos_ids = set(self.tokenizer.eos_token_ids)

        kv_format = config.kv_cache_dtype if config.kv_cache_dtype != "auto" else self.dtype
        self.selections: dict[str, Selection] = {}
        hardware = hardware_for_device(self.device)
        quantizer = None
        if kv_format not in PLAIN_KV_FORMATS:
            qsel = select(Capability.KV_QUANTIZER, KVQuantRequest(
                format=kv_format, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, dtype=self.dtype,
                block_size=self.block_size), strict=config.strict, hardware=hardware)
            self.selections[Capability.KV_QUANTIZER.value] = qsel
            quantizer = qsel.implementation
        attn_request = mc.attention_request(dtype=self.dtype, kv_cache_format=kv_format, block_size=self.block_size)
        asel = select(Capability.ATTENTION, attn_request, override=config.attention_backend, strict=config.strict,
                      hardware=hardware)
        self.selections[Capability.ATTENTION.value] = asel
        self.attention = asel.implementation
        self.model.set_attention_backend(self.attention)

        self.proposer = None
        if config.speculative_method:
            ssel = select(Capability.SPEC_PROPOSER, SpecRequest(
                method=config.speculative_method, num_speculative_tokens=config.num_speculative_tokens,
                options=config.speculative_options), strict=config.strict, hardware=hardware)
            self.selections[Capability.SPEC_PROPOSER.value] = ssel
            self.proposer = ssel.implementation

        if self.device == "cuda" and not config.enforce_eager:
            t0 = time.perf_counter()
            ops = compiled_ops(self.device, torch_dtype(self.dtype), mc.hidden_size, mc.head_dim)
            self.model.use_pointwise_ops(ops)
            if ops.fused:
                log.info("engine: fused norms, RoPE and SwiGLU with torch.compile in %.1f s", time.perf_counter() - t0)

        # The tail only pays where the attention backend reads it.
        self.exact_tail = (config.kv_exact_tail if quantizer is not None
                           and getattr(self.attention, "reads_exact_tail", False) else 0)
        self.kv_caches = self._allocate_cache(kv_format, quantizer)
        if quantizer is not None:
            # Before any CUDA graph is captured, so graph replays find what the quantizer learned in place.
            prime_kv_cache(self.model, self.tokenizer, self.kv_caches, self.num_kv_blocks, self.block_size, self.device)
        # CUDA graphs by tokens per sequence: 1 (decode), 1 + k (verifying k drafts).
        self.step_graphs: dict[int, StepGraphs] = {}
        usable_blocks = self.num_kv_blocks
        if self.device == "cuda" and not config.enforce_eager and getattr(self.attention, "supports_cuda_graphs", False):
            usable_blocks -= 1  # the last block takes the padding rows' writes
            pool = None
            for q in sorted({1, 1 + config.num_speculative_tokens if self.proposer else 1}, reverse=True):
                g = StepGraphs(self.model, self.kv_caches, config.max_num_seqs, q, self.max_model_len,
                               self.block_size, scratch_block=usable_blocks, device=self.device, pool=pool,
                               scratch_slot=config.max_num_seqs)
                g.capture()
                pool = g.pool
                self.step_graphs[q] = g
        self.allocator = BlockAllocator(usable_blocks)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_seq_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.requests: dict[str, Request] = {}
        self.counters = collections.Counter()
        # Requests the scheduler had to stop (they cannot fit the cache): reported by the next step().
        self._stopped_by_scheduler: list[Request] = []
        log.info("engine: %s %s, attention=%s, KV cache %s: %d blocks x %d tokens (%.1f MiB)%s", self.device,
                 self.dtype, asel.chosen.name, kv_format, self.num_kv_blocks, self.block_size,
                 self.kv_cache_bytes / 2**20,
                 f", first and latest {self.exact_tail} tokens exact" if self.exact_tail else "")

    # ---- KV cache -------------------------------------------------------
    def _allocate_cache(self, kv_format: str, quantizer) -> list[KVPages]:
        mc = self.model_config
        if quantizer is None:
            per_token = mc.num_kv_heads * mc.head_dim * 2 * torch.empty(0, dtype=torch_dtype(kv_format)).element_size()
        else:
            per_token = quantizer.bytes_per_token(mc.num_kv_heads, mc.head_dim, mc.head_dim)
        block_bytes = per_token * self.block_size * mc.num_layers
        tail_bytes = mc.num_layers * ExactTail.bytes_for(self.exact_tail, self.config.max_num_seqs, mc.num_kv_heads,
                                                         mc.head_dim, mc.head_dim, torch_dtype(self.dtype)) \
            if self.exact_tail else 0
        if self.config.num_kv_blocks:
            n = self.config.num_kv_blocks
        else:
            wanted = self.config.max_num_seqs * math.ceil(self.max_model_len / self.block_size)
            if self.device == "cuda":
                free, _ = torch.cuda.mem_get_info()
                n = int((free * GPU_MEMORY_FRACTION - tail_bytes) // block_bytes)
            else:
                n = min(wanted, int((CPU_KV_CACHE_BYTES - tail_bytes) // block_bytes))
        if n * self.block_size < 2:
            raise ValueError("not enough memory for a KV cache")
        self.num_kv_blocks = n
        self.kv_cache_bytes = n * block_bytes
        if quantizer is None:
            return [allocate_plain_pages(n, self.block_size, mc.num_kv_heads, mc.head_dim, mc.head_dim,
                                         torch_dtype(kv_format), self.device) for _ in range(mc.num_layers)]
        caches = [quantizer.allocate(n, self.block_size, mc.num_kv_heads, mc.head_dim, mc.head_dim, self.device)
                  for _ in range(mc.num_layers)]
        if self.exact_tail:
            for pages in caches:
                pages.exact_tail = ExactTail.allocate(self.exact_tail, self.config.max_num_seqs, mc.num_kv_heads,
                                                      mc.head_dim, mc.head_dim, torch_dtype(self.dtype), self.device)
        return caches

    def _ensure_blocks(self, req: Request, num_tokens: int) -> bool:
        need = math.ceil(num_tokens / self.block_size) - len(req.blocks)
        if need <= 0:
            return True
        if self.allocator.num_free < need:
            return False
        req.blocks += self.allocator.allocate(need)
        return True

    def _trim_blocks(self, req: Request) -> None:
        # Blocks past what the request's tokens need (rejected drafts) go back.
        keep = math.ceil(len(req.token_ids) / self.block_size)
        if len(req.blocks) > keep:
            self.allocator.free(req.blocks[keep:])
            del req.blocks[keep:]

    # ---- requests -------------------------------------------------------
    def tokenize_prompt(self, prompt: str | Sequence[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context.

        A rendered chat template already holds its special tokens: encode it
        with ``add_special_tokens=False`` so no second BOS is added.
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}): got {bad[:5]}")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + 1 > self.max_model_len:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                                     f"no room to generate (shorten the prompt to at most {self.max_model_len - 1} tokens)")
        if math.ceil((len(ids) + 1) / self.block_size) > self.num_kv_blocks:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens, more than the whole KV cache holds "
                                     f"({self.num_kv_blocks * self.block_size} tokens)")
        return ids

    def add_request(self, request_id: Optional[str], prompt: str | Sequence[int], params: SamplingParams,
                    prompt_ids: Optional[list[int]] = None) -> str:
        params.validate()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests); try again later")
        ids = prompt_ids if prompt_ids is not None else self.tokenize_prompt(prompt)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        req = Request(request_id=request_id, prompt_ids=ids, params=params,
                      detokenizer=IncrementalDetokenizer(self.tokenizer, list(params.stop)),
                      generator=None if params.greedy else torch.Generator().manual_seed(seed),
                      speculative=self.proposer is not None and params.speculative)
        if req.speculative:
            self.proposer.add_request(request_id, ids)
        self.requests[request_id] = req
        self.waiting.append(req)
        self.counters["requests_added"] += 1
        return request_id

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, "abort")
        return req.output([], None)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.detokenizer.flush()
        req.finished_time = time.time()
        if req in self.running:
            self.running.remove(req)
            self._release_slot(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.allocator.free(req.blocks)
        req.blocks = []
        if req.speculative:
            self.proposer.remove_request(req.request_id)
        self.requests.pop(req.request_id, None)
        self.counters[f"finished_{reason}"] += 1

    def _release_slot(self, req: Request) -> None:
        self.free_seq_slots.append(req.seq_slot)
        req.seq_slot = None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release_slot(req)
        self.allocator.free(req.blocks)
        req.blocks, req.num_computed = [], 0
        self.waiting.appendleft(req)
        self.counters["preemptions"] += 1
        log.warning("KV cache full: request %s preempted (will be recomputed)", req.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------
    def _propose(self) -> dict[str, list[int]]:
        if self.proposer is None:
            return {}
        ready = [r for r in self.running if r.speculative and len(r.token_ids) - r.num_computed == 1]
        if not ready:
            return {}
        k = self.config.num_speculative_tokens
        # Never draft past max_tokens or the context: the bonus token needs room too.
        limits = [max(0, min(k, r.params.max_tokens - r.num_output - 1, self.max_model_len - len(r.token_ids) - 1))
                  for r in ready]
        drafts = self.proposer.propose([r.request_id for r in ready], limits)
        vocab = self.model_config.vocab_size
        out = {}
        for r, d, lim in zip(ready, drafts, limits):
            d = list(d)[:lim]
            # A draft stops at its first id outside the vocabulary (e.g. -1 padding): it must never reach the embedding.
            bad = next((i for i, t in enumerate(d) if not 0 <= t < vocab), None)
            d = d if bad is None else d[:bad]
            if d:
                out[r.request_id] = d
        return out

    def _schedule(self) -> list[tuple[Request, int, list[int]]]:
        budget = self.config.max_num_batched_tokens
        drafts = self._propose()
        items: list[tuple[Request, int, list[int]]] = []
        for req in list(self.running):
            if req not in self.running:  # preempted while making room for an earlier one
                continue
            remaining = len(req.token_ids) - req.num_computed
            d = drafts.get(req.request_id, [])
            n = min(remaining, budget)
            if n <= 0:
                continue
            if budget < n + len(d):
                d = []
            while not self._ensure_blocks(req, req.num_computed + n + len(d)):
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:
                    log.warning("request %s needs more KV blocks than the cache has: stopping it", req.request_id)
                    self._finish(req, "length")
                    self._stopped_by_scheduler.append(req)
                    break
                self._preempt(victim)
                if victim is req:
                    break
            else:
                items.append((req, n, d))
                budget -= n + len(d)
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            req = self.waiting[0]
            n = min(len(req.token_ids) - req.num_computed, budget)
            if not self._ensure_blocks(req, req.num_computed + n):
                break
            self.waiting.popleft()
            self.running.append(req)
            req.seq_slot = self.free_seq_slots.pop()  # running never exceeds max_num_seqs
            items.append((req, n, []))
            budget -= n
        return items

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        items = self._schedule()
        stopped, self._stopped_by_scheduler = self._stopped_by_scheduler, []
        outputs = [req.output([], None) for req in stopped]  # their final output, so no stream waits forever
        if not items:
            return outputs
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens, tables = [], [], []
        logit_rows: list[int] = []
        # Requests that reached the end of their input, with their drafts and first logits row.
        caught_up: list[tuple[Request, list[int], int]] = []
        for req, n, d in items:
            nc = req.num_computed
            toks = req.token_ids[nc:nc + n] + d
            start = len(input_ids)
            input_ids += toks
            positions += range(nc, nc + len(toks))
            query_lens.append(len(toks))
            seq_lens.append(nc + len(toks))
            tables.append(req.blocks)
            if nc + n == len(req.token_ids):  # caught up: sample after the last real token and each draft
                caught_up.append((req, d, len(logit_rows)))
                logit_rows += range(start + n - 1, start + len(toks))
        dev = self.device
        graphs = self._graphs_for(items, len(logit_rows), len(input_ids))
        self.counters["steps_graphed" if graphs is not None else "steps_eager"] += 1
        if graphs is not None:
            hidden = graphs.run([r.token_ids[r.num_computed:r.num_computed + 1] + d for r, n, d in items],
                                [r.num_computed for r, n, d in items], tables, [r.seq_slot for r, n, d in items])
        else:
            meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, dev,
                                           seq_slots=[r.seq_slot for r, n, d in items])
            hidden = self.model(torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev), self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=dev)]) if logit_rows else None
        self.counters["prompt_tokens"] += sum(n for (r, n, d) in items if len(r.token_ids) - r.num_computed > 1)

        accepted_by_row = self._pick_tokens(caught_up, logits)
        first_row = {id(req): row for req, _, row in caught_up}
        now = time.time()
        for req, n, d in items:
            row = first_row.get(id(req))
            if row is None:
                req.num_computed += n  # a prompt chunk: nothing to sample yet
                continue
            accepted = accepted_by_row[row]
            req.num_computed += n + len(accepted) - 1  # accepted drafts' KV entries are valid
            if d:
                req.num_spec_steps += 1
                req.num_draft_tokens += len(d)
                req.num_accepted_tokens += len(accepted) - 1
                self.counters["draft_tokens"] += len(d)
                self.counters["accepted_tokens"] += len(accepted) - 1
            new_ids = self._append(req, accepted)
            new_lp = None
            if req.params.logprobs is not None:
                new_lp = token_logprobs(logits[row: row + len(new_ids)], new_ids, req.params.logprobs)
            if req.first_token_time is None:
                req.first_token_time = now
            self.counters["generation_tokens"] += len(new_ids)
            if req.speculative and not req.finished:
                self.proposer.extend(req.request_id, new_ids)
            if not req.finished:
                self._trim_blocks(req)
            outputs.append(req.output(new_ids, new_lp))
        return outputs

    def _pick_tokens(self, caught_up: list[tuple[Request, list[int], int]], logits) -> dict[int, list[int]]:
        """The accepted tokens of every request that reached the end of its
        input, keyed by its first logits row. Batched so that a step costs one
        device-to-host transfer per kind, not one per request: the argmax of
        every row (greedy requests), one sample per sampled request without
        drafts, one rejection-sampling call for the sampled ones with drafts."""
        out: dict[int, list[int]] = {}
        greedy = [(r, d, row) for r, d, row in caught_up if r.params.greedy]
        plain = [(r, d, row) for r, d, row in caught_up if not r.params.greedy and not d]
        drafted = [(r, d, row) for r, d, row in caught_up if not r.params.greedy and d]
        dev = logits.device if logits is not None else None
        if greedy:
            argmax = logits.argmax(-1).tolist()
            out.update((row, greedy_accept(d, argmax[row: row + len(d) + 1])) for _, d, row in greedy)
        if plain:
            picks = sample_batch(logits[torch.tensor([row for _, _, row in plain], device=dev)],
                                 [r.params for r, _, _ in plain], [r.generator for r, _, _ in plain])
            out.update((row, [t]) for (_, _, row), t in zip(plain, picks))
        if drafted:
            rows = [row + j for _, d, row in drafted for j in range(len(d) + 1)]
            params = [r.params for r, d, _ in drafted for _ in range(len(d) + 1)]
            probs = target_probs_batch(logits[torch.tensor(rows, device=dev)], params)
            accepted = rejection_sample_batch([d for _, d, _ in drafted], probs, [r.generator for r, _, _ in drafted])
            out.update((row, a) for (_, _, row), a in zip(drafted, accepted))
        return out

    def _graphs_for(self, items, num_logit_rows: int, num_tokens: int):
        """The captured graphs that can run this step, if any: every sequence
        must be decoding (one real input token, plus its drafts)."""
        if not self.step_graphs or num_logit_rows != num_tokens:
            return None
        if any(n != 1 for _, n, _ in items):
            return None
        longest = max(1 + len(d) for _, _, d in items)
        q = min((q for q in self.step_graphs if q >= longest), default=None)
        if q is None or self.step_graphs[q].padded_size(len(items)) is None:
            return None
        return self.step_graphs[q]

    def _append(self, req: Request, tokens: list[int]) -> list[int]:
        """Append sampled tokens, stopping at the first stop condition."""
        p = req.params
        added = []
        for t in tokens:
            req.token_ids.append(t)
            added.append(t)
            req.detokenizer.add([t])
            if (t in self.eos_ids and not p.ignore_eos) or t in p.stop_token_ids or req.detokenizer.stopped:
                self._finish(req, "stop")
            elif req.num_output >= p.max_tokens or len(req.token_ids) >= self.max_model_len:
                self._finish(req, "length")
            if req.finished:
                break
        return added

    # ---- conveniences ---------------------------------------------------
    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion (offline use); outputs in prompt order.

        Each final output carries the logprobs of all its tokens (a step's
        output carries only those of its new tokens).
        """
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        # Check every prompt before running any, then feed them as the bounded waiting queue drains.
        pending = collections.deque((self.tokenize_prompt(p), sp.validate()) for p, sp in zip(prompts, plist))
        ids: list[str] = []
        final: dict[str, RequestOutput] = {}
        logprobs: dict[str, list[dict]] = collections.defaultdict(list)
        while pending or self.has_unfinished_requests():
            while pending and (len(self.waiting) < self.config.max_waiting or not ids):
                prompt_ids, sp = pending.popleft()
                ids.append(self.add_request(None, None, sp, prompt_ids=prompt_ids))
            for out in self.step():
                logprobs[out.request_id] += out.logprobs or []
                if out.finished:
                    final[out.request_id] = out
        for rid, sp in zip(ids, plist):
            if sp.logprobs is not None:
                final[rid].logprobs = logprobs[rid]
        return [final[i] for i in ids]

    def kv_cache_summary(self) -> dict:
        """What /v1/kernels reports about the cache: format, size, exact tail."""
        return {"format": self.kv_caches[0].format, "num_blocks": self.num_kv_blocks, "block_size": self.block_size,
                "tokens": self.num_kv_blocks * self.block_size, "bytes": self.kv_cache_bytes,
                "exact_tail_tokens": self.exact_tail}

    def stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                "kv_blocks_total": self.allocator.num_blocks, "kv_blocks_used": self.allocator.num_used,
                **dict(self.counters)}
