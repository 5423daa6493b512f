"""What a prefill and a decode worker process share: the engine on its
thread, metrics, Redis registration and the gRPC server.

Start-up of a worker (``run_worker``):
  1. load the model and allocate the KV pool (``ModelRunner``), build the
     scheduler and engine core, start the engine thread (``EngineLoop``);
  2. serve Prometheus metrics and start the gRPC server (NOT_SERVING);
  3. let the role add its own parts (the decode worker's KV receiver);
  4. register in Redis with a fresh epoch, heartbeat the load, start publishing
     KV events (prefix caching on), report SERVING.
SIGTERM: deregister, NOT_SERVING, refuse new requests, finish admitted ones
(``engine.drain``), stop the engine, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field

import grpc

from engine.block_pool import BlockPool
from engine.config import ModelConfig, resolve_dtype, resolve_max_model_len
from engine.drain import DrainPlan, once
from engine.engine_core import EngineCore
from engine.engine_loop import EngineLoop, LoadSnapshot
from engine.kv_cache_manager import KVCacheManager
from engine.kv_events import KvEventPublisher, KvEventRecorder
from engine.metrics import ProcessMetrics
from engine.model_runner import ModelRunner, resolve_device
from engine.scheduler import Scheduler, SchedulerConfig
from engine.security import server_credentials, server_interceptors
from engine.serving import GrpcProcess
from engine.worker_config import WorkerConfig
from engine.worker_registry import WorkerRegistration
from kvtransfer.layout import KvLayout
from tandem.v1 import worker_pb2

logger = logging.getLogger(__name__)

#: Seconds a draining worker keeps admitting after leaving the registry, while routers notice.
DRAIN_ANNOUNCE_S = 1.0

ROLES = {"prefill": worker_pb2.WORKER_ROLE_PREFILL, "decode": worker_pb2.WORKER_ROLE_DECODE}


def load_snapshot(core: EngineCore) -> LoadSnapshot:
    """Current load of ``core`` (runs on the engine thread)."""
    sched = core.scheduler
    manager = sched.kv_cache_manager
    return LoadSnapshot(
        num_kv_blocks_total=manager.num_total_blocks,
        num_kv_blocks_used=manager.num_used_blocks,
        num_requests_running=sched.num_running,
        num_requests_waiting=sched.num_waiting,
        num_tokens_waiting=sched.num_tokens_waiting,
    )


@dataclass
class WorkerRuntime:
    """The engine side of one worker.

    Attributes:
        config: the worker's configuration.
        model_config: the checkpoint's configuration.
        runner: model, KV cache (``runner.kv_cache``) and sampler.
        loop: the engine core on its own thread.
        layout: the KV cache layout (checked at every transfer).
        max_model_len: longest prompt plus completion (tokens).
        metrics: the process's Prometheus metrics.
        epoch: incarnation number from the registry (0 until registered).
        kv_events: the prefix cache's store/evict events (``None`` without prefix caching).
    """

    config: WorkerConfig
    model_config: ModelConfig
    runner: ModelRunner
    loop: EngineLoop[EngineCore]
    layout: KvLayout
    max_model_len: int
    metrics: ProcessMetrics
    epoch: int = 0
    background: set[asyncio.Task[None]] = field(default_factory=set)
    kv_events: KvEventRecorder | None = None

    @property
    def worker_id(self) -> str:
        return self.config.resolved_worker_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.model_config.eos_token_ids)

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` as a background task that survives the caller's cancellation."""

        async def wrapper() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(wrapper())
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def build_runtime(config: WorkerConfig) -> WorkerRuntime:
    """Load the model and build the engine (the event loop must be running).

    Raises:
        ValueError: bad model directory, dtype or KV budget.
    """
    model_config = ModelConfig.from_pretrained(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, model_config, device)
    max_model_len = resolve_max_model_len(model_config, config.max_model_len)
    runner = ModelRunner(
        model_config,
        device=device,
        dtype=dtype,
        block_size=config.block_size,
        num_kv_blocks=config.num_kv_blocks,
        kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        max_model_len=max_model_len,
        seed=config.seed,
        load_format=config.load_format,
        attention_backend=config.kernels,
        fused_ops=config.kernels,
        enforce_eager=config.enforce_eager,
    )
    metrics = ProcessMetrics(config.role)
    # Decode workers' blocks are written by transfer and never looked up: no prefix cache there.
    caching = config.enable_prefix_caching and (config.role == "prefill" or config.colocated)
    kv_events = KvEventRecorder(evictions=metrics.prefix_cache_evictions) if caching else None
    pool = BlockPool(runner.num_kv_blocks, config.block_size, event_sink=kv_events)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len,
            max_queue_len=config.max_queue_len,
        ),
        KVCacheManager(pool, enable_prefix_caching=caching, model_id=model_config.model_id),
    )
    core = EngineCore(scheduler, runner, async_scheduling=config.async_scheduling and config.role == "decode")
    loop: EngineLoop[EngineCore] = EngineLoop(core, load_snapshot)
    loop.start()
    layout = KvLayout.for_cache(runner.kv_cache, model_config.model_id)
    metrics.kv_blocks_total.set(runner.num_kv_blocks)
    return WorkerRuntime(
        config, model_config, runner, loop, layout, max_model_len, metrics, kv_events=kv_events
    )


def start_kv_event_publisher(runtime: WorkerRuntime) -> KvEventPublisher | None:
    """Publish the prefix cache's KV events to Redis (once the epoch is known); ``None`` without caching."""
    recorder = runtime.kv_events
    if recorder is None:
        return None

    def snapshot(core: EngineCore) -> tuple[int, list[bytes]]:  # engine thread: consistent with seq
        return recorder.seq, core.scheduler.kv_cache_manager.block_pool.cached_hashes()

    publisher = KvEventPublisher(
        runtime.config.redis_url,
        runtime.config.redis_prefix,
        runtime.worker_id,
        runtime.epoch,
        recorder,
        lambda: runtime.loop.call(snapshot),
    )
    publisher.start()
    return publisher


def _export_load(runtime: WorkerRuntime) -> None:
    """Read the gauges from the engine's latest load snapshot at every scrape."""
    runtime.metrics.kv_blocks_used.set_function(lambda: runtime.loop.load.num_kv_blocks_used)
    runtime.metrics.requests_running.set_function(lambda: runtime.loop.load.num_requests_running)
    runtime.metrics.requests_waiting.set_function(lambda: runtime.loop.load.num_requests_waiting)
    runtime.metrics.batch_size.set_function(lambda: runtime.loop.load.num_requests_running)


class WorkerRole:
    """The role-specific parts of a worker; subclasses override what they need."""

    #: Full name of the role's gRPC service (health, reflection).
    service_name: str = ""
    #: Methods of the service that admit a new request (refused while draining).
    admission_methods: tuple[str, ...] = ()

    def add_servicers(self, runtime: WorkerRuntime, server: grpc.aio.Server) -> None:
        """Add the role's servicers to the (not yet started) server."""
        raise NotImplementedError

    async def start(self, runtime: WorkerRuntime) -> tuple[str, str]:
        """Role start-up once the server is bound; returns ``(transport, transfer_address)``."""
        return runtime.config.kv_transport, ""

    def on_registered(self, runtime: WorkerRuntime) -> None:
        """Called once the epoch is known (``runtime.epoch``)."""

    async def stop(self, runtime: WorkerRuntime) -> None:
        """Role shutdown after the server drained."""

    def is_idle(self, runtime: WorkerRuntime) -> bool:
        """Whether the worker holds no admitted request (drain waits for it)."""
        load = runtime.loop.load
        return load.num_requests_running == 0 and load.num_requests_waiting == 0


async def run_worker(config: WorkerConfig, role: WorkerRole) -> None:
    """Run a worker until SIGTERM/SIGINT (see the module docstring)."""
    runtime = build_runtime(config)
    _export_load(runtime)
    metrics_port = runtime.metrics.serve(config.host, config.metrics_port)
    drain = DrainPlan(
        timeout_s=config.drain_timeout_s,
        admission_methods=[f"/{role.service_name}/{m}" for m in role.admission_methods],
        announce_s=DRAIN_ANNOUNCE_S,
        is_idle=lambda: role.is_idle(runtime),
    )
    process = GrpcProcess(
        config.host,
        config.port,
        [role.service_name],
        lambda s: role.add_servicers(runtime, s),
        credentials=server_credentials(config.security.tls),
        interceptors=server_interceptors(config.security, public=False),
        max_message_bytes=config.security.max_message_bytes,
        drain=drain,
    )
    await process.start()
    info = worker_pb2.WorkerInfo(
        worker_id=runtime.worker_id,
        role=worker_pb2.WORKER_ROLE_COLOCATED if config.colocated else ROLES[config.role],
        grpc_address=config.advertised(process.address),  # --advertise-host, else as bound
        metrics_address=config.advertised(f"{config.host}:{metrics_port}"),
        model_id=runtime.model_config.model_id,
        layout=runtime.layout.to_pb(),
    )
    info.transport, info.transfer_address = await role.start(runtime)
    registration = WorkerRegistration(
        config.redis_url,
        config.redis_prefix,
        info,
        ttl_s=config.registration_ttl_s,
        heartbeat_interval_s=config.heartbeat_interval_s,
        load_fn=lambda: runtime.loop.load,
    )
    runtime.epoch = await registration.start()
    drain.before = deregister = once(registration.stop)  # routers stop picking it first
    publisher = start_kv_event_publisher(runtime)
    role.on_registered(runtime)
    await process.set_serving()
    logger.info(
        "%s %s serving on %s (epoch %d)", config.role, runtime.worker_id, process.address, runtime.epoch
    )
    try:
        await process.wait_for_termination()
    finally:
        if publisher is not None:
            await publisher.stop()
        with contextlib.suppress(Exception):
            await deregister()
        await role.stop(runtime)
        runtime.loop.stop()
        logger.info("%s %s stopped", config.role, runtime.worker_id)
