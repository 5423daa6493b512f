"""Prometheus metrics of one Tandem process (torch-free).

Each process owns one :class:`ProcessMetrics` with its own registry and serves
it on its metrics address: the Prometheus text format, or OpenMetrics (which
carries exemplars) when the scraper's ``Accept`` header asks for it.

Who records what:

- router: the request-latency histograms (TTFT, TPOT, ITL, end to end) and
  TTFT's phases (queue: router wait plus the worker's engine queue; prefill
  compute; KV transfer; all three as the workers report them), requests by
  status code and by finish reason, prompt and generation tokens, routing
  decisions, prefix-index staleness; exemplars carry the request's trace id
  when it is traced;
- prefill worker: prompt tokens, those taken from its prefix cache and those
  computed, prefix-cache evictions, KV sent (bytes counter, per-transfer bytes
  and seconds histograms by backend), engine queue time;
- decode worker: generation tokens it produced, KV received (colocated: engine
  queue time);
- every worker: gauges of running and waiting requests, batch size and KV
  blocks used and total, read from the engine's load snapshot at each scrape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.tracing import current_trace_id

#: Request latencies in seconds: 1 ms .. 5 min (TTFT, end to end, queue).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: Per-token latencies in seconds: 1 ms .. 10 s (TPOT, ITL).
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: KV transfer durations in seconds: 0.1 ms .. 60 s.
TRANSFER_SECONDS_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
)  # fmt: skip
#: KV transfer sizes in bytes: 4 KiB .. 16 GiB, powers of 4.
TRANSFER_BYTES_BUCKETS = tuple(float(4**k * 1024) for k in range(1, 13))


@dataclass
class RequestTimer:
    """Timestamps of one request at the router (``time.perf_counter`` seconds).

    Attributes:
        started: arrival.
        ttft_s: seconds from arrival to the first token (``None`` until then).
        last_token_at: when the latest tokens arrived.
        num_output_tokens: tokens sent so far.
        num_cached_tokens: prompt tokens a prefix cache supplied.
        finish_reason: ``stop``, ``length``, ... once finished.
    """

    started: float = field(default_factory=time.perf_counter)
    ttft_s: float | None = None
    last_token_at: float | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds since arrival."""
        return time.perf_counter() - self.started


class ProcessMetrics:
    """The metrics every Tandem process exports (see the module docstring).

    Gauges are set from the process's own state (KV blocks in blocks, requests
    in requests); counters only go up; histograms are in seconds or bytes.
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge(
            "tandem_process_info", "Always 1; its label names the process's role.", ["role"], registry=r
        ).labels(role=role).set(1)
        self.kv_blocks_used = Gauge(
            "tandem_kv_blocks_used",
            "KV cache blocks held by requests, reservations or transfers.",
            registry=r,
        )
        self.kv_blocks_total = Gauge("tandem_kv_blocks_total", "KV cache blocks in the pool.", registry=r)
        self.requests_running = Gauge(
            "tandem_requests_running", "Requests being computed (in the batch or in flight).", registry=r
        )
        self.requests_waiting = Gauge(
            "tandem_requests_waiting", "Requests queued and not yet running.", registry=r
        )
        self.batch_size = Gauge(
            "tandem_batch_size", "Requests in the engine's running batch (workers).", registry=r
        )
        self.kv_transfer_bytes = Counter(
            "tandem_kv_transfer_bytes",
            "Bytes of KV cache sent (prefill) or received (decode).",
            ["backend"],
            registry=r,
        )
        self.kv_transfer_size = Histogram(
            "tandem_kv_transfer_size_bytes",
            "Bytes of one request's KV transfer, by backend.",
            ["backend"],
            buckets=TRANSFER_BYTES_BUCKETS,
            registry=r,
        )
        self.kv_transfer_seconds = Histogram(
            "tandem_kv_transfer_seconds",
            "Seconds of one request's KV transfer (gather to acknowledgement), by backend.",
            ["backend"],
            buckets=TRANSFER_SECONDS_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "tandem_requests", "Finished requests by gRPC status code.", ["code"], registry=r
        )
        self.requests_finished = Counter(
            "tandem_requests_finished",
            "Requests that ended with a finish reason (stop, length, ...).",
            ["finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tandem_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            "tandem_prefix_cache_hit_tokens",
            "Prompt tokens reused from the prefix cache instead of computed (prefill).",
            registry=r,
        )
        self.prefill_tokens = Counter(
            "tandem_prefill_tokens", "Prompt tokens computed (not taken from the prefix cache).", registry=r
        )
        self.prefix_cache_evictions = Counter(
            "tandem_prefix_cache_evictions", "Prefix-cache blocks evicted for reuse.", registry=r
        )
        self.prefix_index_staleness = Gauge(
            "tandem_prefix_index_staleness_seconds",
            "Age of the oldest KV event not yet applied to the ownership index (router).",
            registry=r,
        )
        self.routing_decisions = Counter(
            "tandem_routing_decisions",
            "Prefill routing decisions by policy and reason (router).",
            ["policy", "reason"],
            registry=r,
        )
        self.generation_tokens = Counter("tandem_generation_tokens", "Generated tokens.", registry=r)
        self.time_to_first_token = Histogram(
            "tandem_time_to_first_token_seconds",
            "Seconds from a request's arrival at the router to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "tandem_time_per_output_token_seconds",
            "Mean seconds per output token after the first, one sample per request of 2+ tokens.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "tandem_inter_token_latency_seconds",
            "Seconds between consecutive tokens of a request, one sample per token after the first.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "tandem_e2e_request_latency_seconds",
            "Seconds from a request's arrival at the router to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_queue = Histogram(
            "tandem_request_queue_seconds",
            "Seconds a request waited before its prompt was first scheduled: at the router from "
            "arrival until it called the prefill (or colocated) worker (validation, routing, "
            "decode reservation), plus the wait in that worker's engine queue (reported by the "
            "worker).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_prefill = Histogram(
            "tandem_request_prefill_seconds",
            "Seconds the prefill (or colocated) worker's engine computed a request's prompt, from "
            "its first schedule to its first token (reported by the worker; router).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_kv_transfer = Histogram(
            "tandem_request_kv_transfer_seconds",
            "Seconds of a request's KV transfer as its prefill worker reported it, one sample per "
            "request at the router (the workers' tandem_kv_transfer_seconds has it by backend).",
            buckets=TRANSFER_SECONDS_BUCKETS,
            registry=r,
        )
        self.engine_queue = Histogram(
            "tandem_engine_queue_seconds",
            "Seconds a request waited in this worker's engine queue until a step first scheduled "
            "it (prefill and colocated workers).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def observe_tokens(self, timer: RequestTimer, num_tokens: int) -> None:
        """Record ``num_tokens`` new tokens of a request at the router: generation tokens, its
        TTFT (the first ones) or one inter-token latency sample per token (the gap since the
        previous tokens, spread evenly over them)."""
        now = time.perf_counter()
        if timer.ttft_s is None:
            timer.ttft_s = now - timer.started
        elif timer.last_token_at is not None:
            for _ in range(num_tokens):
                self.inter_token_latency.observe((now - timer.last_token_at) / num_tokens)
        timer.last_token_at = now
        timer.num_output_tokens += num_tokens
        self.generation_tokens.inc(num_tokens)

    def observe_request(self, timer: RequestTimer, code: str) -> None:
        """Record a request that ended at the router with status ``code`` (a gRPC status code
        name): its count, finish reason, TTFT, and when OK its end-to-end latency and TPOT.
        Exemplars carry its trace id when it is traced."""
        trace_id = current_trace_id()
        exemplar = {"trace_id": trace_id} if trace_id else None
        e2e_s = timer.elapsed_s
        self.requests.labels(code=code).inc(exemplar=exemplar)
        if timer.finish_reason is not None:
            self.requests_finished.labels(finish_reason=timer.finish_reason).inc()
        if timer.ttft_s is not None:
            self.time_to_first_token.observe(timer.ttft_s, exemplar=exemplar)
        if code == "OK":
            self.e2e_request_latency.observe(e2e_s, exemplar=exemplar)
            if timer.ttft_s is not None and timer.num_output_tokens > 1:
                tpot = (e2e_s - timer.ttft_s) / (timer.num_output_tokens - 1)
                self.time_per_output_token.observe(tpot, exemplar=exemplar)

    def observe_ttft_phases(
        self, queue_s: float, prefill_s: float, kv_transfer_s: float | None = None
    ) -> None:
        """Record one request's TTFT phases at the router (seconds): queue (router wait plus
        the worker's engine queue), prefill compute and, when disaggregated, the KV transfer.
        Exemplars carry its trace id when it is traced."""
        trace_id = current_trace_id()
        exemplar = {"trace_id": trace_id} if trace_id else None
        self.request_queue.observe(queue_s, exemplar=exemplar)
        self.request_prefill.observe(prefill_s, exemplar=exemplar)
        if kv_transfer_s is not None:
            self.request_kv_transfer.observe(kv_transfer_s, exemplar=exemplar)

    def observe_transfer(self, backend: str, num_bytes: int, seconds: float) -> None:
        """Record one request's KV transfer on the sending side (bytes, seconds to the ack)."""
        self.kv_transfer_bytes.labels(backend=backend).inc(num_bytes)
        self.kv_transfer_size.labels(backend=backend).observe(num_bytes)
        self.kv_transfer_seconds.labels(backend=backend).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0 picks a free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
