"""Prometheus text exposition for the server, without extra dependencies."""
from __future__ import annotations

import bisect
import threading
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        lines += [f"{self.name}_sum {self.total}", f"{self.name}_count {self.n}"]
        return lines


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = Counter()  # by finish reason / error kind
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.ttft = Histogram("kernelplane_time_to_first_token_seconds", "Time from request arrival to first token.", TTFT_BUCKETS)
        self.itl = Histogram("kernelplane_inter_token_latency_seconds", "Time between streamed token batches.", ITL_BUCKETS)

    def finished(self, reason: str, prompt_tokens: int, output_tokens: int, draft: int, accepted: int) -> None:
        with self._lock:
            self.requests[reason] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += output_tokens
            self.draft_tokens += draft
            self.accepted_tokens += accepted

    def failed(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] += 1

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def render(self, engine_stats: dict) -> str:
        with self._lock:
            lines = ["# HELP kernelplane_requests_total Requests by outcome.", "# TYPE kernelplane_requests_total counter"]
            for reason, n in sorted(self.requests.items()):
                lines.append(f'kernelplane_requests_total{{outcome="{reason}"}} {n}')
            for name, value, help_text in [
                ("kernelplane_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
                ("kernelplane_generation_tokens_total", self.generation_tokens, "Generated tokens of finished requests."),
                ("kernelplane_spec_draft_tokens_total", self.draft_tokens, "Speculative draft tokens proposed."),
                ("kernelplane_spec_accepted_tokens_total", self.accepted_tokens, "Speculative draft tokens accepted."),
            ]:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
            for name, key, help_text in [
                ("kernelplane_num_requests_running", "num_running", "Requests in the running batch."),
                ("kernelplane_num_requests_waiting", "num_waiting", "Requests waiting for a batch slot."),
                ("kernelplane_kv_blocks_used", "kv_blocks_used", "KV-cache blocks in use."),
                ("kernelplane_kv_blocks_total", "kv_blocks_total", "KV-cache blocks in all."),
            ]:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {engine_stats.get(key, 0)}"]
            lines += self.ttft.render() + self.itl.render()
        return "\n".join(lines) + "\n"
