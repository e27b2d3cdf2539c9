"""Server metrics in the Prometheus text exposition format (version 0.0.4),
written here rather than pulled in as a dependency: counters, gauges read
from the engine at scrape time, and histograms."""
from __future__ import annotations

import bisect
import math
import threading
from typing import Iterable, Mapping

PREFIX = "kernelplane_"
FINISH_REASONS = ("stop", "length", "abort", "error")
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Engine gauges, read from ``AsyncLLMEngine.stats()`` at scrape time: (metric, stats key, help).
ENGINE_GAUGES = (
    ("num_requests_running", "num_running", "Requests in the running batch."),
    ("num_requests_waiting", "num_waiting", "Requests waiting for a batch slot."),
    ("kv_blocks_used", "kv_blocks_used", "KV-cache blocks in use."),
    ("kv_blocks_total", "kv_blocks_total", "KV-cache blocks in all."),
)


def _number(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


class Counter:
    """A counter with one optional label; label values listed up front always show (as 0)."""

    def __init__(self, name: str, help_text: str, label: str | None = None, initial: Iterable[str] = ()):
        self.name, self.help, self.label = PREFIX + name, help_text, label
        self.values: dict[str, float] = {v: 0 for v in initial} if label else {"": 0}

    def inc(self, amount: float = 1, label_value: str = "") -> None:
        self.values[label_value] = self.values.get(label_value, 0) + amount

    def render(self) -> list[str]:
        lines = _header(self.name, "counter", self.help)
        for value, n in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels({self.label: value} if self.label else {})} {_number(n)}")
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Iterable[float]):
        self.name, self.help, self.buckets = PREFIX + name, help_text, tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        lines = _header(self.name, "histogram", self.help)
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """What the server counts itself; queue and KV-cache gauges come from the engine at scrape time.

    Called from the event loop and read by scrapes: one lock keeps a scrape consistent.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = Counter("requests_total", "Finished requests by finish reason (abort: client went away; "
                                "error: the engine failed).", "finish_reason", FINISH_REASONS)
        self.rejected = Counter("rejected_requests_total", "Requests refused before generation, by HTTP status.",
                                "status")
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter("generation_tokens_total", "Generated tokens of finished requests.")
        self.draft_tokens = Counter("spec_draft_tokens_total", "Speculative draft tokens proposed.")
        self.accepted_tokens = Counter("spec_accepted_tokens_total", "Speculative draft tokens accepted.")
        self.ttft = Histogram("time_to_first_token_seconds", "Time from request arrival to its first token.",
                              TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from request arrival to its end.", E2E_BUCKETS)

    def request_finished(self, reason: str, prompt_tokens: int, output_tokens: int, draft_tokens: int,
                         accepted_tokens: int, seconds: float) -> None:
        with self._lock:
            self.requests.inc(1, reason)
            self.prompt_tokens.inc(prompt_tokens)
            self.generation_tokens.inc(output_tokens)
            self.draft_tokens.inc(draft_tokens)
            self.accepted_tokens.inc(accepted_tokens)
            self.e2e.observe(seconds)

    def request_rejected(self, status: int) -> None:
        with self._lock:
            self.rejected.inc(1, str(status))

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def next_tokens(self, seconds: float, num_tokens: int) -> None:
        """``num_tokens`` arrived together (speculation) ``seconds`` after the previous ones."""
        with self._lock:
            for _ in range(num_tokens):
                self.itl.observe(seconds / num_tokens)

    def render(self, engine_stats: Mapping[str, float]) -> str:
        with self._lock:
            lines = []
            for counter in (self.requests, self.rejected, self.prompt_tokens, self.generation_tokens,
                            self.draft_tokens, self.accepted_tokens):
                lines += counter.render()
            for name, key, help_text in ENGINE_GAUGES:
                lines += _header(PREFIX + name, "gauge", help_text) + [f"{PREFIX}{name} {_number(engine_stats.get(key, 0))}"]
            for histogram in (self.ttft, self.itl, self.e2e):
                lines += histogram.render()
        return "\n".join(lines) + "\n"
