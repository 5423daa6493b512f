"""Layer-wise KV streaming end to end (``--kv-transfer-layers-per-message 2`` on a 5-layer
model: 3 messages per prompt over ``tcp``) through real processes: tokens identical to
Hugging Face transformers, and a cancel or deadline while a stream is half sent frees every
block on both workers.

The prefill worker runs with ``TANDEM_FAULT_INJECT=stall_kv_once,stall_kv_once``: its first
two messages (the first layer group of the first two prompts) pause halfway through their
payload, so the cancel and deadline tests (which run first) land mid-stream every time.
The exact messages and layer ranges a receiver sees are asserted in
``tests/prefill_service/test_layer_streaming.py``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from kvtransfer.tcp import FAULT_INJECT_ENV, FAULT_STALL_S
from tandem.v1 import generation_pb2
from tests.e2e.stack import Stack, stream_tokens
from tests.e2e.test_disaggregated import hf_greedy
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

GenerateRequest = generation_pb2.GenerateRequest
SamplingParams = generation_pb2.SamplingParams
NUM_LAYERS, PER_MESSAGE = 5, 2
STALL_LOG = "fault injection: stalling a KV payload"
PROMPT_BLOCKS = 4  # 60-token prompts, 16-token blocks


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("ls") / "model", seed=2, num_hidden_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def stack(model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = ["--prefill-workers", "1", "--decode-workers", "1"]
    args += ["--kv-transport", "tcp", "--kv-transfer-layers-per-message", str(PER_MESSAGE)]
    s = Stack(model, tmp_path_factory.mktemp("ls-stack"), redis_server.url, args)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(FAULT_INJECT_ENV, "stall_kv_once,stall_kv_once")
        s.start()
    yield s
    assert s.stop() == 0


def decode_blocks_used(stack: Stack) -> float:
    return stack.metric(stack.processes("decode")[0], "tandem_kv_blocks_used")


def stalls(stack: Stack) -> int:
    return sum(p.read_text().count(STALL_LOG) for p in (stack.log.parent / "logs").glob("prefill-*.log"))


def assert_all_free(stack: Stack) -> None:
    assert stack.wait_blocks_free(timeout_s=20) == {
        p["id"]: 0.0 for p in stack.processes("prefill", "decode")
    }


def test_cancel_and_deadline_mid_stream_free_every_block(stack: Stack) -> None:
    request = GenerateRequest(prompt_token_ids=list(range(3, 63)), sampling=SamplingParams(max_tokens=8))
    call = stack.stub.GenerateStream(request, timeout=60)
    time.sleep(FAULT_STALL_S / 3)  # layer group [0, 2) is stalled halfway; [2, 4) and [4, 5) wait
    assert stalls(stack) == 1
    assert decode_blocks_used(stack) == PROMPT_BLOCKS  # reserved, not yet filled
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert_all_free(stack)

    started = time.monotonic()
    request = GenerateRequest(prompt_token_ids=list(range(70, 130)), sampling=SamplingParams(max_tokens=8))
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.Generate(request, timeout=FAULT_STALL_S / 2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < FAULT_STALL_S
    assert stalls(stack) == 2
    assert_all_free(stack)


def test_streamed_tokens_match_transformers(stack: Stack, model: Path) -> None:
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (3, 16, 41, 77)]
    expected = [hf_greedy(model, p, 24) for p in prompts]

    def run(prompt: list[int]) -> list[int]:
        req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=24))
        return stream_tokens(stack.stub, req, timeout=60)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(run, prompts)) == expected
    assert run(prompts[2]) == expected[2]  # again, from the prefill worker's prefix cache
    assert_all_free(stack)
    prefill = stack.processes("prefill")[0]
    assert stack.metric(prefill, "tandem_prefix_cache_hit_tokens_total") >= 32


@pytest.fixture(scope="module")
def gloo_stack(model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The device backends' control channel (write grants, one-way streamed messages, abandon,
    fence) between real processes: ``nccl`` runs over gloo on CPU caches."""
    args = ["--prefill-workers", "1", "--decode-workers", "1"]
    args += ["--kv-transport", "nccl", "--kv-transfer-layers-per-message", "1"]
    s = Stack(model, tmp_path_factory.mktemp("ls-gloo"), redis_server.url, args).start()
    yield s
    assert s.stop() == 0


def test_device_channel_streams_and_cancels_free_every_block(gloo_stack: Stack, model: Path) -> None:
    sampling = SamplingParams(max_tokens=40, ignore_eos=True)
    calls = []
    for i, delay in enumerate((0.0, 0.005, 0.01, 0.02, 0.04, 0.08)):
        prompt = [(7 * j + i) % 500 + 3 for j in range(120)]
        call = gloo_stack.stub.GenerateStream(
            GenerateRequest(prompt_token_ids=prompt, sampling=sampling), timeout=60
        )
        threading.Timer(delay, call.cancel).start()
        calls.append(call)
    for call in calls:
        with contextlib.suppress(grpc.RpcError):
            list(call)
    assert_all_free(gloo_stack)
    prompt = [(5 * j) % 500 + 3 for j in range(70)]
    req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=16))
    assert stream_tokens(gloo_stack.stub, req, timeout=60)[0] == hf_greedy(model, prompt, 16)
    assert_all_free(gloo_stack)
