"""End to end on a second Llama variant (tied embeddings, explicit head_dim,
Llama-3 rope scaling, sharded safetensors, 8-token blocks), and the router's
and decode worker's limits: queue full, no worker, lease expiry."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tandem.v1 import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import REPO, Stack, stream_tokens
from tests.e2e.test_disaggregated import hf_greedy
from tests.helpers.checkpoints import make_tiny_llama
from tests.helpers.net import free_port

pytestmark = pytest.mark.e2e

GenerateRequest = generation_pb2.GenerateRequest
SamplingParams = generation_pb2.SamplingParams
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@pytest.fixture(scope="module")
def variant_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("variant") / "model",
        seed=3,
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
        rope_scaling=LLAMA3_SCALING,
        rope_theta=500000.0,
        max_shard_size="40KB",
    )


@pytest.fixture(scope="module")
def stack(variant_model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = ["--block-size", "8", "--router-max-queue-len", "2", "--num-kv-blocks", "64", "--lease-ms", "1500"]
    s = Stack(variant_model, tmp_path_factory.mktemp("vstack"), redis_server.url, args).start()
    yield s
    assert s.stop() == 0


def test_checkpoint_is_sharded(variant_model: Path) -> None:
    assert (variant_model / "model.safetensors.index.json").exists()
    assert len(list(variant_model.glob("model-*.safetensors"))) > 1


def test_variant_matches_transformers(stack: Stack, variant_model: Path) -> None:
    for n_prompt in (3, 8, 21, 40):
        prompt = [(17 * i + n_prompt) % 500 + 2 for i in range(n_prompt)]
        ids, _, _ = stream_tokens(
            stack.stub, GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=30))
        )
        assert ids == hf_greedy(variant_model, prompt, 30), n_prompt
    info = stack.stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=10)
    assert info.block_size == 8


def test_router_queue_full_is_resource_exhausted(stack: Stack) -> None:
    long = GenerateRequest(
        prompt_token_ids=list(range(2, 30)), sampling=SamplingParams(max_tokens=200, ignore_eos=True)
    )
    calls = [stack.stub.GenerateStream(long) for _ in range(2)]
    firsts = [next(iter(c)) for c in calls]  # both are in flight now
    assert all(f.token_ids for f in firsts)
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.Generate(GenerateRequest(prompt="one too many"), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for c in calls:
        c.cancel()
    assert stack.wait_blocks_free() == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}


def test_unfilled_reservation_is_released_when_its_lease_expires(stack: Stack) -> None:
    (decode,) = stack.processes("decode")
    with stack.worker_channel(decode) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        reply = stub.Reserve(
            worker_pb2.ReserveRequest(request_id="orphan", num_prompt_tokens=20, lease_ms=300), timeout=10
        )
        assert len(reply.destination.block_ids) == 3  # ceil(20 / 8)
        assert stack.metric(decode, "tandem_kv_blocks_used") == 3.0
        assert stack.wait_blocks_free(timeout_s=5) == {
            p["id"]: 0.0 for p in stack.processes("prefill", "decode")
        }
        # A Decode that comes after the lease finds nothing to claim.
        late = stub.Decode(worker_pb2.DecodeRequest(
            request_id="orphan", reservation_id=reply.destination.reservation_id,
            epoch=reply.destination.epoch, prompt_token_ids=list(range(20)), first_token_id=5))  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            list(late)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # Release is idempotent.
        released = stub.Release(worker_pb2.ReleaseRequest(
            reservation_id=reply.destination.reservation_id, epoch=reply.destination.epoch), timeout=10)  # fmt: skip
        assert not released.released


def test_decode_reservation_is_the_credit(stack: Stack) -> None:
    (decode,) = stack.processes("decode")
    with stack.worker_channel(decode) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        with pytest.raises(grpc.RpcError) as info:  # 64 blocks of 8 tokens: 600 tokens cannot fit
            stub.Reserve(worker_pb2.ReserveRequest(request_id="huge", num_prompt_tokens=600), timeout=10)
        assert info.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    assert stack.metric(decode, "tandem_kv_blocks_used") == 0.0


def test_router_without_workers_is_unavailable(variant_model: Path, redis_server, tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "cli.main", "router", "--model", str(variant_model), "--port", str(port),
           "--metrics-port", "0", "--redis-url", redis_server.url, "--redis-prefix", f"empty{port}"]  # fmt: skip
    log = (tmp_path / "router.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = generation_pb2_grpc.GenerationStub(channel)
            deadline = time.monotonic() + 30
            while True:
                try:
                    stub.Generate(GenerateRequest(prompt="anyone there?"), timeout=10)
                except grpc.RpcError as exc:
                    if (
                        exc.code() == grpc.StatusCode.UNAVAILABLE
                        and "worker" in (exc.details() or "").lower()
                    ):
                        break
                    assert time.monotonic() < deadline, exc
                time.sleep(0.2)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        log.close()


def test_streams_started_together_finish_together(stack: Stack) -> None:
    """Continuous batching: a short request that joins a running long one finishes first."""
    long = GenerateRequest(
        prompt_token_ids=list(range(2, 20)), sampling=SamplingParams(max_tokens=150, ignore_eos=True)
    )
    short = GenerateRequest(
        prompt_token_ids=list(range(2, 12)), sampling=SamplingParams(max_tokens=3, ignore_eos=True)
    )
    done: dict[str, float] = {}

    def run(name: str, req: GenerateRequest) -> None:
        list(stack.stub.GenerateStream(req, timeout=60))
        done[name] = time.monotonic()

    t = threading.Thread(target=run, args=("long", long))
    t.start()
    time.sleep(0.05)  # the long stream runs ~0.4 s on 2 cores: join it while it decodes
    run("short", short)
    t.join()
    assert done["short"] < done["long"]


def test_release_by_request_id_frees_a_reservation_whose_id_was_lost(stack: Stack) -> None:
    (decode,) = stack.processes("decode")
    with stack.worker_channel(decode) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        stub.Reserve(worker_pb2.ReserveRequest(request_id="lost-1", num_prompt_tokens=9), timeout=10)
        stub.Reserve(worker_pb2.ReserveRequest(request_id="kept-1", num_prompt_tokens=9), timeout=10)
        assert stack.metric(decode, "tandem_kv_blocks_used") == 4.0
        assert stub.Release(worker_pb2.ReleaseRequest(request_id="lost-1"), timeout=10).released
        assert stack.metric(decode, "tandem_kv_blocks_used") == 2.0  # only lost-1's blocks
        assert stub.Release(worker_pb2.ReleaseRequest(request_id="kept-1"), timeout=10).released
        assert stack.metric(decode, "tandem_kv_blocks_used") == 0.0
