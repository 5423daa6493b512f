"""Prefix caching and KV-aware routing through real processes and a real Redis.

One ``tandem serve`` stack (2 prefill workers, 1 decode worker, ``--routing
prefix``) on the bundled model; a second router process with ``--routing
round-robin`` on the same workers for comparison; an extra prefill worker
started, SIGKILLed and restarted by the test; the session's Redis stopped and
started mid-test.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from engine.hashing import hash_prompt_blocks
from engine.kv_events import state_key
from engine.worker_config import BUNDLED_MODEL_DIR
from router.prefix_index import blk_key, owned_key
from router.routing import RoutingRequest, WorkerView, rendezvous_rank
from tandem.v1 import generation_pb2, generation_pb2_grpc, worker_pb2
from tests.e2e.stack import REPO, Stack
from tests.helpers.net import free_port

pytestmark = pytest.mark.e2e

BLOCK = 16
SYSTEM_LEN = 128  # 8 full blocks shared by a group
VOCAB = 4096
TOKEN = "prefix-e2e-internal-token"  # shared with the processes this test starts itself


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = [
        "--prefill-workers",
        "2",
        "--decode-workers",
        "1",
        "--routing",
        "prefix",
        "--internal-token",
        TOKEN,
    ]
    s = Stack(BUNDLED_MODEL_DIR, tmp_path_factory.mktemp("prefix"), redis_server.url, args).start()
    yield s
    if not redis_server.running:
        redis_server.start()
    assert s.stop() == 0


def prefix_of(stack: Stack) -> str:
    return f"t{stack.port}"


def generate(stub: generation_pb2_grpc.GenerationStub, prompt: list[int]) -> generation_pb2.GenerateResponse:
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=generation_pb2.SamplingParams(max_tokens=4, temperature=0.0)
    )
    return stub.Generate(request, timeout=60)


def workload(seed: int, groups: int, per_group: int) -> list[tuple[int, list[int]]]:
    """``groups`` system prompts, ``per_group`` requests each (the last repeats the first), shuffled."""
    rng = random.Random(seed)
    requests = []
    for g in range(groups):
        system = [rng.randrange(2, VOCAB) for _ in range(SYSTEM_LEN)]
        prompts = [system + [rng.randrange(2, VOCAB) for _ in range(24)] for _ in range(per_group - 1)]
        requests += [(g, p) for p in [*prompts, prompts[0]]]
    rng.shuffle(requests)
    return requests


def cached_share(stub: generation_pb2_grpc.GenerationStub, requests: list[tuple[int, list[int]]]) -> float:
    """Share of the shareable prompt tokens (the system prompt of every request but a group's first)
    served from cache; also checks that a repeated prompt gets the same greedy tokens."""
    seen: dict[int, list[int]] = {}
    outputs: dict[tuple[int, ...], list[int]] = {}
    shareable = cached = 0
    for group, prompt in requests:
        reply = generate(stub, prompt)
        tokens = list(reply.token_ids)
        assert outputs.setdefault(tuple(prompt), tokens) == tokens  # with and without a cache hit
        if group in seen:
            shareable += SYSTEM_LEN
            cached += min(reply.usage.cached_prompt_tokens, SYSTEM_LEN)
        seen[group] = prompt
    return cached / shareable


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def spawn(kind: str, stack: Stack, redis_url: str, *flags: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "cli.main", kind, "--model", str(BUNDLED_MODEL_DIR),
        "--redis-url", redis_url, "--redis-prefix", prefix_of(stack), "--metrics-port", "0", "--internal-token", TOKEN, *flags,
    ]  # fmt: skip
    with log.open("wb") as out:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def labelled_metric(address: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_prefix_routing_serves_shared_prefixes_from_cache(stack: Stack, redis_server, tmp_path: Path) -> None:
    prefix_share = cached_share(stack.stub, workload(seed=1, groups=4, per_group=5))
    router = stack.processes("router")[0]
    assert (
        labelled_metric(router["metrics_address"], "tandem_routing_decisions_total", reason="prefix-hit") > 0
    )

    port = free_port()
    rr = spawn(
        "router",
        stack,
        redis_server.url,
        "--port",
        str(port),
        "--routing",
        "round-robin",
        log=tmp_path / "rr.log",
    )
    try:
        wait_for(lambda: serving(f"127.0.0.1:{port}"), 30, "the round-robin router")
        time.sleep(1.0)  # its worker pool finds the workers
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            rr_share = cached_share(
                generation_pb2_grpc.GenerationStub(channel), workload(seed=2, groups=4, per_group=5)
            )
    finally:
        rr.send_signal(signal.SIGTERM)
        rr.wait(timeout=30)
    print(f"cached share of shareable prompt tokens: prefix {prefix_share:.3f}, round-robin {rr_share:.3f}")
    assert prefix_share >= 0.9
    assert prefix_share > rr_share
    hits = sum(stack.metric(p, "tandem_prefix_cache_hit_tokens_total") for p in stack.processes("prefill"))
    assert hits > 0


def registered_model_id(client: Any, prefix: str, worker_id: str) -> str:
    raw = client.get(f"{prefix}:worker:{worker_id}")
    assert raw is not None
    return worker_pb2.WorkerInfo.FromString(raw).layout.model_id


def owners(client: Any, prefix: str, block_hash: bytes) -> set[str]:
    return {k.decode() for k in client.hkeys(blk_key(prefix, block_hash))}


class SteadyLoad:
    """Sends one greedy 4-token request every ``interval_s`` from a thread until stopped
    (bounded: at most ``limit`` requests), recording each outcome."""

    def __init__(self, stub: generation_pb2_grpc.GenerationStub, interval_s: float, limit: int) -> None:
        self._stub, self._interval_s, self._limit = stub, interval_s, limit
        self._stop = threading.Event()
        self._futures: list[Any] = []
        self.sent_at: list[float] = []  # time.monotonic() of each send
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        rng = random.Random(12)
        while not self._stop.is_set() and len(self._futures) < self._limit:
            prompt = [rng.randrange(2, VOCAB) for _ in range(rng.choice((20, 40, 70)))]
            request = generation_pb2.GenerateRequest(
                prompt_token_ids=prompt, sampling=generation_pb2.SamplingParams(max_tokens=4, ignore_eos=True)
            )
            self.sent_at.append(time.monotonic())
            self._futures.append(self._stub.Generate.future(request, timeout=60))
            self._stop.wait(self._interval_s)

    def sent_between(self, start: float, end: float) -> int:
        """How many requests were sent in [start, end) (time.monotonic() seconds)."""
        return sum(start <= t < end for t in self.sent_at)

    def outcomes(self) -> list[str]:
        """Each request's status code name, or "OK:<n tokens>", in sending order."""
        results = []
        for future in self._futures:
            try:
                results.append(f"OK:{len(future.result().token_ids)}")
            except grpc.RpcError as exc:
                results.append(f"{exc.code().name}: {exc.details()}")
        return results


def test_redis_outage_fails_no_request_and_the_index_resyncs(stack: Stack, redis_server) -> None:
    prefix = prefix_of(stack)
    client: Any = redis.Redis.from_url(redis_server.url)
    model_id = registered_model_id(client, prefix, "prefill-0")
    before = [random.Random(10).randrange(2, VOCAB) for _ in range(64)]
    generate(stack.stub, before)
    first_block = hash_prompt_blocks(before, BLOCK, model_id=model_id)[0]
    wait_for(lambda: bool(owners(client, prefix, first_block)), 5, "the index to learn the prompt")
    holder = owners(client, prefix, first_block)
    ids = [p["id"] for p in stack.processes("prefill", "decode")]

    # Requests flow all along (one per 100 ms) through the outage, the restart of an empty
    # Redis and the workers' re-registration: the router keeps every live worker routable.
    with SteadyLoad(stack.stub, interval_s=0.1, limit=300) as load:
        time.sleep(0.5)
        redis_server.stop()
        stopped_at = time.monotonic()
        try:
            rng = random.Random(11)
            for i in range(6):  # new prompts (events buffered on the workers) and repeats
                prompt = before if i % 2 else [rng.randrange(2, VOCAB) for _ in range(64)]
                assert len(generate(stack.stub, prompt).token_ids) == 4
            time.sleep(max(0.0, stopped_at + 1.5 - time.monotonic()))  # down for 1.5 s at least
        finally:
            redis_server.start()  # empty: every registration and index entry is gone
        restarted_at = time.monotonic()
        # The workers re-register and publish their buffered events; the router finds a gap
        # (the state is gone but the events do not start at 1) and resyncs from snapshots,
        # which bring back the prompt computed before the outage.
        wait_for(lambda: holder <= owners(client, prefix, first_block), 15, "the resync from a snapshot")
        wait_for(lambda: all(client.exists(f"{prefix}:worker:{i}") for i in ids), 10, "re-registration")
        time.sleep(max(1.0, restarted_at + 1.5 - time.monotonic()))  # past the router's next refresh
        ended_at = time.monotonic()
    outcomes = load.outcomes()
    down, after = load.sent_between(stopped_at, restarted_at), load.sent_between(restarted_at, ended_at)
    print(f"{len(outcomes)} requests: {down} while Redis was down, {after} after its empty restart")
    # The load covered both phases (one request per 100 ms for 1.5 s each; a slow thread
    # wakes late, hence the margin).
    assert down >= 5 and after >= 5
    assert [o for o in outcomes if o != "OK:4"] == []
    router = stack.processes("router")[0]
    assert (
        labelled_metric(
            router["metrics_address"], "tandem_routing_decisions_total", reason="index-unavailable"
        )
        > 0
    )
    router_log = (stack.cluster_file.parent / "logs" / "router.log").read_text()
    assert "prefix index: Redis unreachable, routing by load only" in router_log
    for _ in range(3):
        assert len(generate(stack.stub, before).token_ids) == 4
    client.close()


def test_a_killed_worker_leaves_no_stale_ownership_entries(
    stack: Stack, redis_server, tmp_path: Path
) -> None:
    prefix = prefix_of(stack)
    client: Any = redis.Redis.from_url(redis_server.url)
    model_id = registered_model_id(client, prefix, "prefill-0")
    workers = ["prefill-0", "prefill-1", "px"]
    rng = random.Random(20)

    def prompt_for_px() -> list[int]:
        """A new prompt whose first block ranks px first, so the idle cluster routes it there."""
        while True:
            prompt = [rng.randrange(2, VOCAB) for _ in range(48)]
            req = RoutingRequest(
                "r", len(prompt), tuple(hash_prompt_blocks(prompt, BLOCK, model_id=model_id))
            )
            ranks = {
                w: rendezvous_rank(WorkerView(w, 0, 0, "", worker_pb2.WorkerInfo()), req) for w in workers
            }
            if min(ranks, key=lambda w: ranks[w]) == "px":
                return prompt

    def start_px() -> subprocess.Popen[bytes]:
        proc = spawn("prefill", stack, redis_server.url, "--worker-id", "px", "--port", "0", "--device", "cpu",
                     "--dtype", "float32", log=tmp_path / f"px-{time.monotonic_ns()}.log")  # fmt: skip
        epoch = int(client.get(f"{prefix}:epoch:px") or 0)
        wait_for(
            lambda: (
                int(client.get(f"{prefix}:epoch:px") or 0) > epoch
                and client.exists(f"{prefix}:worker:px") == 1
            ),
            60,
            "px to register",
        )
        time.sleep(1.5)  # the router's pool health-checks it
        return proc

    def held_by_px() -> set[str]:
        return {m.decode() for m in client.smembers(owned_key(prefix, "px"))}

    px = start_px()
    try:
        generate(stack.stub, prompt_for_px())
        wait_for(lambda: len(held_by_px()) == 3, 5, "px's blocks in the index")
        stale = [bytes.fromhex(h) for h in held_by_px()]
        px.send_signal(signal.SIGKILL)
        px.wait(timeout=10)
        px = start_px()  # a new epoch fences the old entries even before its registration expires
        wait_for(
            lambda: not held_by_px() and not any("px" in owners(client, prefix, h) for h in stale),
            5,
            "fencing",
        )
        generate(stack.stub, prompt_for_px())
        wait_for(lambda: len(held_by_px()) == 3, 5, "the new incarnation's blocks")
        stale = [bytes.fromhex(h) for h in held_by_px()]
        px.send_signal(signal.SIGKILL)
        px.wait(timeout=10)
        # No restart: the registration's TTL (5 s) expires and the router's sync clears everything.
        wait_for(lambda: not client.exists(state_key(prefix, "px")), 15, "the expired worker's entries to go")
        assert not held_by_px()
        assert not any("px" in owners(client, prefix, h) for h in stale)
    finally:
        if px.poll() is None:
            px.kill()
            px.wait(timeout=10)
        client.close()
