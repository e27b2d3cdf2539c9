"""The FastAPI application: OpenAI-compatible completions and chat
completions (streamed as server-sent events or not), plus /health, /metrics
(Prometheus) and /v1/kernels (which kernel was chosen per capability, and why)."""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from ..engine import AsyncLLMEngine, PromptTooLongError
from ..hardware import probe_hardware
from .errors import APIError, install_error_handlers
from .generation import ClientDisconnected, collect_all, engine_outputs, merge_streams, start_streams
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import ChatFormat, CompletionFormat

log = logging.getLogger("kernelplane")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left
CLIENT_CLOSED_REQUEST = 499  # nobody reads it: the status logged for a request whose client left


def create_app(engine: AsyncLLMEngine, served_model_name: str = "default", api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="kernelplane", summary="OpenAI-compatible server over pluggable kernels")
    metrics = ServerMetrics()
    app.state.engine, app.state.metrics = engine, metrics
    llm = engine.engine
    tokenizer = llm.tokenizer
    max_model_len = llm.max_model_len
    install_error_handlers(app, metrics.request_rejected)

    async def require_api_key(request: Request) -> None:
        # Only /v1 needs the key: health probes and metric scrapers carry none.
        given = request.headers.get("authorization", "").encode()
        if api_key and not secrets.compare_digest(given, f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4; charset=utf-8")

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "kernelplane", "max_model_len": max_model_len}]}

    @v1.get("/kernels")
    async def kernels():
        return {"hardware": probe_hardware().model_dump(),
                "selections": {cap: sel.as_dict() for cap, sel in llm.selections.items()},
                "kv_cache": llm.kv_cache_summary()}

    # ---- helpers shared by both endpoints ------------------------------
    def check_model(name: str) -> None:
        if name != served_model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {served_model_name!r}",
                           param="model", code="model_not_found")

    def tokenize(prompt, param: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return llm.tokenize_prompt(prompt, add_special_tokens)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param=param, code="context_length_exceeded") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param=param) from exc

    def max_tokens_for(requested: Optional[int], prompt_len: int, default: Optional[int]) -> int:
        room = max_model_len - prompt_len
        if requested is not None and requested > room:
            raise APIError(400, f"max_tokens={requested} does not fit: the prompt has {prompt_len} tokens and "
                                f"max_model_len is {max_model_len}, so at most {room} tokens can be generated",
                           param="max_tokens", code="context_length_exceeded")
        return requested if requested is not None else min(room, default or room)

    # ---- /v1/completions -----------------------------------------------
    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = body.prompts()
        prompt_ids = [tokenize(p, "prompt") for p in prompts]
        params = [body.sampling_params(max_tokens_for(body.max_tokens, len(ids), DEFAULT_COMPLETION_MAX_TOKENS),
                                       body.logprobs) for ids in prompt_ids]
        call_id = f"cmpl-{uuid.uuid4().hex}"
        fmt = CompletionFormat(call_id, body.model, tokenizer, body.logprobs is not None)
        echoes = [(p if isinstance(p, str) else tokenizer.decode(ids)) if body.echo else ""
                  for p, ids in zip(prompts, prompt_ids)]
        streams = await start_streams([engine_outputs(engine, metrics, ids, sp, f"{call_id}-{i}")
                                       for i, (ids, sp) in enumerate(zip(prompt_ids, params))])
        if body.stream:
            return _sse(_completion_events(fmt, streams, echoes, body.include_usage))
        try:
            results = await collect_all(streams, request)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [fmt.choice(i, echo + final.text, final.finish_reason, logprobs, len(echo))
                   for i, (echo, (final, logprobs)) in enumerate(zip(echoes, results))]
        return fmt.response(choices, [final for final, _ in results])

    # ---- /v1/chat/completions ------------------------------------------
    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # a template may refuse a conversation in its own words
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        prompt_ids = tokenize(prompt, "messages", add_special_tokens=False)  # the template wrote them
        params = body.sampling_params(max_tokens_for(body.requested_max_tokens, len(prompt_ids), None),
                                      body.num_logprobs)
        call_id = f"chatcmpl-{uuid.uuid4().hex}"
        fmt = ChatFormat(call_id, body.model, tokenizer, body.logprobs)
        streams = await start_streams([engine_outputs(engine, metrics, prompt_ids, params, call_id)])
        if body.stream:
            return _sse(_chat_events(fmt, streams[0], body.include_usage))
        try:
            [(final, logprobs)] = await collect_all(streams, request)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return fmt.response(final, logprobs)

    app.include_router(v1)
    return app


# ---- server-sent events ---------------------------------------------------
async def _completion_events(fmt: CompletionFormat, streams, echoes: list[str], include_usage: bool
                             ) -> AsyncIterator[dict]:
    for index, echo in enumerate(echoes):
        if echo:
            yield fmt.chunk(index, echo)
    finals = {}
    merged = merge_streams(streams)
    try:
        async for index, out in merged:
            if out.delta_text or out.finished or out.logprobs:
                yield fmt.chunk(index, out.delta_text, out.finish_reason, out.logprobs)
            if out.finished:
                finals[index] = out
    finally:  # closing early (client gone) aborts every prompt of the call
        await merged.aclose()
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
    if include_usage:
        yield fmt.usage_chunk([finals[i] for i in sorted(finals)])


async def _chat_events(fmt: ChatFormat, stream, include_usage: bool) -> AsyncIterator[dict]:
    yield fmt.chunk({"role": "assistant", "content": ""})
    final = None
    try:
        async for out in stream:
            if out.delta_text or out.finished or out.logprobs:
                yield fmt.chunk({"content": out.delta_text} if out.delta_text else {}, out.finish_reason, out.logprobs)
            if out.finished:
                final = out
    finally:  # closing early (client gone) aborts the request
        await stream.aclose()
    if include_usage and final is not None:
        yield fmt.usage_chunk([final])


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Events as ``data: {json}`` lines, ending with ``data: [DONE]``. A failure
    after the response has started is sent as an error event before [DONE]."""

    async def lines():
        try:
            async for payload in events:
                yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body(), ensure_ascii=False)}\n\n"
        except Exception as exc:
            log.exception("stream failed")
            yield f"data: {json.dumps(APIError(500, f'internal error: {exc}').body())}\n\n"
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
