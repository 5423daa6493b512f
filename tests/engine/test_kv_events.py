"""KV event recording and publishing to a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from redis.exceptions import RedisError

from engine.kv_events import (
    STORED,
    KvEventPublisher,
    KvEventRecorder,
    encode_events,
    events_key,
    publishers_key,
    snapshot_key,
    snapshot_request_key,
    state_key,
)

H = [bytes([i]) * 32 for i in range(6)]


def test_recorder_numbers_drains_contiguously_and_drops_oldest() -> None:
    rec = KvEventRecorder(max_buffered=4)
    for h in H[:3]:
        rec.block_stored(h)
    rec.block_removed(H[0])
    batch = rec.drain(2)
    assert [(e.seq, e.op) for e in batch] == [(1, STORED), (2, STORED)]
    rec.put_back(batch)
    rec.block_stored(H[4])  # 5 events buffered: seq 1 is dropped
    assert rec.num_dropped == 1 and rec.seq == 5
    assert [e.seq for e in rec.drain(10)] == [2, 3, 4, 5]
    assert encode_events(batch[:1]) == "S" + "00" * 32


async def _snapshot() -> tuple[int, list[bytes]]:
    return 7, [H[1], H[2]]


def test_publisher_writes_batches_and_answers_snapshot_requests(redis_url: str) -> None:
    client: Any = redis.Redis.from_url(redis_url)
    rec = KvEventRecorder()

    async def scenario() -> int:
        pub = KvEventPublisher(redis_url, "tp", "w1", 3, rec, _snapshot, max_batch=2)
        for h in H[:3]:
            rec.block_stored(h)
        rec.block_removed(H[0])
        assert await pub.flush() == 4
        client.set(snapshot_request_key("tp", "w1"), "1")
        assert await pub.flush() == 0
        await pub.stop()
        return pub.num_snapshots

    assert asyncio.run(scenario()) == 1
    entries = client.xrange(events_key("tp", "w1"))
    fields = [{k.decode(): v.decode() for k, v in e[1].items()} for e in entries]
    assert [(f["epoch"], f["first"]) for f in fields] == [("3", "1"), ("3", "3")]
    assert fields[0]["ev"] == "S" + H[0].hex() + "S" + H[1].hex()
    assert fields[1]["ev"] == "S" + H[2].hex() + "R" + H[0].hex()
    assert client.smembers(publishers_key("tp")) == {b"w1"}
    snap = client.hgetall(snapshot_key("tp", "w1"))
    assert (snap[b"epoch"], snap[b"seq"], snap[b"hashes"]) == (b"3", b"7", (H[1].hex() + H[2].hex()).encode())
    assert not client.exists(snapshot_request_key("tp", "w1"))
    client.close()


def test_events_stay_buffered_while_redis_is_down(redis_server, redis_url: str) -> None:
    rec = KvEventRecorder()

    async def scenario() -> None:
        pub = KvEventPublisher(redis_url, "tp", "w1", 1, rec, _snapshot)
        rec.block_stored(H[0])
        redis_server.stop()
        try:
            with pytest.raises((RedisError, OSError)):
                await pub.flush()
            assert len(rec) == 1
            rec.block_removed(H[0])
        finally:
            redis_server.start()
        assert await pub.flush() == 2
        await pub.stop()

    asyncio.run(scenario())
    client: Any = redis.Redis.from_url(redis_url)
    (entry,) = client.xrange(events_key("tp", "w1"))
    assert entry[1][b"first"] == b"1"
    assert entry[1][b"ev"] == ("S" + H[0].hex() + "R" + H[0].hex()).encode()
    client.close()


def test_a_lost_index_state_gets_an_unasked_snapshot(redis_url: str) -> None:
    client: Any = redis.Redis.from_url(redis_url)
    rec = KvEventRecorder()

    async def scenario() -> list[int]:
        pub = KvEventPublisher(redis_url, "tp", "w1", 1, rec, _snapshot)
        snapshots = []
        await pub.flush()  # no router state yet: nothing to repair
        snapshots.append(pub.num_snapshots)
        client.hset(state_key("tp", "w1"), "epoch", 1)  # a router applied our events
        await pub.flush()
        client.flushall()  # Redis lost everything (restarted empty)
        await pub.flush()
        snapshots.append(pub.num_snapshots)
        client.delete(snapshot_key("tp", "w1"))  # e.g. cleared before a router could apply it
        await pub.flush()  # rate-limited: not again at once
        snapshots.append(pub.num_snapshots)
        client.hset(state_key("tp", "w1"), "epoch", 1)
        await pub.flush()
        snapshots.append(pub.num_snapshots)
        await pub.stop()
        return snapshots

    assert asyncio.run(scenario()) == [0, 1, 1, 1]
    client.close()
