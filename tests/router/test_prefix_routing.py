"""The ``prefix`` routing policy: cached prefix against load, bursts, reasons, Redis down."""

from __future__ import annotations

import asyncio
import dataclasses

import redis

from engine.hashing import hash_prompt_blocks
from router.prefix_index import PrefixIndex, blk_key, prefill_routing_request
from router.routing import RoutingRequest, WorkerView, get_policy, rendezvous_rank
from tandem.v1 import kv_pb2, worker_pb2

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE


def view(worker_id: str, role: int = PREFILL, *, waiting: int = 0, inflight_tokens: int = 0) -> WorkerView:
    info = worker_pb2.WorkerInfo(
        worker_id=worker_id,
        epoch=1,
        role=role,  # type: ignore[arg-type]
        num_tokens_waiting=waiting,
        num_kv_blocks_free=100,
        layout=kv_pb2.LayoutDescriptor(block_size=16, model_id="m"),
    )
    return WorkerView(worker_id, 1, role, "", info, 1 if inflight_tokens else 0, inflight_tokens)


def request(cached: dict[str, int] | None, num_tokens: int = 320) -> RoutingRequest:
    hashes = tuple(hash_prompt_blocks(list(range(num_tokens)), 16, model_id="m"))
    return RoutingRequest("r", num_tokens, hashes, cached)


def test_cached_prefix_wins_until_the_load_outweighs_it() -> None:
    policy = get_policy("prefix")
    req = request({"p0": 0, "p1": 16})  # p1 holds 256 of 320 tokens
    assert policy.pick([view("p0"), view("p1")], req).worker_id == "p1"
    assert policy.reason(view("p1"), req) == "prefix-hit"
    # p1: 64 uncached + 200 in flight = 264 < 320 + 0 on p0
    assert policy.pick([view("p0"), view("p1", inflight_tokens=200)], req).worker_id == "p1"
    # p1: 64 + 300 = 364 > 320
    assert policy.pick([view("p0"), view("p1", inflight_tokens=300)], req).worker_id == "p0"
    assert policy.reason(view("p0"), req) == "no-prefix-hit"


def test_ties_follow_the_first_block_and_a_burst_spreads() -> None:
    policy = get_policy("prefix")
    views = [view("p0"), view("p1"), view("p2")]
    req = request({"p0": 0, "p1": 0, "p2": 0})
    expected = min(views, key=lambda v: rendezvous_rank(v, req)).worker_id
    assert policy.pick(views, req).worker_id == expected
    assert policy.pick(list(reversed(views)), req).worker_id == expected
    picked = []
    for _ in range(3):  # the router counts each pick at once, as in flight
        chosen = policy.pick(views, req)
        picked.append(chosen.worker_id)
        views = [
            dataclasses.replace(v, inflight_tokens=v.inflight_tokens + 320) if v is chosen else v
            for v in views
        ]
    assert sorted(picked) == ["p0", "p1", "p2"]


def test_without_the_index_prefix_routes_by_load_and_decode_by_free_blocks() -> None:
    policy = get_policy("prefix")
    req = request(None)
    assert (
        policy.pick([view("p0", inflight_tokens=50), view("p1", inflight_tokens=10)], req).worker_id == "p1"
    )
    # The heartbeat's waiting tokens lag; only the router's own in-flight prefills count.
    hit = request({"p0": 16, "p1": 0})
    assert policy.pick([view("p0", waiting=300), view("p1")], hit).worker_id == "p0"
    assert policy.reason(view("p1"), req) == "index-unavailable"
    assert policy.pick([view("d0", DECODE), view("d1", DECODE)], req).worker_id == "d0"
    assert policy.reason(view("d0", DECODE), req) == "load"
    assert get_policy("round-robin").reason(view("p0"), req) == "cycle"


def test_prefill_routing_request_reads_the_index(redis_server, redis_url: str) -> None:
    prompt = list(range(40))
    hashes = hash_prompt_blocks(prompt, 16, model_id="m", cache_salt="t1")
    client = redis.Redis.from_url(redis_url)
    client.hset(blk_key("tq", hashes[0]), "p1", 1)
    client.hset(blk_key("tq", hashes[1]), "p1", 1)
    client.hset(blk_key("tq", hashes[0]), "p0", 1)
    client.close()

    async def main() -> tuple[RoutingRequest, RoutingRequest, RoutingRequest]:
        index = PrefixIndex(redis_url, "tq")
        views = [view("p0"), view("p1")]
        hit = await prefill_routing_request(index, "r", prompt, "t1", views)
        other_salt = await prefill_routing_request(index, "r", prompt, "", views)
        redis_server.stop()
        try:
            down = await prefill_routing_request(index, "r", prompt, "t1", views)
        finally:
            redis_server.start()
        await index.close()
        return hit, other_salt, down

    hit, other_salt, down = asyncio.run(main())
    assert hit.block_hashes == tuple(hashes)
    assert hit.cached_blocks == {"p0": 1, "p1": 2}
    assert other_salt.cached_blocks == {"p0": 0, "p1": 0}
    assert (down.block_hashes, down.cached_blocks) == (tuple(hashes), None)
    assert get_policy("prefix").pick([view("p0"), view("p1")], hit).worker_id == "p1"
