"""The Prometheus exposition written by the server, without a server."""
from __future__ import annotations

import pytest

from kernelplane.server.metrics import Counter, Histogram, ServerMetrics

from .prometheus_text import parse_prometheus


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram("latency_seconds", "help", [0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    values = parse_prometheus("\n".join(h.render()) + "\n")
    bucket = "kernelplane_latency_seconds_bucket"
    assert values[(bucket, (("le", "0.1"),))] == 2  # a value equal to a bound counts in that bucket
    assert values[(bucket, (("le", "1.0"),))] == 4
    assert values[(bucket, (("le", "+Inf"),))] == 5 == values[("kernelplane_latency_seconds_count", ())]
    assert values[("kernelplane_latency_seconds_sum", ())] == pytest.approx(8.65)


def test_label_values_are_escaped():
    c = Counter("odd_total", "help", "reason")
    c.inc(2, 'say "hi"\\n')
    c.inc(1, "line\nbreak")
    values = parse_prometheus("\n".join(c.render()) + "\n")
    assert values[("kernelplane_odd_total", (("reason", 'say \\"hi\\"\\\\n'),))] == 2
    assert values[("kernelplane_odd_total", (("reason", "line\\nbreak"),))] == 1


def test_server_metrics_render():
    m = ServerMetrics()
    m.request_finished("stop", prompt_tokens=7, output_tokens=5, draft_tokens=6, accepted_tokens=4, seconds=0.3)
    m.request_finished("abort", prompt_tokens=3, output_tokens=1, draft_tokens=0, accepted_tokens=0, seconds=0.1)
    m.request_rejected(429)
    m.first_token(0.02)
    m.next_tokens(0.03, 3)  # three tokens in one step: three observations of 10 ms
    values = parse_prometheus(m.render({"num_running": 2, "num_waiting": 1, "kv_blocks_used": 5, "kv_blocks_total": 64}))
    assert values[("kernelplane_requests_total", (("finish_reason", "stop"),))] == 1
    assert values[("kernelplane_requests_total", (("finish_reason", "abort"),))] == 1
    assert values[("kernelplane_requests_total", (("finish_reason", "length"),))] == 0
    assert values[("kernelplane_rejected_requests_total", (("status", "429"),))] == 1
    assert values[("kernelplane_prompt_tokens_total", ())] == 10
    assert values[("kernelplane_generation_tokens_total", ())] == 6
    assert values[("kernelplane_spec_draft_tokens_total", ())] == 6
    assert values[("kernelplane_spec_accepted_tokens_total", ())] == 4
    assert values[("kernelplane_num_requests_running", ())] == 2
    assert values[("kernelplane_num_requests_waiting", ())] == 1
    assert values[("kernelplane_kv_blocks_used", ())] == 5
    assert values[("kernelplane_kv_blocks_total", ())] == 64
    assert values[("kernelplane_inter_token_latency_seconds_count", ())] == 3
    assert values[("kernelplane_inter_token_latency_seconds_bucket", (("le", "0.01"),))] == 3
    assert values[("kernelplane_time_to_first_token_seconds_count", ())] == 1


def test_the_reader_rejects_bad_text():
    with pytest.raises(AssertionError):
        parse_prometheus("kernelplane_x 1\n")  # no HELP/TYPE
    with pytest.raises(AssertionError):
        parse_prometheus("# HELP a_total a\n# TYPE a_total counter\na_total{x=1} 1\n")  # unquoted label value
    with pytest.raises(AssertionError):
        parse_prometheus('# HELP h h\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_count 1\n')
