"""The FastAPI application: OpenAI-compatible endpoints plus /health,
/metrics and /v1/kernels (the kernel selection and its reasons)."""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import AsyncLLMEngine, PromptTooLongError, QueueFullError, RequestOutput
from ..hardware import probe_hardware
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("kernelplane")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msgs = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors[:5])
    return msgs, param


def create_app(engine: AsyncLLMEngine, served_model_name: str = "default", api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="kernelplane", version="0.1.0")
    metrics = ServerMetrics()
    app.state.engine, app.state.metrics = engine, metrics
    model_names = {served_model_name, "default"}
    max_model_len = engine.engine.max_model_len

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        metrics.failed(f"error_{exc.status}")
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        metrics.failed("error_400")
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unhandled error")
        metrics.failed("error_500")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(error_body("invalid or missing API key (expected 'Authorization: Bearer <key>')",
                                               "invalid_request_error", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "kernelplane", "max_model_len": max_model_len}]}

    @app.get("/v1/kernels")
    async def kernels():
        return {"hardware": probe_hardware().model_dump(),
                "selections": {cap: sel.as_dict() for cap, sel in engine.engine.selections.items()}}

    def check_model(name: str) -> None:
        if name not in model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                           param="model", code="model_not_found")

    def tokenize(prompt) -> list[int]:
        try:
            return engine.engine.tokenize_prompt(prompt)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="prompt" if not isinstance(prompt, list) else "messages",
                           code="context_length_exceeded") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from exc

    def max_tokens_for(requested: Optional[int], prompt_len: int, default: Optional[int]) -> int:
        room = max_model_len - prompt_len
        if requested is not None and requested > room:
            raise APIError(400, f"max_tokens={requested} plus the prompt's {prompt_len} tokens exceeds max_model_len "
                                f"{max_model_len} (at most {room} tokens can be generated)", param="max_tokens",
                           code="context_length_exceeded")
        return requested if requested is not None else min(room, default or room)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt_ids = tokenize(body.prompt)
        params = body.sampling_params(max_tokens_for(body.max_tokens, len(prompt_ids), 16), body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        tok = engine.engine.tokenizer
        echo = tok.decode(prompt_ids) if (body.echo and isinstance(body.prompt, str)) else ""

        def choice(text, out: Optional[RequestOutput], finish):
            c = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            if body.logprobs is not None and out and out.logprobs:
                c["logprobs"] = _completion_logprobs(tok, out.logprobs)
            return c

        def chunk(text, out, finish):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model,
                    "choices": [choice(text, out, finish)]}

        stream = _run(engine, metrics, prompt_ids, params, rid)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(await _primed(stream), lambda out: chunk(out.delta_text, out, out.finish_reason),
                        lambda out: {"id": rid, "object": "text_completion", "created": int(time.time()),
                                     "model": body.model, "choices": [], "usage": _usage(out)} if include_usage else None,
                        first=chunk(echo, None, None) if echo else None)
        final, logprobs = await _collect(stream)
        final.logprobs = logprobs
        resp = chunk(echo + final.text, final, final.finish_reason)
        resp["usage"] = _usage(final)
        return resp

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        try:
            prompt = engine.engine.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        except Exception as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        prompt_ids = tokenize(prompt)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if requested is not None and requested < 1:
            raise APIError(400, "max_completion_tokens must be at least 1", param="max_completion_tokens")
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens_for(requested, len(prompt_ids), None), top)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        tok = engine.engine.tokenizer

        def chunk(delta: dict, out: Optional[RequestOutput], finish):
            c = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            if body.logprobs and out and out.logprobs:
                c["logprobs"] = {"content": _chat_logprobs(tok, out.logprobs)}
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model,
                    "choices": [c]}

        stream = _run(engine, metrics, prompt_ids, params, rid)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(await _primed(stream), lambda out: chunk({"content": out.delta_text} if out.delta_text else {}, out, out.finish_reason),
                        lambda out: {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                                     "model": body.model, "choices": [], "usage": _usage(out)} if include_usage else None,
                        first=chunk({"role": "assistant", "content": ""}, None, None))
        final, logprobs = await _collect(stream)
        message = {"role": "assistant", "content": final.text}
        c = {"index": 0, "message": message, "finish_reason": final.finish_reason, "logprobs": None}
        if body.logprobs:
            c["logprobs"] = {"content": _chat_logprobs(tok, logprobs)}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": body.model,
                "choices": [c], "usage": _usage(final)}

    return app


async def _run(engine: AsyncLLMEngine, metrics: ServerMetrics, prompt_ids, params, rid) -> AsyncIterator[RequestOutput]:
    """Engine outputs for one request, with metrics and errors mapped to API errors."""
    start = time.time()
    last = None
    gen = engine.generate(prompt_ids, params, rid)
    try:
        async for out in gen:
            now = time.time()
            if out.new_token_ids:
                if last is None:
                    metrics.observe_ttft(now - start)
                else:
                    for _ in out.new_token_ids:
                        metrics.observe_itl((now - last) / len(out.new_token_ids))
                last = now
            if out.finished:
                m = out.metrics
                metrics.finished(out.finish_reason, m["num_prompt_tokens"], m["num_output_tokens"],
                                 m["num_draft_tokens"], m["num_accepted_tokens"])
            yield out
    except QueueFullError as exc:
        raise APIError(429, str(exc), type_="rate_limit_error", code="queue_full") from exc
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    except RuntimeError as exc:
        raise APIError(500, str(exc), type_="server_error") from exc
    finally:
        await gen.aclose()  # on client disconnect this aborts the request and frees its blocks


async def _primed(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Wait for the first output before the response starts, so that errors
    (a full queue, say) still become a proper HTTP status."""
    try:
        first = await stream.__anext__()
    except BaseException:
        await stream.aclose()
        raise

    async def chained():
        try:
            yield first
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    return chained()


async def _collect(stream) -> tuple[RequestOutput, list]:
    final, logprobs = None, []
    async for out in stream:
        final = out
        logprobs += out.logprobs or []
    return final, logprobs


def _sse(stream, make_chunk, make_usage, first=None) -> StreamingResponse:
    async def events():
        yield_first = first
        try:
            async for out in stream:
                if yield_first is not None:
                    yield f"data: {json.dumps(yield_first)}\n\n"
                    yield_first = None
                if out.delta_text or out.finished or out.logprobs:
                    yield f"data: {json.dumps(make_chunk(out))}\n\n"
                if out.finished:
                    usage = make_usage(out)
                    if usage is not None:
                        yield f"data: {json.dumps(usage)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.param, exc.code))}\n\n"
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(out: RequestOutput) -> dict:
    m = out.metrics
    usage = {"prompt_tokens": m["num_prompt_tokens"], "completion_tokens": m["num_output_tokens"],
             "total_tokens": m["num_prompt_tokens"] + m["num_output_tokens"]}
    if m.get("num_spec_steps"):
        steps = m["num_spec_steps"]
        usage["speculative"] = {"draft_tokens": m["num_draft_tokens"], "accepted_tokens": m["num_accepted_tokens"],
                                "verification_steps": steps,
                                "mean_acceptance_length": round((m["num_accepted_tokens"] + steps) / steps, 3)}
    return usage


def _token_str(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(tok, entries: list[dict]) -> dict:
    tokens = [_token_str(tok, e["token_id"]) for e in entries]
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{_token_str(tok, i): lp for i, lp in e["top"]} for e in entries],
            "text_offset": [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]}


def _chat_logprobs(tok, entries: list[dict]) -> list[dict]:
    out = []
    for e in entries:
        s = _token_str(tok, e["token_id"])
        out.append({"token": s, "logprob": e["logprob"], "bytes": list(s.encode()),
                    "top_logprobs": [{"token": _token_str(tok, i), "logprob": lp, "bytes": list(_token_str(tok, i).encode())}
                                     for i, lp in e["top"]]})
    return out
