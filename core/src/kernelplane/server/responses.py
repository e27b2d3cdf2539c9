"""OpenAI response shapes built from engine outputs: usage (with the
speculative-decoding figures), logprobs, completion and chat chunks."""
from __future__ import annotations

import time
from typing import Optional, Sequence

from ..engine import RequestOutput


def usage(finals: Sequence[RequestOutput]) -> dict:
    """Token counts over the finished requests of one API call.

    Speculative figures appear when drafts were verified: as OpenAI's
    ``completion_tokens_details`` (accepted / rejected prediction tokens,
    which the official clients parse) and in full under ``speculative``.
    """
    def total(key: str) -> int:
        return sum(int(out.metrics.get(key) or 0) for out in finals)

    prompt, completion = total("num_prompt_tokens"), total("num_output_tokens")
    result = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    steps, drafts, accepted = total("num_spec_steps"), total("num_draft_tokens"), total("num_accepted_tokens")
    if steps:
        result["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                               "rejected_prediction_tokens": drafts - accepted}
        result["speculative"] = {
            "draft_tokens": drafts, "accepted_tokens": accepted, "verification_steps": steps,
            "acceptance_rate": round(accepted / drafts, 4) if drafts else 0.0,
            # Tokens each verification step produced: the accepted drafts plus the target model's own token.
            "mean_acceptance_length": round((accepted + steps) / steps, 4),
        }
    return result


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" in text:  # a piece of a multi-byte character: the vocabulary's own spelling tells tokens apart
        text = tokenizer.token_text(token_id) or text
    return text


def completion_logprobs(tokenizer, entries: list[dict], text_offset: int) -> dict:
    """The legacy completions format: parallel lists, offsets into the choice's text."""
    tokens = [_token_text(tokenizer, e["token_id"]) for e in entries]
    offsets, position = [], text_offset
    for t in tokens:
        offsets.append(position)
        position += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{_token_text(tokenizer, i): lp for i, lp in e["top"]} for e in entries],
            "text_offset": offsets}


def chat_logprobs(tokenizer, entries: list[dict]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e["token_id"], e["logprob"]), "top_logprobs": [item(i, lp) for i, lp in e["top"]]}
                        for e in entries]}


class CompletionFormat:
    """Responses of ``/v1/completions`` for one call."""

    def __init__(self, request_id: str, model: str, tokenizer, want_logprobs: bool):
        self.id, self.model, self.tokenizer, self.want_logprobs = request_id, model, tokenizer, want_logprobs
        self.created = int(time.time())

    def _envelope(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}

    def choice(self, index: int, text: str, finish_reason: Optional[str], logprobs: Optional[list[dict]],
               text_offset: int = 0) -> dict:
        lp = completion_logprobs(self.tokenizer, logprobs, text_offset) if self.want_logprobs and logprobs else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    def chunk(self, index: int, text: str, finish_reason: Optional[str] = None,
              logprobs: Optional[list[dict]] = None) -> dict:
        return self._envelope([self.choice(index, text, finish_reason, logprobs)])

    def usage_chunk(self, finals: Sequence[RequestOutput]) -> dict:
        return {**self._envelope([]), "usage": usage(finals)}

    def response(self, choices: list[dict], finals: Sequence[RequestOutput]) -> dict:
        return {**self._envelope(choices), "usage": usage(finals)}


class ChatFormat:
    """Responses of ``/v1/chat/completions`` for one call."""

    def __init__(self, request_id: str, model: str, tokenizer, want_logprobs: bool):
        self.id, self.model, self.tokenizer, self.want_logprobs = request_id, model, tokenizer, want_logprobs
        self.created = int(time.time())

    def _chunk_envelope(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}

    def chunk(self, delta: dict, finish_reason: Optional[str] = None, logprobs: Optional[list[dict]] = None) -> dict:
        lp = chat_logprobs(self.tokenizer, logprobs) if self.want_logprobs and logprobs else None
        return self._chunk_envelope([{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}])

    def usage_chunk(self, finals: Sequence[RequestOutput]) -> dict:
        return {**self._chunk_envelope([]), "usage": usage(finals)}

    def response(self, final: RequestOutput, logprobs: list[dict]) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": final.text},
                  "logprobs": chat_logprobs(self.tokenizer, logprobs) if self.want_logprobs else None,
                  "finish_reason": final.finish_reason}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage([final])}
