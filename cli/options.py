"""Command-line options shared by the subcommands, and their conversion to typed configs.

Every value is validated once, here, by an argparse ``type=`` function, so a bad value
stops the CLI with a one-line ``argparse`` error (exit status 2) before anything starts.
The configs (:class:`engine.worker_config.WorkerConfig`, :class:`router.config.RouterConfig`)
are built from the parsed namespace and converted back to flags by :func:`worker_flags`
and :func:`router_flags`, which is how ``tandem serve`` starts its child processes.

This module is torch-free: ``tandem --help`` and ``tandem router`` import it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cli.security_options import (
    add_process_options,
    add_public_api_options,
    drain_flags,
    security_config_from_args,
    security_flags,
)
from cli.validators import (
    device_name,
    model_dir,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
    power_of_two,
    redis_url,
)
from engine.security_config import REDIS_URL_ENV, redis_url_env
from engine.worker_config import BUNDLED_MODEL_DIR, Role, WorkerConfig
from router.config import RouterConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
ROUTING_POLICIES = ("prefix", "least-loaded", "round-robin")
KV_TRANSPORTS = ("auto", "cuda_ipc", "nccl", "tcp")
LOAD_FORMATS = (
    "auto",
    "safetensors",
    "dummy",
)  # engine.models.loader.LOAD_FORMATS (that module imports torch)
KERNEL_CHOICES = ("auto", "triton", "torch")
GIB = 1024**3


# --- option groups ----------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser, *, engine: bool = True) -> None:
    """Adds ``--model`` and ``--max-model-len``; with ``engine`` also the KV cache and device options."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        type=model_dir,
        default=BUNDLED_MODEL_DIR,
        metavar="DIR",
        help="checkpoint directory with config.json, *.safetensors and tokenizer.json "
        "(default: the bundled tiny model)",
    )
    group.add_argument(
        "--max-model-len",
        type=positive_int,
        metavar="N",
        help="longest prompt plus completion, in tokens (default: the model's max_position_embeddings)",
    )
    if not engine:
        return
    group.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="auto (cuda when available), cpu, cuda or cuda:N (default: auto)",
    )
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weight and KV cache dtype; auto keeps the checkpoint's (float32 on CPU for float16) "
        "(default: auto)",
    )
    group.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        default=WorkerConfig.load_format,
        help="auto or safetensors reads the checkpoint's weights; dummy builds random weights "
        "from config.json alone, identical on every worker with the same --seed (default: %(default)s)",
    )
    group.add_argument(
        "--kernels",
        choices=KERNEL_CHOICES,
        default=WorkerConfig.kernels,
        help="auto runs the Triton kernels (attention, RMSNorm, RoPE, SiLU) on CUDA and torch on CPU; "
        "torch forces the reference path, for comparison (default: %(default)s)",
    )
    group.add_argument(
        "--enforce-eager",
        action="store_true",
        help="never capture CUDA graphs for decode steps (default: capture on CUDA)",
    )
    group.add_argument(
        "--async-scheduling",
        action="store_true",
        help="decode and colocated workers: schedule each decode step while the previous one "
        "runs on the device, overlapping host work (default: off)",
    )
    cache = parser.add_argument_group("KV cache")
    cache.add_argument(
        "--num-kv-blocks",
        type=positive_int,
        metavar="N",
        help="blocks in the KV pool (default: sized from --kv-cache-memory-gb)",
    )
    cache.add_argument(
        "--kv-cache-memory-gb",
        type=positive_float,
        default=WorkerConfig.kv_cache_memory_bytes / GIB,
        metavar="GIB",
        help="memory budget of the KV pool in GiB, used without --num-kv-blocks (default: %(default)s)",
    )
    cache.add_argument(
        "--block-size",
        type=power_of_two,
        default=WorkerConfig.block_size,
        metavar="N",
        help="tokens per KV block, a power of two (default: %(default)s)",
    )


def add_network_options(
    parser: argparse.ArgumentParser, *, default_port: int, redis_url_default: str | None
) -> None:
    """Adds ``--host``, ``--port``, ``--metrics-port``, ``--redis-url`` and ``--redis-prefix``."""
    group = parser.add_argument_group("network")
    group.add_argument(
        "--host", default="127.0.0.1", help="address the servers bind to (default: %(default)s)"
    )
    group.add_argument(
        "--port",
        type=port_number,
        default=default_port,
        help="gRPC port; 0 picks a free one (default: %(default)s)",
    )
    group.add_argument(
        "--metrics-port",
        type=port_number,
        default=0,
        metavar="PORT",
        help="Prometheus /metrics port; 0 picks a free one (default: %(default)s)",
    )
    redis_help = (
        f"Redis server of the worker registry (default: ${REDIS_URL_ENV}, else {redis_url_default})"
        if redis_url_default
        else f"use this Redis server instead of starting one (default: ${REDIS_URL_ENV}, else start a "
        "private redis-server)"
    )
    redis_help += f"; a URL with a password belongs in ${REDIS_URL_ENV}: flags show in ps"
    group.add_argument("--redis-url", type=redis_url, default=None, metavar="URL", help=redis_help)
    group.add_argument(
        "--redis-prefix",
        default=WorkerConfig.redis_prefix,
        metavar="PREFIX",
        help="prefix of every Redis key Tandem writes (default: %(default)s)",
    )
    add_process_options(parser)


def add_worker_options(parser: argparse.ArgumentParser, *, role: Role | None) -> None:
    """Adds the scheduler and transfer options of a ``role`` worker.

    A worker (``role`` given) also gets ``--worker-id``, and a decode worker
    ``--transfer-port``; ``tandem serve`` (``role=None``) assigns both itself.
    """
    group = parser.add_argument_group("worker")
    if role is not None:
        group.add_argument(
            "--worker-id", metavar="ID", help="stable worker id (default: <role>-<hostname>-<pid>)"
        )
    group.add_argument(
        "--advertise-host",
        metavar="HOST",
        help="address registered in Redis for the gRPC, metrics and KV transfer servers, for when the "
        "bound --host is not what other machines dial (e.g. --host 0.0.0.0 --advertise-host <pod IP>) "
        "(default: --host)",
    )
    if role == "decode":
        group.add_argument(
            "--transfer-port",
            type=port_number,
            default=0,
            metavar="PORT",
            help="port of the decode worker's KV receiver; 0 picks a free one (default: %(default)s)",
        )
    if role in ("decode", None):
        group.add_argument(
            "--colocated",
            action="store_true",
            help="colocated baseline: decode workers also compute prompts (no prefill pool, no KV "
            "transfer); under `serve`, --prefill-workers is ignored",
        )
    group.add_argument(
        "--kv-transport",
        choices=KV_TRANSPORTS,
        default=WorkerConfig.kv_transport,
        help="KV transfer backend: cuda_ipc (GPUs of one host), nccl (torch.distributed, across hosts; "
        "gloo on CPU), tcp (CPU, any host), auto (decided per worker pair at the KV handshake: cuda_ipc on "
        "one host with GPUs, nccl across hosts, tcp on CPU) (default: %(default)s)",
    )
    group.add_argument(
        "--kv-transfer-layers-per-message",
        type=int,
        default=WorkerConfig.kv_transfer_layers_per_message,
        help="layer-wise KV streaming: a prefill worker sends the KV of this many layers per message as "
        "soon as they are computed, overlapping the transfer with the rest of the prefill; 0 sends the "
        "whole prompt in one message after the forward (default: %(default)s)",
    )
    group.add_argument(
        "--lease-ms",
        type=positive_int,
        default=WorkerConfig.lease_ms,
        metavar="MS",
        help="lease of a decode reservation in milliseconds (default: %(default)s)",
    )
    group.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=WorkerConfig.max_num_seqs,
        metavar="N",
        help="most requests in one batch (default: %(default)s)",
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=WorkerConfig.max_num_batched_tokens,
        metavar="N",
        help="most tokens computed in one step (default: %(default)s)",
    )
    group.add_argument(
        "--max-queue-len",
        type=positive_int,
        default=WorkerConfig.max_queue_len,
        metavar="N",
        help="most waiting requests; more are refused with RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    group.add_argument(
        "--enable-prefix-caching",
        action="store_true",
        default=WorkerConfig.enable_prefix_caching,
        help="reuse the KV of cached prompt prefixes and publish KV events to Redis; prefill and "
        "colocated workers only (default: on)",
    )
    group.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="compute every prompt in full; no KV events",
    )
    group.add_argument(
        "--seed",
        type=non_negative_int,
        default=WorkerConfig.seed,
        help="seed of the worker's global random generator (default: %(default)s)",
    )


def add_router_options(parser: argparse.ArgumentParser, *, standalone: bool = True) -> None:
    """Adds ``--routing`` and the router's queue limit; ``standalone`` also adds ``--lease-ms``.

    Under ``tandem serve`` (``standalone=False``) the queue limit is spelled
    ``--router-max-queue-len`` because ``--max-queue-len`` is the workers' option, and
    ``--lease-ms`` comes from :func:`add_worker_options`.
    """
    add_public_api_options(parser)
    group = parser.add_argument_group("router")
    group.add_argument(
        "--routing",
        choices=ROUTING_POLICIES,
        default=RouterConfig.routing,
        help="how the router picks workers: prefix weighs each prefill worker's cached prefix of the "
        "prompt (from Redis) against its load, least-loaded and round-robin ignore caches "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-queue-len" if standalone else "--router-max-queue-len",
        dest="router_max_queue_len",
        type=positive_int,
        default=RouterConfig.max_queue_len,
        metavar="N",
        help="most requests in flight at the router; more are refused with RESOURCE_EXHAUSTED "
        "(default: %(default)s)",
    )
    if standalone:
        group.add_argument(
            "--lease-ms",
            type=positive_int,
            default=RouterConfig.lease_ms,
            metavar="MS",
            help="lease asked of decode workers for each reservation, in ms (default: %(default)s)",
        )
    group.add_argument(
        "--migrate-on-failure",
        action="store_true",
        help="when a decode worker dies mid-stream, resume the request on another decode worker by "
        "prefilling the prompt plus the tokens generated so far (default: the stream ends with "
        "UNAVAILABLE)",
    )
    group.add_argument(
        "--max-prefill-retries",
        type=non_negative_int,
        default=RouterConfig.max_prefill_retries,
        metavar="N",
        help="other prefill workers tried when a prefill worker fails with UNAVAILABLE before the KV "
        "transfer completed (default: %(default)s)",
    )


# --- namespace -> config -> flags ---------------------------------------------------


def worker_config_from_args(args: argparse.Namespace, role: Role) -> WorkerConfig:
    """Builds the config of a ``role`` worker from options added by the ``add_*_options`` above.

    ``--kv-cache-memory-gb`` (GiB) becomes ``kv_cache_memory_bytes`` (bytes, truncated).
    Options that the parser lacks (``--worker-id``, ``--transfer-port`` under ``serve``)
    keep the config's defaults.
    """
    return WorkerConfig(
        role=role,
        model=Path(args.model),
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=int(args.kv_cache_memory_gb * GIB),
        block_size=args.block_size,
        host=args.host,
        advertise_host=args.advertise_host,
        port=args.port,
        metrics_port=args.metrics_port,
        redis_url=args.redis_url or os.environ.get(REDIS_URL_ENV) or WorkerConfig.redis_url,
        redis_prefix=args.redis_prefix,
        worker_id=getattr(args, "worker_id", None),
        kv_transport=args.kv_transport,
        kv_transfer_layers_per_message=args.kv_transfer_layers_per_message,
        transfer_port=getattr(args, "transfer_port", WorkerConfig.transfer_port),
        lease_ms=args.lease_ms,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_queue_len=args.max_queue_len,
        seed=args.seed,
        load_format=args.load_format,
        kernels=args.kernels,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        colocated=getattr(args, "colocated", False),
        enable_prefix_caching=args.enable_prefix_caching,
        security=security_config_from_args(args, public=False),
        drain_timeout_s=args.drain_timeout_s,
    )


def router_config_from_args(args: argparse.Namespace) -> RouterConfig:
    """Builds the router's config from options added by the ``add_*_options`` above."""
    return RouterConfig(
        model=Path(args.model),
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        redis_url=args.redis_url or os.environ.get(REDIS_URL_ENV) or RouterConfig.redis_url,
        redis_prefix=args.redis_prefix,
        max_model_len=args.max_model_len,
        routing=args.routing,
        max_queue_len=args.router_max_queue_len,
        lease_ms=args.lease_ms,
        max_prompt_tokens=args.max_prompt_tokens,
        security=security_config_from_args(args, public=True),
        drain_timeout_s=args.drain_timeout_s,
        migrate_on_failure=args.migrate_on_failure,
        max_prefill_retries=args.max_prefill_retries,
    )


def redis_url_flags(url: str) -> list[str]:
    """``["--redis-url", url]``, or nothing when ``url`` holds a password: that one travels in
    the environment (:func:`engine.security_config.redis_url_env`), since flags show in ``ps``."""
    return [] if redis_url_env(url) else ["--redis-url", url]


def worker_flags(config: WorkerConfig) -> list[str]:
    """The ``tandem prefill|decode`` flags that parse back to ``config`` (role excluded).

    ``transfer_port`` is passed to decode workers only, ``worker_id`` only when set.
    """
    flags = [
        *("--model", str(config.model)),
        *("--device", config.device),
        *("--dtype", config.dtype),
        *("--kv-cache-memory-gb", repr(config.kv_cache_memory_bytes / GIB)),
        *("--block-size", str(config.block_size)),
        *("--host", config.host),
        *("--port", str(config.port)),
        *("--metrics-port", str(config.metrics_port)),
        *redis_url_flags(config.redis_url),
        *("--redis-prefix", config.redis_prefix),
        *("--kv-transport", config.kv_transport),
        *("--kv-transfer-layers-per-message", str(config.kv_transfer_layers_per_message)),
        *("--lease-ms", str(config.lease_ms)),
        *("--max-num-seqs", str(config.max_num_seqs)),
        *("--max-num-batched-tokens", str(config.max_num_batched_tokens)),
        *("--max-queue-len", str(config.max_queue_len)),
        *("--seed", str(config.seed)),
        *("--load-format", config.load_format),
        *("--kernels", config.kernels),
    ]
    if config.max_model_len is not None:
        flags += ["--max-model-len", str(config.max_model_len)]
    if config.num_kv_blocks is not None:
        flags += ["--num-kv-blocks", str(config.num_kv_blocks)]
    if config.worker_id is not None:
        flags += ["--worker-id", config.worker_id]
    if config.advertise_host is not None:
        flags += ["--advertise-host", config.advertise_host]
    if config.role == "decode":
        flags += ["--transfer-port", str(config.transfer_port)]
    if config.enforce_eager:
        flags += ["--enforce-eager"]
    if config.async_scheduling:
        flags += ["--async-scheduling"]
    if config.colocated:
        flags += ["--colocated"]
    if not config.enable_prefix_caching:
        flags += ["--no-enable-prefix-caching"]
    flags += [*security_flags(config.security), *drain_flags(config.drain_timeout_s)]
    return flags


def router_flags(config: RouterConfig) -> list[str]:
    """The ``tandem router`` flags that parse back to ``config``."""
    flags = [
        *("--model", str(config.model)),
        *("--host", config.host),
        *("--port", str(config.port)),
        *("--metrics-port", str(config.metrics_port)),
        *redis_url_flags(config.redis_url),
        *("--redis-prefix", config.redis_prefix),
        *("--routing", config.routing),
        *("--max-queue-len", str(config.max_queue_len)),
        *("--lease-ms", str(config.lease_ms)),
    ]
    if config.max_prefill_retries != RouterConfig.max_prefill_retries:
        flags += ["--max-prefill-retries", str(config.max_prefill_retries)]
    if config.migrate_on_failure:
        flags += ["--migrate-on-failure"]
    if config.max_model_len is not None:
        flags += ["--max-model-len", str(config.max_model_len)]
    if config.max_prompt_tokens is not None:
        flags += ["--max-prompt-tokens", str(config.max_prompt_tokens)]
    flags += [*security_flags(config.security), *drain_flags(config.drain_timeout_s)]
    return flags


def add_observability_options(parser: argparse.ArgumentParser) -> None:
    """Adds the tracing and logging options; unset tracing options fall back to the ``OTEL_*``
    environment variables (see :class:`engine.tracing.TracingConfig`)."""
    from engine.logging_setup import LOG_FORMATS
    from engine.tracing import EXPORTERS, PROTOCOLS, SAMPLERS

    group = parser.add_argument_group("observability")
    group.add_argument(
        "--otel-exporter-otlp-endpoint",
        metavar="URL",
        help="OTLP collector, e.g. http://127.0.0.1:4317; turns tracing on "
        "(default: $OTEL_EXPORTER_OTLP_ENDPOINT, else tracing off)",
    )
    group.add_argument(
        "--otel-exporter-otlp-protocol",
        choices=PROTOCOLS,
        help="OTLP transport (default: $OTEL_EXPORTER_OTLP_PROTOCOL, else grpc)",
    )
    group.add_argument(
        "--otel-traces-exporter",
        choices=EXPORTERS,
        help="where spans go (default: $OTEL_TRACES_EXPORTER, else otlp with an endpoint, none without)",
    )
    group.add_argument(
        "--otel-service-name",
        metavar="NAME",
        help="service.name of every span (default: $OTEL_SERVICE_NAME, else tandem-<role>)",
    )
    group.add_argument(
        "--otel-traces-sampler",
        choices=SAMPLERS,
        help="sampler; the ratio comes from $OTEL_TRACES_SAMPLER_ARG "
        "(default: $OTEL_TRACES_SAMPLER, else parentbased_always_on)",
    )
    group.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="log line format (default: %(default)s)"
    )
    group.add_argument(
        "--log-prompts",
        action="store_true",
        help="write prompts in the per-request log lines (default: never)",
    )


def observability_flags(args: argparse.Namespace) -> list[str]:
    """The options of :func:`add_observability_options` that ``args`` sets (none at their
    defaults), as flags for a child process."""
    flags = [] if args.log_format == "text" else ["--log-format", args.log_format]
    for option in (
        "otel_exporter_otlp_endpoint",
        "otel_exporter_otlp_protocol",
        "otel_traces_exporter",
        "otel_service_name",
        "otel_traces_sampler",
    ):
        value = getattr(args, option)
        if value is not None:
            flags += ["--" + option.replace("_", "-"), value]
    if args.log_prompts:
        flags.append("--log-prompts")
    return flags


def setup_observability(args: argparse.Namespace, role: str, instance_id: str) -> None:
    """Configure this process's logging and tracing from the options of
    :func:`add_observability_options` (call before any server or channel exists)."""
    from engine.logging_setup import setup_logging
    from engine.tracing import TracingConfig, setup_tracing

    setup_logging(role, log_format=args.log_format, log_prompts=args.log_prompts)
    config = TracingConfig.resolve(
        exporter=args.otel_traces_exporter,
        endpoint=args.otel_exporter_otlp_endpoint,
        protocol=args.otel_exporter_otlp_protocol,
        service_name=args.otel_service_name,
        sampler=args.otel_traces_sampler,
    )
    setup_tracing(config, role=role, instance_id=instance_id)
