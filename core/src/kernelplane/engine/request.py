"""One request's state inside the engine."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .detokenizer import IncrementalDetokenizer
from .params import RequestOutput, SamplingParams


@dataclass(eq=False)  # identity, not field-by-field comparison: `req in running` stays cheap
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: Optional[torch.Generator]
    speculative: bool
    arrival_time: float = field(default_factory=time.time)
    # All tokens so far (prompt + output); the KV cache holds the first `num_computed`.
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    seq_slot: Optional[int] = None  # while running: the engine's per-sequence slot (AttentionMetadata.seq_slots)
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    finish_reason: Optional[str] = None
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_spec_steps: int = 0
    logprobs: Optional[list[dict]] = None

    def __post_init__(self):
        self.token_ids = list(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self, new_ids: list[int], new_logprobs: Optional[list[dict]], error: Optional[str] = None) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_ids, token_ids=self.output_ids,
            new_token_ids=new_ids, text=self.detokenizer.text, delta_text=self.detokenizer.delta(self.finished),
            logprobs=new_logprobs, finished=self.finished, finish_reason=self.finish_reason,
            metrics={"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                     "finished_time": self.finished_time, "num_prompt_tokens": len(self.prompt_ids),
                     "num_output_tokens": self.num_output, "num_draft_tokens": self.num_draft_tokens,
                     "num_accepted_tokens": self.num_accepted_tokens, "num_spec_steps": self.num_spec_steps},
            error=error)
