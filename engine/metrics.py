"""Prometheus metrics of one Tandem process (torch-free).

Each process owns one :class:`ProcessMetrics` with its own registry and serves
it on its metrics address in the Prometheus text format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class ProcessMetrics:
    """The metrics every Tandem process exports.

    Gauges are set from the process's own state (KV blocks in blocks, requests
    in requests); counters only go up.
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        self.kv_blocks_used = Gauge(
            "tandem_kv_blocks_used",
            "KV cache blocks held by requests, reservations or transfers.",
            registry=self.registry,
        )
        self.kv_blocks_total = Gauge(
            "tandem_kv_blocks_total", "KV cache blocks in the pool.", registry=self.registry
        )
        self.requests_running = Gauge(
            "tandem_requests_running",
            "Requests being computed (in the batch or in flight).",
            registry=self.registry,
        )
        self.requests_waiting = Gauge(
            "tandem_requests_waiting", "Requests queued and not yet running.", registry=self.registry
        )
        self.kv_transfer_bytes = Counter(
            "tandem_kv_transfer_bytes",
            "Bytes of KV cache sent (prefill) or received (decode).",
            ["backend"],
            registry=self.registry,
        )
        self.requests = Counter(
            "tandem_requests", "Finished requests by gRPC status code.", ["code"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "tandem_prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "tandem_generation_tokens", "Generated tokens.", registry=self.registry
        )

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0 picks a free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
