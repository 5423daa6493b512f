"""End to end through real processes: router → prefill worker → KV transfer
(tcp) → decode worker, against Hugging Face transformers as the reference."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import transformers
from grpc_health.v1 import health_pb2

from tandem.v1 import generation_pb2
from tests.e2e.stack import Stack, stream_tokens
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

GenerateRequest = generation_pb2.GenerateRequest
SamplingParams = generation_pb2.SamplingParams


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference tokens: transformers ``generate`` (greedy, float32, stops at EOS like us)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(  # type: ignore[misc]
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens,
    )  # fmt: skip
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("gqa") / "model", seed=1)


@pytest.fixture(scope="module")
def stack(gqa_model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("stack")
    s = Stack(
        gqa_model, run_dir, redis_server.url, ["--prefill-workers", "2", "--decode-workers", "2"]
    ).start()
    yield s
    assert s.stop() == 0


def test_every_process_reports_serving(stack: Stack) -> None:
    kinds = sorted(p["kind"] for p in stack.processes())
    assert kinds == ["decode", "decode", "prefill", "prefill", "router"]
    for process in stack.processes():
        assert stack.health(process) == health_pb2.HealthCheckResponse.SERVING, process["id"]


def test_concurrent_streams_match_transformers(stack: Stack, gqa_model: Path) -> None:
    rng = random.Random(7)
    # Prompts of several 16-token blocks (and partial last blocks); generations cross block boundaries.
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 16, 37, 50, 70, 33)]
    max_tokens = 40
    expected = [hf_greedy(gqa_model, p, max_tokens) for p in prompts]

    def run(prompt: list[int]) -> list[int]:
        req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=max_tokens))
        return stream_tokens(stack.stub, req)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(run, prompts))
    assert got == expected
    assert stack.wait_blocks_free() == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}


def test_unary_and_stream_agree(stack: Stack, gqa_model: Path) -> None:
    req = GenerateRequest(
        request_id="agree-1", prompt="The quick brown fox", sampling=SamplingParams(max_tokens=24)
    )
    unary = stack.stub.Generate(req, timeout=60)
    ids, text, msgs = stream_tokens(stack.stub, req)
    assert list(unary.token_ids) == ids
    assert unary.text == text
    assert unary.request_id == "agree-1" and all(m.request_id == "agree-1" for m in msgs)
    assert unary.finish_reason == msgs[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    assert all(m.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert unary.usage == msgs[-1].usage
    tokenizer = transformers.AutoTokenizer.from_pretrained(gqa_model)
    prompt_ids = tokenizer("The quick brown fox")["input_ids"]
    assert unary.usage.prompt_tokens == len(prompt_ids)
    assert unary.usage.completion_tokens == len(ids)
    assert ids == hf_greedy(gqa_model, prompt_ids, 24)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(stack: Stack) -> None:
    sampling = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    req = GenerateRequest(prompt_token_ids=list(range(10, 40)), sampling=sampling)
    first = [list(stack.stub.Generate(req, timeout=60).token_ids) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert len(first[0]) == 20
    other = GenerateRequest(prompt_token_ids=list(range(10, 40)), sampling=SamplingParams(
        max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=99, ignore_eos=True))  # fmt: skip
    assert list(stack.stub.Generate(other, timeout=60).token_ids) != first[0]


def test_model_info(stack: Stack) -> None:
    info = stack.stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=10)
    assert (info.architecture, info.vocab_size, info.max_model_len, info.block_size, info.dtype) == (
        "LlamaForCausalLM", 512, 256, 16, "float32")  # fmt: skip
    assert info.model_name == "model"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (GenerateRequest(prompt=""), "prompt"),
        (GenerateRequest(prompt="hi", prompt_token_ids=[5, 6]), "prompt"),
        (GenerateRequest(prompt_token_ids=[5, 512]), "prompt_token_ids"),
        (GenerateRequest(prompt_token_ids=[5] * 250, sampling=SamplingParams(max_tokens=10)), "max_tokens"),
        (GenerateRequest(prompt="hi", sampling=SamplingParams(temperature=-0.5)), "temperature"),
        (GenerateRequest(prompt="hi", sampling=SamplingParams(top_p=1.5)), "top_p"),
        (GenerateRequest(prompt="hi", sampling=SamplingParams(top_p=0.0)), "top_p"),
    ],
    ids=["empty", "both", "out-of-vocab", "too-long", "negative-temperature", "top-p-high", "top-p-zero"],
)
def test_bad_input_is_invalid_argument(stack: Stack, request_: GenerateRequest, field: str) -> None:
    for call in (stack.stub.Generate, lambda r, timeout: list(stack.stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(request_, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details()


def test_cancel_and_deadline_free_every_block(stack: Stack) -> None:
    long = SamplingParams(max_tokens=150, ignore_eos=True)
    # A stream cancelled by the client after its first messages.
    call = stack.stub.GenerateStream(GenerateRequest(prompt_token_ids=list(range(3, 60)), sampling=long))
    it = iter(call)
    next(it), next(it)
    call.cancel()
    # A deadline that expires mid-generation (150 tokens take ~0.5 s here), and one that
    # expires during prefill or right after it, before the decode worker took the request.
    for timeout in (0.25, 0.02):
        with pytest.raises(grpc.RpcError) as info:
            stack.stub.Generate(
                GenerateRequest(prompt_token_ids=list(range(3, 90)), sampling=long), timeout=timeout
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # Cancels at random moments from several threads (a stream that finished first is fine).
    def cancel_after(delay: float) -> str:
        c = stack.stub.GenerateStream(GenerateRequest(prompt_token_ids=list(range(5, 45)), sampling=long))
        threading.Timer(delay, c.cancel).start()
        try:
            list(c)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return "OK"

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(cancel_after, (0.01, 0.05, 0.2, 0.4)))
    assert set(codes) <= {"CANCELLED", "OK"} and codes[0] == "CANCELLED", codes
    used = stack.wait_blocks_free(timeout_s=20)
    assert used == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}
    # And the deployment still answers.
    assert stack.stub.Generate(
        GenerateRequest(prompt="still alive", sampling=SamplingParams(max_tokens=4)), timeout=30
    )
    for process in stack.processes("prefill", "decode"):
        assert stack.metric(process, "tandem_kv_blocks_total") > 0
