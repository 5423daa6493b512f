"""Typed configuration of the router process (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.security_config import SecurityConfig
from engine.worker_config import BUNDLED_MODEL_DIR, WorkerConfig


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
        routing: routing policy name (``"prefix"``: cached prefix weighed
            against load, ``"least-loaded"``, ``"round-robin"``).
        refresh_interval_s: seconds between reads of the worker registry.
        max_queue_len: most requests in flight at the router; more are refused
            with ``RESOURCE_EXHAUSTED``.
        lease_ms: lease asked of decode workers for each reservation (ms).
        max_prompt_tokens: longest prompt accepted, in tokens (``None``: only
            ``max_model_len`` bounds it); longer ones get ``INVALID_ARGUMENT``.
        security: TLS, public bearer tokens, the internal token sent to
            workers and the message size limit.
        drain_timeout_s: seconds SIGTERM gives requests in flight to finish.
        registration_ttl_s: the workers' registration TTL (seconds): a healthy
            worker missing from the registry stays routable this long (Redis
            restarting empty must not drop live workers).
        migrate_on_failure: when a decode worker dies mid-stream, resume the
            request on another decode worker (re-prefilling prompt plus the
            tokens generated so far) instead of ending the stream with
            ``UNAVAILABLE``.
        max_prefill_retries: other prefill workers tried when a ``Prefill`` call
            fails with ``UNAVAILABLE`` (the worker died before the transfer
            completed); 0 turns retries off.
    """

    model: Path = BUNDLED_MODEL_DIR
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "tandem"
    max_model_len: int | None = None
    routing: str = "prefix"
    refresh_interval_s: float = 0.5
    max_queue_len: int = 1024
    lease_ms: int = 30_000
    max_prompt_tokens: int | None = None
    security: SecurityConfig = field(default_factory=SecurityConfig)
    drain_timeout_s: float = 30.0
    registration_ttl_s: float = WorkerConfig.registration_ttl_s
    migrate_on_failure: bool = False
    max_prefill_retries: int = 2
