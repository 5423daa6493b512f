"""Typed configuration of the router process (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.worker_config import BUNDLED_MODEL_DIR


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs to start.

    Attributes:
        model: checkpoint directory; the router reads config.json and
            tokenizer.json only (never weights, never torch).
        host: address the gRPC and metrics servers bind to.
        port: gRPC port of the public ``tandem.v1.Generation`` service.
        metrics_port: Prometheus port (0 picks a free one).
        redis_url: Redis server of the worker registry.
        redis_prefix: prefix of every Redis key Tandem writes.
        max_model_len: longest prompt plus completion in tokens; ``None`` means
            the config's ``max_position_embeddings``.
        routing: routing policy name (``"least-loaded"``, ``"round-robin"``).
        refresh_interval_s: seconds between reads of the worker registry.
        max_queue_len: most requests in flight at the router; more are refused
            with ``RESOURCE_EXHAUSTED``.
        lease_ms: lease asked of decode workers for each reservation (ms).
    """

    model: Path = BUNDLED_MODEL_DIR
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "tandem"
    max_model_len: int | None = None
    routing: str = "least-loaded"
    refresh_interval_s: float = 0.5
    max_queue_len: int = 1024
    lease_ms: int = 30_000
