"""WorkerPool against a real redis-server and real grpc.aio health servers on loopback."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from engine.errors import WorkerUnavailable
from engine.worker_registry import WorkerDirectory, WorkerRegistration, epoch_key, worker_key
from router.routing import RoutingRequest, get_policy
from router.worker_pool import WorkerPool
from tandem.v1 import kv_pb2, worker_pb2
from tests.conftest import RedisServer

PREFIX = "t"
PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE
ROOT = Path(__file__).resolve().parents[2]


class FakeWorker:
    """A grpc.aio server with only the health service, plus its registration."""

    def __init__(
        self, server: grpc.aio.Server, health: health_aio.HealthServicer, info: worker_pb2.WorkerInfo
    ):
        self.server = server
        self.health = health
        self.info = info
        self.registration: WorkerRegistration | None = None

    @classmethod
    async def start(cls, worker_id: str, role: worker_pb2.WorkerRole, free_blocks: int = 10) -> FakeWorker:
        server = grpc.aio.server()
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        info = worker_pb2.WorkerInfo(
            worker_id=worker_id,
            role=role,
            grpc_address=f"127.0.0.1:{port}",
            num_kv_blocks_total=free_blocks,
            num_kv_blocks_free=free_blocks,
            layout=kv_pb2.LayoutDescriptor(block_size=16),
        )
        return cls(server, health, info)

    async def register(self, redis_url: str, *, ttl_s: float = 5.0, interval_s: float = 1.0) -> int:
        self.registration = WorkerRegistration(
            redis_url, PREFIX, self.info, ttl_s=ttl_s, heartbeat_interval_s=interval_s
        )
        return await self.registration.start()

    async def close(self) -> None:
        if self.registration is not None:
            await self.registration.stop()
        await self.server.stop(grace=None)


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def ids(views: list) -> list[str]:
    return [v.worker_id for v in views]


def test_pool_sees_new_workers_and_drops_unhealthy_and_expired(redis_url: str) -> None:
    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX)
        pool = WorkerPool(directory, refresh_interval_s=0.05, health_check_timeout_s=0.5, missing_grace_s=0.5)
        p0 = await FakeWorker.start("p0", PREFILL)
        d0 = await FakeWorker.start("d0", DECODE)
        d1 = await FakeWorker.start("d1", DECODE)
        await p0.register(redis_url, ttl_s=1.0, interval_s=0.2)
        await d0.register(redis_url)
        await pool.start()
        assert ids(pool.healthy(PREFILL)) == ["p0"]
        assert ids(pool.healthy(DECODE)) == ["d0"]
        with pytest.raises(WorkerUnavailable, match="d1"):
            pool.channel("d1")

        await d1.register(redis_url)  # a new worker is picked up by the refresh task
        await pool.wait_for_workers(prefill=1, decode=2, timeout_s=3.0)
        assert ids(pool.healthy(DECODE)) == ["d0", "d1"]
        reply = await health_pb2_grpc.HealthStub(pool.channel("d1")).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        await d0.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await pool.refresh()
        assert ids(pool.healthy(DECODE)) == ["d1"]
        await d0.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await pool.refresh()
        assert ids(pool.healthy(DECODE)) == ["d0", "d1"]

        await d1.server.stop(grace=None)  # registered but unreachable
        await pool.refresh()
        assert ids(pool.healthy(DECODE)) == ["d0"]

        assert p0.registration is not None and p0.registration._task is not None
        p0.registration._task.cancel()  # p0 "dies" without deregistering: its key expires

        async def p0_gone() -> bool:
            return ids(pool.healthy(PREFILL)) == []

        await wait_until(p0_gone, timeout_s=3.0)
        with pytest.raises(WorkerUnavailable, match="p0"):
            pool.channel("p0")
        with pytest.raises(WorkerUnavailable, match=r"0/1 prefill"):
            await pool.wait_for_workers(prefill=1, decode=1, timeout_s=0.2)
        await pool.close()
        for worker in (p0, d0, d1):
            await worker.close()
        await directory.close()

    asyncio.run(main())


def test_a_live_worker_missing_from_the_registry_stays_routable_for_one_ttl(redis_url: str) -> None:
    """Redis restarting empty loses every registration: live workers stay routable for the grace
    (one registration TTL) unless their health check fails; then they are dropped."""

    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX)
        pool = WorkerPool(directory, refresh_interval_s=10.0, missing_grace_s=1.0)
        d0 = await FakeWorker.start("d0", DECODE)
        d1 = await FakeWorker.start("d1", DECODE)
        await d0.register(redis_url, interval_s=60.0)
        await d1.register(redis_url, interval_s=60.0)
        await pool.refresh()
        assert ids(pool.healthy(DECODE)) == ["d0", "d1"]
        client = redis.Redis.from_url(redis_url)
        client.flushdb()  # Redis came back empty; the heartbeats have not re-registered yet
        await pool.refresh()
        assert ids(pool.healthy(DECODE)) == ["d0", "d1"]
        await d1.server.stop(grace=None)  # really gone: its health check fails, dropped at once
        await pool.refresh()
        assert ids(pool.healthy(DECODE)) == ["d0"]
        with pytest.raises(WorkerUnavailable, match="d1"):
            pool.channel("d1")
        await asyncio.sleep(0.6)
        await pool.refresh()
        assert ids(pool.healthy(DECODE)) == ["d0"]  # still inside its grace
        await asyncio.sleep(0.5)
        await pool.refresh()
        assert ids(pool.healthy(DECODE)) == []  # healthy, but unregistered for a whole TTL
        assert d0.registration is not None
        await d0.registration.stop()
        await d0.register(redis_url)  # re-registers (epoch 1 again: the counter was flushed too)
        await pool.refresh()
        assert ids(pool.healthy(DECODE)) == ["d0"]
        client.close()
        await pool.close()
        for worker in (d0, d1):
            await worker.close()
        await directory.close()

    asyncio.run(main())


def test_pool_replaces_channel_when_epoch_changes(redis_url: str) -> None:
    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX)
        pool = WorkerPool(directory, refresh_interval_s=10.0)
        d0 = await FakeWorker.start("d0", DECODE)
        assert await d0.register(redis_url) == 1
        await pool.refresh()
        first = pool.channel("d0")
        pool.acquire("d0", 32)
        assert d0.registration is not None
        await d0.registration.stop()
        assert await d0.register(redis_url) == 2
        await pool.refresh()
        (view,) = pool.healthy(DECODE)
        assert (view.epoch, view.inflight, view.inflight_tokens) == (2, 1, 32)  # counts carry over
        assert pool.channel("d0") is not first
        assert first.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        pool.release("d0", 32)
        (view,) = pool.healthy(DECODE)
        assert (view.inflight, view.inflight_tokens) == (0, 0)
        await pool.close()
        await d0.close()
        await directory.close()

    asyncio.run(main())


def test_burst_spreads_over_two_decode_workers(redis_url: str) -> None:
    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX)
        pool = WorkerPool(directory, refresh_interval_s=10.0)
        workers = [await FakeWorker.start(f"d{i}", DECODE, free_blocks=10) for i in range(2)]
        for worker in workers:
            await worker.register(redis_url)
        await pool.wait_for_workers(prefill=0, decode=2, timeout_s=3.0)
        policy = get_policy("least-loaded")
        picks = []
        for i in range(4):
            chosen = policy.pick(pool.healthy(DECODE), RoutingRequest(f"r{i}", num_prompt_tokens=20))
            pool.acquire(chosen.worker_id, 20)
            picks.append(chosen.worker_id)
        assert picks == ["d0", "d1", "d0", "d1"]
        assert [(v.inflight, v.inflight_tokens) for v in pool.healthy(DECODE)] == [(2, 40), (2, 40)]
        with pool.in_flight("d1", 20):
            assert policy.pick(pool.healthy(DECODE), RoutingRequest("r4", 20)).worker_id == "d0"
        for worker_id in picks:
            pool.release(worker_id, 20)
        assert [(v.inflight, v.inflight_tokens) for v in pool.healthy(DECODE)] == [(0, 0), (0, 0)]
        await pool.close()
        for worker in workers:
            await worker.close()
        await directory.close()

    asyncio.run(main())


def test_redis_outage_keeps_workers_and_reregisters(
    redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX, timeout_s=0.5)
        pool = WorkerPool(directory, refresh_interval_s=0.05)
        p0 = await FakeWorker.start("p0", PREFILL)
        assert await p0.register(redis_url, ttl_s=2.0, interval_s=0.1) == 1
        await pool.start()
        assert ids(pool.healthy(PREFILL)) == ["p0"]

        redis_server.stop()
        await asyncio.sleep(0.3)  # several failed refreshes and heartbeats
        await pool.refresh()
        assert ids(pool.healthy(PREFILL)) == ["p0"]
        assert p0.registration is not None and p0.registration._task is not None
        assert not p0.registration._task.done()
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("Redis unreachable" in m for m in messages) == 1  # warned once, not per heartbeat
        assert sum("registry unreachable, keeping 1 known workers" in m for m in messages) == 1

        redis_server.start()  # empty: Redis lost every key
        client = redis.Redis.from_url(redis_url)

        async def reregistered() -> bool:
            logged = any("Redis is back, re-registered epoch 1" in r.getMessage() for r in caplog.records)
            return logged and client.exists(worker_key(PREFIX, "p0")) == 1

        await wait_until(reregistered, timeout_s=3.0)
        assert worker_pb2.WorkerInfo.FromString(cast(bytes, client.get(worker_key(PREFIX, "p0")))).epoch == 1
        assert client.get(epoch_key(PREFIX, "p0")) == b"1"  # restored, so the next start gets epoch 2
        client.close()
        await pool.refresh()
        assert [(v.worker_id, v.epoch) for v in pool.healthy(PREFILL)] == [("p0", 1)]
        await pool.close()
        await p0.close()
        await directory.close()

    try:
        asyncio.run(main())
    finally:
        if not redis_server.running:
            redis_server.start()


def test_router_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import router.worker_pool, router.routing, engine.worker_registry; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_routable_needs_a_prefill_and_a_decode_worker_or_a_colocated_one(redis_url: str) -> None:
    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX + "-routable")
        pool = WorkerPool(directory, refresh_interval_s=0.05, health_check_timeout_s=0.5, missing_grace_s=0.0)
        workers = [
            await FakeWorker.start("p0", PREFILL),
            await FakeWorker.start("d0", DECODE),
            await FakeWorker.start("c0", worker_pb2.WORKER_ROLE_COLOCATED),
        ]
        p0, d0, c0 = workers
        for w in workers:
            w.info.worker_id += "-routable"
        try:
            await pool.start()
            assert not pool.can_route()
            directory_prefix = PREFIX + "-routable"
            p0.registration = WorkerRegistration(
                redis_url, directory_prefix, p0.info, ttl_s=5.0, heartbeat_interval_s=1.0
            )
            await p0.registration.start()
            await pool.refresh()
            assert not pool.can_route()  # a prefill worker alone cannot serve
            d0.registration = WorkerRegistration(
                redis_url, directory_prefix, d0.info, ttl_s=5.0, heartbeat_interval_s=1.0
            )
            await d0.registration.start()
            await asyncio.wait_for(pool.wait_until_routable(), timeout=3.0)
            await d0.registration.stop()
            await p0.registration.stop()
            await pool.refresh()
            assert not pool.can_route()
            c0.registration = WorkerRegistration(
                redis_url, directory_prefix, c0.info, ttl_s=5.0, heartbeat_interval_s=1.0
            )
            await c0.registration.start()
            await asyncio.wait_for(pool.wait_until_routable(), timeout=3.0)
        finally:
            await pool.close()
            for w in workers:
                await w.close()

    asyncio.run(main())
