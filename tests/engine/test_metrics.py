"""engine.metrics: request timing at the router (TTFT, ITL, TPOT, end to end),
transfer histograms, exemplars with the trace id, and OpenMetrics on request."""

from __future__ import annotations

import urllib.request

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from engine.metrics import ProcessMetrics, RequestTimer


class Clock:
    """A settable ``time.perf_counter`` (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("engine.metrics.time.perf_counter", fake)
    return fake


def _value(metrics: ProcessMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return round(value, 9) if value is not None else -1.0


def test_request_timing_feeds_every_latency_histogram(clock: Clock) -> None:
    metrics = ProcessMetrics("router")
    timer = RequestTimer(started=100.0)
    # Tokens at t = 100.5 (1 token), 100.7 (1), 101.1 (2): TTFT 0.5, gaps 0.2, 0.2, 0.2.
    for clock.now, n in ((100.5, 1), (100.7, 1), (101.1, 2)):
        metrics.observe_tokens(timer, n)
    timer.finish_reason = "length"
    metrics.observe_request(timer, "OK")
    assert (timer.ttft_s, timer.num_output_tokens) == (0.5, 4)
    assert _value(metrics, "tandem_generation_tokens_total") == 4
    assert _value(metrics, "tandem_time_to_first_token_seconds_sum") == 0.5
    assert _value(metrics, "tandem_inter_token_latency_seconds_count") == 3
    assert _value(metrics, "tandem_inter_token_latency_seconds_sum") == 0.6
    assert _value(metrics, "tandem_e2e_request_latency_seconds_sum") == 1.1
    assert _value(metrics, "tandem_time_per_output_token_seconds_sum") == 0.2  # (1.1 - 0.5) / 3
    assert _value(metrics, "tandem_requests_total", code="OK") == 1
    assert _value(metrics, "tandem_requests_finished_total", finish_reason="length") == 1


def test_a_failed_request_counts_its_code_but_no_latency(clock: Clock) -> None:
    metrics = ProcessMetrics("router")
    timer = RequestTimer(started=0.0)
    clock.now = 0.25
    metrics.observe_request(timer, "RESOURCE_EXHAUSTED")
    assert _value(metrics, "tandem_requests_total", code="RESOURCE_EXHAUSTED") == 1
    assert _value(metrics, "tandem_time_to_first_token_seconds_count") == 0
    assert _value(metrics, "tandem_e2e_request_latency_seconds_count") == 0


def test_transfers_are_observed_by_backend() -> None:
    metrics = ProcessMetrics("prefill")
    metrics.observe_transfer("tcp", 65536, 0.002)
    metrics.observe_transfer("tcp", 4096, 0.0004)
    assert _value(metrics, "tandem_kv_transfer_bytes_total", backend="tcp") == 69632
    assert _value(metrics, "tandem_kv_transfer_size_bytes_bucket", backend="tcp", le="4096.0") == 1
    assert _value(metrics, "tandem_kv_transfer_size_bytes_bucket", backend="tcp", le="65536.0") == 2
    assert _value(metrics, "tandem_kv_transfer_seconds_bucket", backend="tcp", le="0.0005") == 1
    assert _value(metrics, "tandem_process_info", role="prefill") == 1


def test_exemplars_carry_the_trace_id_in_openmetrics_only(clock: Clock) -> None:
    metrics = ProcessMetrics("router")
    with TracerProvider().get_tracer("t").start_as_current_span("req") as span:
        trace_id = trace.format_trace_id(span.get_span_context().trace_id)
        timer = RequestTimer(started=0.0)
        clock.now = 0.03
        metrics.observe_tokens(timer, 1)
        metrics.observe_request(timer, "OK")
    port = metrics.serve("127.0.0.1", 0)

    def scrape(accept: str | None) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
        if accept:
            request.add_header("Accept", accept)
        with urllib.request.urlopen(request, timeout=5) as resp:
            return str(resp.read().decode())

    exemplar = f'# {{trace_id="{trace_id}"}} 0.03'
    bucket = 'tandem_time_to_first_token_seconds_bucket{le="0.04"} 1.0 '
    om = scrape("application/openmetrics-text; version=1.0.0; charset=utf-8").splitlines()
    assert next(line for line in om if line.startswith(bucket)).startswith(bucket + exemplar)
    assert "trace_id" not in scrape(None)  # the Prometheus text format has no exemplars
