"""The engine on a background thread, for the asyncio server.

Requests are validated and tokenized in the caller's thread (so errors such
as a too-long prompt or a full queue raise right there), then handed to the
engine thread through an inbox; outputs come back through per-request
asyncio queues. A consumer that stops listening aborts its request.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from typing import AsyncIterator, Optional, Sequence

from .engine import EngineConfig, LLMEngine
from .params import QueueFullError, RequestOutput, SamplingParams

log = logging.getLogger("kernelplane")


class EngineError(RuntimeError):
    """The engine failed while running a request."""


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config or EngineConfig())
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pending = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kernelplane-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def stats(self) -> dict:
        return {**self.engine.stats(), "num_pending": self._pending}

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        self.start()
        request_id = request_id or uuid.uuid4().hex
        params.validate()
        prompt_ids = self.engine.tokenize_prompt(prompt)  # raises PromptTooLongError / ValueError here
        with self._lock:
            if len(self.engine.waiting) + self._pending >= self.engine.config.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.engine.config.max_waiting} requests); try again later")
            stream: asyncio.Queue = asyncio.Queue()
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
            self._pending += 1  # adds not yet seen by the engine thread count as waiting
        self._inbox.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect): free its blocks
                self._inbox.put(("abort", request_id))
                self._wake.set()

    # ---- engine thread --------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items) -> None:
        """Hand (request_id, output or error) pairs to their streams: one
        wake-up per event loop, not per request (each wake-up is a syscall
        and an event-loop turn, which add up at 64 streams per step)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in items:
                target = self._streams.get(request_id)
                if target is not None:
                    loop, stream = target
                    by_loop.setdefault(loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, prompt_ids, params = msg
                with self._lock:
                    self._pending -= 1
                try:
                    self.engine.add_request(rid, None, params, prompt_ids=prompt_ids)
                except Exception as exc:
                    self._deliver(rid, exc)
            else:
                self.engine.abort_request(msg[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail the requests of this batch, not the server
                log.exception("engine step failed")
                victims = list(self.engine.running)
                for req in victims:
                    self.engine.abort_request(req.request_id)
                error = EngineError(f"engine failure: {type(exc).__name__}: {exc}")
                self._deliver_all([(req.request_id, error) for req in victims])
                continue
            self._deliver_all([(out.request_id, out) for out in outputs])


def _put_all(batch) -> None:
    for stream, item in batch:
        stream.put_nowait(item)
