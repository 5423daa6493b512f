"""WorkerRegistration / WorkerDirectory against a real redis-server on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import redis

from engine.engine_loop import LoadSnapshot
from engine.worker_registry import WorkerDirectory, WorkerRegistration, epoch_key, worker_key, workers_key
from tandem.v1 import worker_pb2

PREFIX = "t"
PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE


def make_info(
    worker_id: str, role: worker_pb2.WorkerRole = PREFILL, address: str = "127.0.0.1:1"
) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(worker_id=worker_id, role=role, grpc_address=address, model_id="tiny")


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_registration_writes_parsable_info_with_ttl(redis_url: str) -> None:
    async def main() -> None:
        reg = WorkerRegistration(redis_url, PREFIX, make_info("p0"), ttl_s=5.0, heartbeat_interval_s=1.0)
        before_ms = int(time.time() * 1000)
        assert await reg.start() == 1
        assert reg.epoch == 1
        client = sync_client(redis_url)
        raw = client.get(worker_key(PREFIX, "p0"))
        assert raw is not None
        info = worker_pb2.WorkerInfo.FromString(cast(bytes, raw))
        assert (info.worker_id, info.epoch, info.role, info.grpc_address, info.model_id) == (
            "p0",
            1,
            PREFILL,
            "127.0.0.1:1",
            "tiny",
        )
        assert before_ms <= info.heartbeat_unix_ms <= int(time.time() * 1000)
        assert 4000 < client.pttl(worker_key(PREFIX, "p0")) <= 5000
        assert client.smembers(workers_key(PREFIX)) == {b"p0"}
        assert client.get(epoch_key(PREFIX, "p0")) == b"1"
        client.close()
        await reg.stop()

    asyncio.run(main())


def test_epoch_increments_and_stop_deregisters(redis_url: str) -> None:
    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX)
        first = WorkerRegistration(
            redis_url, PREFIX, make_info("d0", DECODE), ttl_s=5.0, heartbeat_interval_s=1.0
        )
        assert await first.start() == 1
        await first.stop()
        assert await directory.list_workers() == []
        client = sync_client(redis_url)
        assert client.exists(worker_key(PREFIX, "d0")) == 0
        assert client.smembers(workers_key(PREFIX)) == set()
        client.close()
        second = WorkerRegistration(
            redis_url, PREFIX, make_info("d0", DECODE), ttl_s=5.0, heartbeat_interval_s=1.0
        )
        assert await second.start() == 2
        assert [(w.worker_id, w.epoch) for w in await directory.list_workers()] == [("d0", 2)]
        await second.stop()
        await directory.close()

    asyncio.run(main())


def test_older_incarnation_is_fenced(redis_url: str) -> None:
    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX)
        old = WorkerRegistration(redis_url, PREFIX, make_info("p0"), ttl_s=5.0, heartbeat_interval_s=10.0)
        new = WorkerRegistration(redis_url, PREFIX, make_info("p0"), ttl_s=5.0, heartbeat_interval_s=10.0)
        assert (await old.start(), await new.start()) == (1, 2)
        assert await old.heartbeat() is False
        assert old.superseded
        await old.stop()  # must not delete the newer registration
        assert [(w.worker_id, w.epoch) for w in await directory.list_workers()] == [("p0", 2)]
        await new.stop()
        await directory.close()

    asyncio.run(main())


def test_expired_registration_is_pruned(redis_url: str) -> None:
    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX)
        dead = WorkerRegistration(redis_url, PREFIX, make_info("p0"), ttl_s=1.0, heartbeat_interval_s=0.2)
        live = WorkerRegistration(redis_url, PREFIX, make_info("p1"), ttl_s=1.0, heartbeat_interval_s=0.2)
        await dead.start()
        await live.start()
        assert [w.worker_id for w in await directory.list_workers()] == ["p0", "p1"]
        assert dead._task is not None
        dead._task.cancel()  # the process "dies": no more heartbeats, no deregistration
        await asyncio.sleep(1.3)
        client = sync_client(redis_url)
        assert client.smembers(workers_key(PREFIX)) == {b"p0", b"p1"}
        assert [w.worker_id for w in await directory.list_workers()] == ["p1"]
        assert client.smembers(workers_key(PREFIX)) == {b"p1"}
        client.close()
        await live.stop()
        await dead.stop()
        await directory.close()

    asyncio.run(main())


def test_heartbeat_updates_load_fields(redis_url: str) -> None:
    load = LoadSnapshot(num_kv_blocks_total=100, num_kv_blocks_used=0)

    async def main() -> None:
        nonlocal load
        directory = WorkerDirectory(redis_url, PREFIX)
        reg = WorkerRegistration(
            redis_url,
            PREFIX,
            make_info("d0", DECODE),
            ttl_s=2.0,
            heartbeat_interval_s=0.05,
            load_fn=lambda: load,
        )
        await reg.start()
        (info,) = await directory.list_workers()
        assert (info.num_kv_blocks_total, info.num_kv_blocks_free, info.num_requests_running) == (100, 100, 0)
        first_beat_ms = info.heartbeat_unix_ms
        load = LoadSnapshot(
            num_kv_blocks_total=100,
            num_kv_blocks_used=37,
            num_requests_running=3,
            num_requests_waiting=2,
            num_tokens_waiting=77,
        )

        async def updated() -> bool:
            (info,) = await directory.list_workers()
            return info.num_kv_blocks_free == 63

        await wait_until(updated)
        (info,) = await directory.list_workers()
        assert (
            info.num_kv_blocks_total,
            info.num_kv_blocks_free,
            info.num_requests_running,
            info.num_requests_waiting,
            info.num_tokens_waiting,
            info.epoch,
        ) == (100, 63, 3, 2, 77, 1)
        assert info.heartbeat_unix_ms > first_beat_ms
        await reg.stop()
        await directory.close()

    asyncio.run(main())


def test_list_workers_filters_role_and_skips_garbage(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        directory = WorkerDirectory(redis_url, PREFIX)
        regs = [
            WorkerRegistration(redis_url, PREFIX, make_info(wid, role), ttl_s=5.0, heartbeat_interval_s=1.0)
            for wid, role in [("d0", DECODE), ("p0", PREFILL), ("p1", PREFILL)]
        ]
        for reg in regs:
            await reg.start()
        client = sync_client(redis_url)
        client.set(worker_key(PREFIX, "bad"), b"garbage", px=5000)
        client.sadd(workers_key(PREFIX), "bad")
        client.close()
        with caplog.at_level(logging.WARNING, logger="engine.worker_registry"):
            assert [w.worker_id for w in await directory.list_workers()] == ["d0", "p0", "p1"]
        assert "unparsable registration of 'bad'" in caplog.text
        assert [w.worker_id for w in await directory.list_workers(PREFILL)] == ["p0", "p1"]
        assert [w.worker_id for w in await directory.list_workers(DECODE)] == ["d0"]
        for reg in regs:
            await reg.stop()
        await directory.close()

    asyncio.run(main())


def test_registration_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="worker_id"):
        WorkerRegistration(
            "redis://127.0.0.1:1/0", PREFIX, worker_pb2.WorkerInfo(), ttl_s=1, heartbeat_interval_s=1
        )
    with pytest.raises(ValueError, match="ttl_s"):
        WorkerRegistration("redis://127.0.0.1:1/0", PREFIX, make_info("p0"), ttl_s=0, heartbeat_interval_s=1)
