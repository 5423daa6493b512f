"""`tandem serve --colocated`: the baseline without disaggregation, same public API."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tandem.v1 import generation_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import Stack, stream_tokens
from tests.e2e.test_disaggregated import hf_greedy
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

GenerateRequest = generation_pb2.GenerateRequest
SamplingParams = generation_pb2.SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("colocated") / "model", seed=5)


@pytest.fixture(scope="module")
def stack(model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A small token budget so that long prompts are prefilled in chunks beside running decodes.
    args = ["--colocated", "--decode-workers", "2", "--max-num-batched-tokens", "24"]
    s = Stack(model, tmp_path_factory.mktemp("cstack"), redis_server.url, args).start()
    yield s
    assert s.stop() == 0


def test_only_colocated_workers_start(stack: Stack) -> None:
    assert sorted(p["kind"] for p in stack.processes()) == ["colocated", "colocated", "router"]


def test_colocated_matches_transformers(stack: Stack, model: Path) -> None:
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (4, 30, 61)]
    expected = [hf_greedy(model, p, 25) for p in prompts]

    def run(prompt: list[int]) -> list[int]:
        req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=25))
        return stream_tokens(stack.stub, req)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(run, prompts)) == expected


def test_colocated_two_completions_and_prompt_logprobs(stack: Stack, model: Path) -> None:
    prompt = list(range(3, 40))  # longer than the 24-token budget: chunked prefill
    expected = hf_greedy(model, prompt, 10)
    sampling = SamplingParams(max_tokens=10, n=2, prompt_logprobs=1)
    request = GenerateRequest(prompt_token_ids=prompt, sampling=sampling, priority=1)
    msgs = list(stack.stub.GenerateStream(request, timeout=60))
    for index in (0, 1):
        assert [t for m in msgs if m.index == index for t in m.token_ids] == expected
    assert [e.token_id for e in msgs[0].prompt_logprobs] == prompt[1:]
    unary = stack.stub.Generate(request, timeout=60)
    assert [list(c.token_ids) for c in unary.choices] == [expected, expected]
    assert unary.usage.completion_tokens == 2 * len(expected)


def test_cancel_frees_blocks(stack: Stack) -> None:
    call = stack.stub.GenerateStream(
        GenerateRequest(
            prompt_token_ids=list(range(3, 50)), sampling=SamplingParams(max_tokens=150, ignore_eos=True)
        )
    )
    it = iter(call)
    next(it), next(it)
    call.cancel()
    used = stack.wait_blocks_free()
    assert used == {p["id"]: 0.0 for p in stack.processes("colocated")}


def test_generate_rpc_is_refused_by_a_disaggregated_decode_worker(
    model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    s = Stack(model, tmp_path_factory.mktemp("plain"), redis_server.url).start()
    try:
        (decode,) = s.processes("decode")
        with s.worker_channel(decode) as channel:
            call = worker_pb2_grpc.DecodeWorkerStub(channel).Generate(
                worker_pb2.LocalGenerateRequest(request_id="x", prompt_token_ids=[3, 4])
            )
            with pytest.raises(grpc.RpcError) as info:
                list(call)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        assert s.stop() == 0
