"""Request bodies of the OpenAI-compatible API, validated by pydantic.

Unknown fields are accepted and ignored (OpenAI clients send many); known
fields are checked for type and range, so bad input becomes a 400 naming
the field before anything reaches the engine.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # as OpenAI

# A single prompt: text or token ids; a batch: a list of either.
Prompt = Union[str, list[int]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1, description="None: the endpoint's default")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="extension: keep the k most likely tokens; 0 disables")
    seed: Optional[int] = Field(default=None, ge=-(2**63), lt=2**64)
    stop: Optional[Union[str, list[str]]] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = Field(default=False, description="extension: keep generating past end-of-sequence")
    speculative: bool = Field(default=True, description="extension: false opts this request out of speculative decoding")
    user: Optional[str] = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"n={v} is not supported: only n=1 (one choice per prompt)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v) -> list[str]:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, stop=list(self.stop or []), ignore_eos=self.ignore_eos,
                              logprobs=logprobs, speculative=self.speculative)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        def ids(x) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str):
            if not v:
                raise ValueError("prompt must not be an empty string")
            return v
        if not isinstance(v, list) or not (ids(v) or all(isinstance(p, str) for p in v) or all(ids(p) for p in v)):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids, "
                             "or a list of token-id lists")
        if not v or any(len(p) == 0 for p in v if not isinstance(p, int)):
            raise ValueError("prompt must not be empty, nor any prompt of a batch")
        return v

    def prompts(self) -> list[Prompt]:
        """The batch: a list of strings or of token-id lists is several prompts, anything else one."""
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        """The message as plain text; content parts other than text are refused."""
        if not isinstance(self.content, list):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, description="takes precedence over max_tokens")
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        """None: no logprobs; 0: the chosen token's; n: also the n most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None
