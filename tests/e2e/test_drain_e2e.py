"""Graceful drain through a real stack: SIGTERM a decode worker while a long stream
runs on it; it leaves Redis at once, refuses new requests, finishes the stream and
exits 0, while new requests go to the other decode worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import redis

from engine.drain import DRAINING_MESSAGE
from engine.worker_registry import worker_key
from tandem.v1 import generation_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import Stack
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

MAX_TOKENS = 1500  # several seconds of decode: the stream outlasts the checks below


@pytest.fixture
def stack(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("drain")
    model = make_tiny_llama(run_dir / "model", max_position_embeddings=2048)
    args = [
        "--decode-workers",
        "2",
        "--num-kv-blocks",
        "256",
        "--routing",
        "round-robin",
        "--drain-timeout-s",
        "60",
    ]
    s = Stack(model, run_dir, redis_server.url, args).start()
    yield s
    s.stop()  # the drained worker's exit already ended `tandem serve` (exit 1: a child left)


def wait_until(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_sigterm_drains_a_decode_worker(stack: Stack, redis_server) -> None:
    long = generation_pb2.GenerateRequest(
        prompt_token_ids=[5, 6, 7, 8],
        sampling=generation_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    messages: list[generation_pb2.GenerateStreamResponse] = []
    call = stack.stub.GenerateStream(long, timeout=120)
    messages.append(next(call))

    def drain_rest() -> None:
        messages.extend(call)

    reader = threading.Thread(target=drain_rest)
    reader.start()
    decodes = stack.processes("decode")
    assert wait_until(lambda: any(stack.metric(p, "tandem_requests_running") for p in decodes), 5)
    busy = next(p for p in decodes if stack.metric(p, "tandem_requests_running") == 1.0)
    idle = next(p for p in decodes if p is not busy)
    client = redis.Redis.from_url(redis_server.url)
    key = worker_key(f"t{stack.port}", busy["id"])
    assert client.exists(key) == 1

    os.kill(busy["pid"], signal.SIGTERM)
    assert wait_until(lambda: client.exists(key) == 0, 2)  # deregistered first
    assert reader.is_alive(), "the stream should outlast the start of the drain"
    time.sleep(1.2)  # the announce window (1 s): routers have dropped the worker
    late = worker_pb2.ReserveRequest(request_id="late", num_prompt_tokens=4)
    with stack.worker_channel(busy) as channel, pytest.raises(grpc.RpcError) as info:
        worker_pb2_grpc.DecodeWorkerStub(channel).Reserve(late, timeout=10)  # nothing new
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
    short = generation_pb2.GenerateRequest(prompt="Hi", sampling=generation_pb2.SamplingParams(max_tokens=2))
    replies = [stack.stub.Generate(short, timeout=30) for _ in range(3)]
    assert [len(r.token_ids) for r in replies] == [2, 2, 2]
    assert reader.is_alive(), "new requests should be served while the stream still runs"

    reader.join(timeout=60)
    assert sum(len(m.token_ids) for m in messages) == MAX_TOKENS
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert wait_until(lambda: not os.path.exists(f"/proc/{busy['pid']}"), 15)
    assert wait_until(
        lambda: f"{busy['id']} (pid {busy['pid']}) exited with code 0" in stack.log.read_text(), 5
    )
    assert stack.metric(idle, "tandem_kv_blocks_used") == 0.0
    client.close()
