"""The inference engine: paged KV cache, continuous batching, sampling, speculative decoding."""
from .async_engine import AsyncLLMEngine
from .engine import EngineConfig, LLMEngine
from .params import PromptTooLongError, QueueFullError, RequestOutput, SamplingParams

__all__ = ["AsyncLLMEngine", "EngineConfig", "LLMEngine", "PromptTooLongError", "QueueFullError", "RequestOutput", "SamplingParams"]
