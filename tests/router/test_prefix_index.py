"""The ownership index in a real Redis: applying KV events, gaps and resync, fencing, expiry, lookups."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from engine.kv_events import KvEventPublisher, KvEventRecorder, events_key, snapshot_request_key, state_key
from engine.worker_registry import epoch_key, worker_key
from router.prefix_index import PrefixIndex, blk_key, owned_key

P = "tx"
H = [bytes([i]) * 32 for i in range(8)]


def register(client: Any, worker_id: str, epoch: int) -> None:
    """What a worker's registration leaves in Redis (the index only checks existence and the epoch)."""
    client.set(epoch_key(P, worker_id), epoch)
    client.set(worker_key(P, worker_id), b"info", px=60_000)


def owners(client: Any, h: bytes) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(blk_key(P, h)).items()}


def run(redis_url: str, body: Callable[[PrefixIndex], Awaitable[None]]) -> None:
    async def main() -> None:
        index = PrefixIndex(redis_url, P)
        try:
            await body(index)
        finally:
            await index.close()

    asyncio.run(main())


def publisher(redis_url: str, worker_id: str, epoch: int, rec: KvEventRecorder) -> KvEventPublisher:
    async def snapshot() -> tuple[int, list[bytes]]:
        return rec.seq, [H[2], H[3], H[4]]  # what the worker's pool holds

    return KvEventPublisher(redis_url, P, worker_id, epoch, rec, snapshot)


def test_events_are_applied_once_and_lookups_count_leading_blocks(redis_url: str) -> None:
    client: Any = redis.Redis.from_url(redis_url)
    register(client, "w1", 1)
    register(client, "w2", 4)

    async def body(index: PrefixIndex) -> None:
        r1, r2 = KvEventRecorder(), KvEventRecorder()
        p1, p2 = publisher(redis_url, "w1", 1, r1), publisher(redis_url, "w2", 4, r2)
        for h in H[:3]:
            r1.block_stored(h)
        r2.block_stored(H[0])
        r2.block_stored(H[2])  # not a prefix run: H[1] missing
        await p1.flush()
        await p2.flush()
        results = sorted((r.worker_id, r.status, r.num_applied) for r in await index.sync())
        assert results == [("w1", "ok", 3), ("w2", "ok", 2)]
        assert [r.num_applied for r in await index.sync()] == [0, 0]  # nothing applied twice
        assert owners(client, H[0]) == {"w1": "1", "w2": "4"}
        counts = await index.lookup(H[:4], [("w1", 1), ("w2", 4)])
        assert counts == {"w1": 3, "w2": 1}
        assert await index.lookup(H[:4], [("w1", 2)]) == {"w1": 0}  # another epoch does not count
        r1.block_removed(H[1])
        await p1.flush()
        await index.sync()
        assert await index.lookup(H[:4], [("w1", 1), ("w2", 4)]) == {"w1": 1, "w2": 1}
        assert client.hgetall(state_key(P, "w1"))[b"seq"] == b"4"
        assert index.staleness_s == 0.0
        await p1.stop()
        await p2.stop()

    run(redis_url, body)
    client.close()


def test_a_gap_asks_for_a_snapshot_and_resyncs_from_it(redis_url: str) -> None:
    client: Any = redis.Redis.from_url(redis_url)
    register(client, "w1", 1)

    async def body(index: PrefixIndex) -> None:
        rec = KvEventRecorder()
        pub = publisher(redis_url, "w1", 1, rec)
        rec.block_stored(H[0])
        await pub.flush()
        await index.sync()
        rec.block_stored(H[1])
        rec.drain(10)  # seq 2 is lost (e.g. dropped while Redis was down)
        rec.block_stored(H[2])
        await pub.flush()
        (result,) = await index.sync()
        assert (result.status, result.num_applied) == ("gap", 0)
        assert result.oldest_pending_unix_s is not None and index.staleness_s >= 0.0
        assert index.num_gaps == 1
        assert client.exists(snapshot_request_key(P, "w1"))
        assert owners(client, H[0]) == {"w1": "1"}
        await pub.flush()  # the worker answers the request
        assert pub.num_snapshots == 1
        rec.block_stored(H[5])  # seq 4, after the snapshot (seq 3)
        await pub.flush()
        (result,) = await index.sync()
        assert (result.status, result.num_applied, result.oldest_pending_unix_s) == ("ok", 1, None)
        held = sorted(m.decode() for m in client.smembers(owned_key(P, "w1")))
        assert held == sorted(h.hex() for h in (H[2], H[3], H[4], H[5]))
        assert owners(client, H[0]) == {}
        assert not client.exists(snapshot_request_key(P, "w1"))
        assert index.staleness_s == 0.0
        await pub.stop()

    run(redis_url, body)
    client.close()


def test_restart_fences_old_entries_and_expiry_removes_them(redis_url: str) -> None:
    client: Any = redis.Redis.from_url(redis_url)
    register(client, "w1", 1)

    async def body(index: PrefixIndex) -> None:
        old = KvEventRecorder()
        pub = publisher(redis_url, "w1", 1, old)
        old.block_stored(H[0])
        old.block_stored(H[1])
        await pub.flush()
        await index.sync()
        assert await index.lookup(H[:2], [("w1", 1)]) == {"w1": 2}
        register(client, "w1", 2)  # restarted: a new epoch, an empty cache, no event yet
        old.block_stored(H[2])  # a late batch of the old incarnation is ignored
        await pub.flush()
        await pub.stop()
        (result,) = await index.sync()
        assert result.status == "ok"
        assert owners(client, H[0]) == owners(client, H[2]) == {}
        new = KvEventRecorder()
        pub2 = publisher(redis_url, "w1", 2, new)
        new.block_stored(H[3])
        await pub2.flush()
        await pub2.stop()
        await index.sync()
        assert owners(client, H[3]) == {"w1": "2"}
        client.delete(worker_key(P, "w1"))  # the registration expired
        (result,) = await index.sync()
        assert result.status == "gone"
        assert owners(client, H[3]) == {}
        assert not client.exists(owned_key(P, "w1"), state_key(P, "w1"), events_key(P, "w1"))
        assert await index.sync() == []

    run(redis_url, body)
    client.close()


def test_unreachable_redis_fails_fast_and_recovers(redis_server, redis_url: str) -> None:
    async def body(index: PrefixIndex) -> None:
        redis_server.stop()
        try:
            for _ in range(2):  # the second call is refused without touching the network
                try:
                    await index.lookup(H[:1], [("w1", 1)])
                except redis.RedisError:
                    pass
                else:
                    raise AssertionError("lookup succeeded without Redis")
            assert not index.available
        finally:
            redis_server.start()
        await index.sync()
        assert index.available
        assert await index.lookup(H[:1], [("w1", 1)]) == {"w1": 0}

    run(redis_url, body)
