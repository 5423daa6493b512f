"""Typed configuration of a worker process (torch-free).

Parsed once by the CLI (``cli/``) and handed to ``prefill_service`` or
``decode_service``; never read from the environment, never written back.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.security_config import SecurityConfig

Role = Literal["prefill", "decode"]

#: The bundled default model, committed in the repository.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "tandem-tiny"


def default_worker_id(role: str) -> str:
    """``<role>-<hostname>-<pid>``: unique per process on a host."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a prefill or decode worker needs to start.

    Attributes:
        role: ``"prefill"`` or ``"decode"``.
        model: checkpoint directory (config.json, *.safetensors, tokenizer.json).
        device: ``"auto"`` (cuda when available), ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        dtype: ``"auto"`` (float32 on CPU; on CUDA the checkpoint's dtype, or
            bfloat16), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        max_model_len: longest prompt plus completion in tokens; ``None`` means
            the config's ``max_position_embeddings``.
        num_kv_blocks: blocks in the KV pool; ``None`` sizes the pool from
            ``kv_cache_memory_bytes``.
        kv_cache_memory_bytes: memory budget of the KV pool in bytes, used when
            ``num_kv_blocks`` is ``None``.
        block_size: tokens per KV block.
        host: address the gRPC, metrics and KV transfer servers bind to.
        advertise_host: address registered in Redis for those servers (what other
            machines dial), when the bound ``host`` is not (a wildcard bind, NAT);
            ``None`` registers ``host``.
        port: gRPC port (0 picks a free one).
        metrics_port: Prometheus port (0 picks a free one).
        redis_url: Redis server of the worker registry.
        redis_prefix: prefix of every Redis key Tandem writes.
        worker_id: stable id; ``None`` uses :func:`default_worker_id`.
        kv_transport: KV transfer backend: ``"auto"`` (the default: decided per worker pair
            at the KV handshake: cuda_ipc on one host with GPUs, nccl across hosts; tcp, with
            TLS when configured, whenever the decode worker's cache is on CPU), ``"tcp"``,
            ``"cuda_ipc"`` or ``"nccl"``.
        kv_transfer_layers_per_message: layer-wise KV streaming on a prefill worker:
            layers per message, sent as soon as they are computed; 0 sends the whole
            prompt in one message after the forward. The default 8 sends a 32-layer
            model's prompt in 4 messages (docs/performance.md, "KV transfer").
        transfer_port: port of the decode worker's KV receiver (0 picks one).
        heartbeat_interval_s: seconds between registry heartbeats.
        registration_ttl_s: TTL of the registration; an unrefreshed worker
            disappears from the registry after this many seconds.
        lease_ms: default lease of a decode reservation in milliseconds.
        max_num_seqs: most requests in one batch.
        max_num_batched_tokens: most tokens computed in one step.
        max_queue_len: most waiting requests; more are refused with
            ``RESOURCE_EXHAUSTED``.
        seed: seed of the worker's global random generator and of ``"dummy"`` weights.
        enable_prefix_caching: reuse cached KV blocks of earlier prompts and
            publish KV events to Redis (prefill and colocated workers; a decode
            worker's blocks are written by transfer and never looked up).
        load_format: ``"auto"`` or ``"safetensors"`` reads the checkpoint's
            weights; ``"dummy"`` builds seeded random weights from config.json
            alone (workers with the same seed hold the same weights).
        kernels: ``"auto"`` (Triton kernels and CUDA graphs on CUDA, torch on CPU),
            ``"triton"`` or ``"torch"`` (the reference path, for comparison).
        enforce_eager: never capture CUDA graphs for decode steps.
        async_scheduling: decode and colocated workers schedule and launch each
            decode step while the previous one still runs on the device
            (``engine.engine_core``); prefill workers ignore it.
        colocated: a decode worker that also computes prompts (``Generate``
            RPC), registered as a colocated worker: the baseline without
            disaggregation.
        security: TLS, the internal token and the message size limit.
        drain_timeout_s: seconds SIGTERM gives admitted requests to finish.
    """

    role: Role
    model: Path = BUNDLED_MODEL_DIR
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 256 * 1024**2
    block_size: int = 16
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    port: int = 0
    metrics_port: int = 0
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "tandem"
    worker_id: str | None = None
    kv_transport: str = "auto"
    kv_transfer_layers_per_message: int = 8
    transfer_port: int = 0
    heartbeat_interval_s: float = 1.0
    registration_ttl_s: float = 5.0
    lease_ms: int = 30_000
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_queue_len: int = 256
    seed: int = 0
    load_format: str = "auto"
    enable_prefix_caching: bool = True
    kernels: str = "auto"
    enforce_eager: bool = False
    async_scheduling: bool = False
    colocated: bool = False
    security: SecurityConfig = field(default_factory=SecurityConfig)
    drain_timeout_s: float = 30.0

    @property
    def resolved_worker_id(self) -> str:
        """``worker_id`` or the default one for this process."""
        return self.worker_id or default_worker_id(self.role)

    def advertised(self, address: str) -> str:
        """``address`` as registered: a ``host:port`` bound on :attr:`host` gets
        :attr:`advertise_host` instead; any other address (``loopback:1``) is kept.

        >>> WorkerConfig("decode", host="0.0.0.0", advertise_host="10.0.0.7").advertised("0.0.0.0:7001")
        '10.0.0.7:7001'
        """
        host, sep, port = address.rpartition(":")
        if self.advertise_host is None or not sep or host.strip("[]") != self.host.strip("[]"):
            return address
        advertise = self.advertise_host
        if ":" in advertise and not advertise.startswith("["):  # IPv6
            advertise = f"[{advertise}]"
        return f"{advertise}:{port}"
