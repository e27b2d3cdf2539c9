"""Running API requests on the async engine: one output stream per prompt,
with metrics, engine errors mapped to API errors, and cancellation (client
gone) turned into an engine abort that frees the request's KV blocks."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Sequence

from starlette.requests import Request

from ..engine import AsyncLLMEngine, PromptTooLongError, QueueFullError, RequestOutput, SamplingParams
from .errors import APIError
from .metrics import ServerMetrics

log = logging.getLogger("kernelplane")

DISCONNECT_POLL_SECONDS = 0.25


class ClientDisconnected(Exception):
    """The client closed the connection before a non-streamed response was ready."""


async def engine_outputs(engine: AsyncLLMEngine, metrics: ServerMetrics, prompt_ids: list[int],
                         params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
    """One request's outputs. Closing this iterator early aborts the request in the engine."""
    arrival = time.monotonic()
    last_token_time = None
    last = None
    outcome = None  # None: refused before it ran; else its finish reason
    outputs = engine.generate(prompt_ids, params, request_id)
    try:
        async for out in outputs:
            now = time.monotonic()
            if out.new_token_ids:
                if last_token_time is None:
                    metrics.first_token(now - arrival)
                else:
                    metrics.next_tokens(now - last_token_time, len(out.new_token_ids))
                last_token_time = now
            last, outcome = out, out.finish_reason or "abort"
            yield out
    except QueueFullError as exc:
        raise APIError(429, str(exc), code="queue_full") from exc
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    except Exception as exc:  # the engine failed on this request: report it, keep serving the others
        outcome = "error"
        log.error("request %s failed: %s", request_id, exc)
        raise APIError(500, f"the engine failed on this request: {exc}", code="engine_error") from exc
    except BaseException:  # cancelled: the client went away
        outcome = outcome or "abort"
        raise
    finally:
        await outputs.aclose()  # a no-op when finished; otherwise this aborts the request
        if outcome is not None:
            m = last.metrics if last is not None else {}
            metrics.request_finished(outcome, len(prompt_ids), int(m.get("num_output_tokens") or 0),
                                     int(m.get("num_draft_tokens") or 0), int(m.get("num_accepted_tokens") or 0),
                                     time.monotonic() - arrival)


async def _prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        yield first
        if not first.finished:
            async for out in rest:
                yield out
    finally:
        await rest.aclose()


async def start_streams(streams: Sequence[AsyncIterator[RequestOutput]]) -> list[AsyncIterator[RequestOutput]]:
    """Wait, concurrently, for each stream's first output: a request the engine
    refuses (full queue, say) then fails the call with its own HTTP status
    before any response has started, and takes the others down with it."""
    firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
    failures = [f for f in firsts if isinstance(f, BaseException)]
    if failures:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        api_errors = [f for f in failures if isinstance(f, APIError)]
        if api_errors:
            raise api_errors[0]
        if isinstance(failures[0], StopAsyncIteration):
            raise APIError(500, "the engine ended a request without output", code="engine_error")
        raise failures[0]
    return [_prepend(first, s) for first, s in zip(firsts, streams)]


async def merge_streams(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index.
    The first failure ends the merge and cancels (aborts) the rest."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            await stream.aclose()
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(stream: AsyncIterator[RequestOutput]) -> tuple[RequestOutput, list[dict]]:
    """The final output of a stream and the logprobs of all its tokens."""
    final, logprobs = None, []
    async for out in stream:
        final = out
        logprobs += out.logprobs or []
    return final, logprobs


async def collect_all(streams: Sequence[AsyncIterator[RequestOutput]], request: Request
                      ) -> list[tuple[RequestOutput, list[dict]]]:
    """Run streams to completion for a non-streamed response; if the client
    disconnects meanwhile, abort them all and raise ClientDisconnected."""
    tasks = [asyncio.create_task(collect(s)) for s in streams]
    try:
        while True:
            finished, _ = await asyncio.wait(tasks, timeout=DISCONNECT_POLL_SECONDS,
                                             return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in finished if t.exception() is not None]
            if failed:
                raise failed[0].exception()
            if len(finished) == len(tasks):
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        for task in tasks:
            task.cancel()  # a no-op for finished ones; aborts the others in the engine
        await asyncio.gather(*tasks, return_exceptions=True)
