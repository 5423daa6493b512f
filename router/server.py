"""The router process: public gRPC API in front of the prefill and decode pools.

Start-up: read config.json and tokenizer.json (never weights, never torch),
connect to the Redis worker directory, start the worker pool's refresh loop,
serve ``tandem.v1.Generation`` with health and reflection, report SERVING once a request
can be routed (a healthy prefill and decode worker, or a colocated one).
SIGTERM: NOT_SERVING, drain calls in flight, close channels, exit 0.
"""

from __future__ import annotations

import asyncio
import logging

from engine.config import ModelConfig, resolve_max_model_len
from engine.drain import DrainPlan
from engine.metrics import ProcessMetrics
from engine.security import bearer_metadata, open_aio_channel, server_credentials, server_interceptors
from engine.serving import GrpcProcess
from engine.tokenizer import Tokenizer
from engine.worker_registry import WorkerDirectory
from router.config import RouterConfig
from router.orchestrator import Orchestrator
from router.prefix_index import PrefixIndex
from router.routing import get_policy
from router.service import GenerationService, ServedModel
from router.worker_pool import WorkerPool
from tandem.v1 import generation_pb2, generation_pb2_grpc, kv_pb2, worker_pb2

logger = logging.getLogger(__name__)


async def serve(config: RouterConfig) -> None:
    """Run the router until SIGTERM/SIGINT (see the module docstring)."""
    model = ModelConfig.from_pretrained(config.model)
    tokenizer = Tokenizer.from_pretrained(config.model)
    max_model_len = resolve_max_model_len(model, config.max_model_len)
    metrics = ProcessMetrics("router")
    metrics.serve(config.host, config.metrics_port)
    internal = bearer_metadata(config.security.internal_token)
    pool = WorkerPool(
        WorkerDirectory(config.redis_url, config.redis_prefix),
        refresh_interval_s=config.refresh_interval_s,
        channel_factory=lambda address: open_aio_channel(address, config.security, internal),
        missing_grace_s=config.registration_ttl_s,
    )
    await pool.start()
    policy = get_policy(config.routing)
    prefix_index = PrefixIndex(config.redis_url, config.redis_prefix) if policy.uses_prefix_index else None
    if prefix_index is not None:
        prefix_index.start()  # applies KV events to the ownership index in the background
        metrics.prefix_index_staleness.set_function(lambda: prefix_index.staleness_s)
    orchestrator = Orchestrator(
        pool,
        policy,
        eos_token_ids=tuple(model.eos_token_ids),
        max_model_len=max_model_len,
        lease_ms=config.lease_ms,
        prefix_index=prefix_index,
        metrics=metrics,
        migrate_on_failure=config.migrate_on_failure,
        max_prefill_retries=config.max_prefill_retries,
    )
    served = ServedModel(
        name=model.name,
        architecture=model.architecture,
        max_model_len=max_model_len,
        vocab_size=model.vocab_size,
        block_size=16,
        dtype=model.torch_dtype or "float32",
    )

    def worker_layout() -> kv_pb2.LayoutDescriptor | None:
        workers = pool.healthy(worker_pb2.WORKER_ROLE_DECODE)
        return workers[0].info.layout if workers else None

    service = GenerationService(
        orchestrator,
        tokenizer,
        served,
        metrics,
        max_inflight=config.max_queue_len,
        worker_layout=worker_layout,
        max_prompt_tokens=config.max_prompt_tokens,
    )
    name = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
    process = GrpcProcess(
        config.host,
        config.port,
        [name],
        lambda server: generation_pb2_grpc.add_GenerationServicer_to_server(service, server),
        credentials=server_credentials(config.security.tls),
        interceptors=server_interceptors(config.security, public=True),
        max_message_bytes=config.security.max_message_bytes,
        drain=DrainPlan(
            timeout_s=config.drain_timeout_s,
            admission_methods=[f"/{name}/Generate", f"/{name}/GenerateStream"],
        ),
    )
    await process.start()
    ready = asyncio.create_task(_serve_when_routable(pool, process), name="router-readiness")
    try:
        await process.wait_for_termination()
    finally:
        ready.cancel()
        await pool.close()
        if prefix_index is not None:
            await prefix_index.close()


async def _serve_when_routable(pool: WorkerPool, process: GrpcProcess) -> None:
    """Report SERVING once a request can be routed, so that `tandem serve` and a Kubernetes
    readiness probe send no traffic that would fail with "no healthy worker"."""
    if not pool.can_route():
        logger.info("router waiting for a healthy prefill and decode (or colocated) worker")
        await pool.wait_until_routable()
    if not process.stopping:
        await process.set_serving()
        logger.info("router serving on %s", process.address)


def run(config: RouterConfig) -> int:
    """Blocking entry point used by ``tandem router``; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0
