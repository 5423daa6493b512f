"""Routing policies pick exact workers."""

from __future__ import annotations

import dataclasses

import pytest

from engine.errors import WorkerUnavailable
from router.routing import RoutingRequest, WorkerView, get_policy, policy_names
from tandem.v1 import kv_pb2, worker_pb2

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE
REQ = RoutingRequest(request_id="r0", num_prompt_tokens=20)


def view(
    worker_id: str, role: worker_pb2.WorkerRole, *, inflight: int = 0, inflight_tokens: int = 0, **load: int
) -> WorkerView:
    info = worker_pb2.WorkerInfo(
        worker_id=worker_id,
        epoch=1,
        role=role,
        grpc_address=f"127.0.0.1:{len(worker_id)}",
        layout=kv_pb2.LayoutDescriptor(block_size=16),
        **load,  # type: ignore[arg-type]
    )
    return WorkerView(worker_id, 1, role, info.grpc_address, info, inflight, inflight_tokens)


def burst(policy_name: str, views: list[WorkerView], n: int, tokens: int) -> list[str]:
    """Pick ``n`` times, counting each pick as in flight at once (as the router does)."""
    policy = get_policy(policy_name)
    picked = []
    for i in range(n):
        chosen = policy.pick(views, RoutingRequest(f"r{i}", tokens))
        picked.append(chosen.worker_id)
        views = [
            dataclasses.replace(v, inflight=v.inflight + 1, inflight_tokens=v.inflight_tokens + tokens)
            if v.worker_id == chosen.worker_id
            else v
            for v in views
        ]
    return picked


def test_registry_names_and_unknown_policy() -> None:
    assert policy_names() == ["least-loaded", "prefix", "round-robin"]
    with pytest.raises(
        ValueError, match=r"unknown routing policy 'fastest'.*least-loaded.*prefix.*round-robin"
    ):
        get_policy("fastest")


@pytest.mark.parametrize("name", ["least-loaded", "round-robin"])
def test_empty_candidates_raise_worker_unavailable(name: str) -> None:
    with pytest.raises(WorkerUnavailable, match="r0"):
        get_policy(name).pick([], REQ)


def test_mixed_roles_are_rejected() -> None:
    with pytest.raises(ValueError, match="mix roles"):
        get_policy("least-loaded").pick([view("p0", PREFILL), view("d0", DECODE)], REQ)


def test_least_loaded_prefill_counts_waiting_and_inflight_tokens() -> None:
    policy = get_policy("least-loaded")
    a = view("a", PREFILL, num_tokens_waiting=100)
    b = view("b", PREFILL, num_tokens_waiting=30, inflight=1, inflight_tokens=20)  # 50 tokens, 1 in flight
    c = view("c", PREFILL, num_tokens_waiting=50)  # 50 tokens, 0 in flight
    assert policy.pick([a, b, c], REQ).worker_id == "c"
    assert policy.pick([a, b], REQ).worker_id == "b"
    assert policy.pick([view("y", PREFILL), view("x", PREFILL)], REQ).worker_id == "x"


def test_least_loaded_decode_counts_free_blocks_minus_reservations() -> None:
    policy = get_policy("least-loaded")
    a = view("a", DECODE, num_kv_blocks_free=100)
    # 64 tokens in flight = 4 blocks of 16: 116 free, 1 running + 1 in flight.
    b = view("b", DECODE, num_kv_blocks_free=120, num_requests_running=1, inflight=1, inflight_tokens=64)
    c = view("c", DECODE, num_kv_blocks_free=116, num_requests_running=3)
    assert policy.pick([a, b, c], REQ).worker_id == "b"
    # 65 tokens round up to 5 blocks: 115 free, so c wins.
    b65 = dataclasses.replace(b, inflight_tokens=65)
    assert policy.pick([a, b65, c], REQ).worker_id == "c"
    assert policy.pick([view("y", DECODE), view("x", DECODE)], REQ).worker_id == "x"


def test_least_loaded_spreads_a_burst() -> None:
    decode = [view("d0", DECODE, num_kv_blocks_free=10), view("d1", DECODE, num_kv_blocks_free=10)]
    assert burst("least-loaded", decode, 4, tokens=20) == ["d0", "d1", "d0", "d1"]
    prefill = [view("p0", PREFILL), view("p1", PREFILL)]
    assert burst("least-loaded", prefill, 4, tokens=20) == ["p0", "p1", "p0", "p1"]


def test_least_loaded_rejects_unscored_role() -> None:
    with pytest.raises(ValueError, match="role 0"):
        get_policy("least-loaded").pick([view("u", worker_pb2.WORKER_ROLE_UNSPECIFIED)], REQ)


def test_round_robin_cycles_per_role() -> None:
    policy = get_policy("round-robin")
    prefill = [view("p1", PREFILL), view("p0", PREFILL), view("p2", PREFILL)]
    decode = [view("d0", DECODE), view("d1", DECODE)]
    picks = []
    for _ in range(4):
        picks.append(policy.pick(prefill, REQ).worker_id)
        picks.append(policy.pick(decode, REQ).worker_id)
    assert picks == ["p0", "d0", "p1", "d1", "p2", "d0", "p0", "d1"]
    # Load is ignored: the busy worker still gets its turn.
    busy = [view("a", DECODE, num_kv_blocks_free=0), view("b", DECODE, num_kv_blocks_free=99)]
    assert burst("round-robin", busy, 3, tokens=20) == ["a", "b", "a"]
