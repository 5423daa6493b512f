"""``--async-scheduling`` through real processes: decode and colocated workers that
launch step N + 1 before step N's tokens reach the host give transformers' greedy
tokens, and a stream cancelled mid-decode frees every block."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tandem.v1 import generation_pb2
from tests.e2e.stack import Stack, stream_tokens
from tests.e2e.test_disaggregated import hf_greedy
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

GenerateRequest = generation_pb2.GenerateRequest
SamplingParams = generation_pb2.SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("async") / "model", seed=3)


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def stack(
    request: pytest.FixtureRequest, model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    flags = ["--async-scheduling", "--num-kv-blocks", "128"]
    if request.param == "colocated":
        flags.append("--colocated")
    s = Stack(model, tmp_path_factory.mktemp(request.param), redis_server.url, flags).start()
    yield s
    assert s.stop() == 0


def test_the_flag_reaches_every_decoding_worker(stack: Stack) -> None:
    workers = stack.processes("decode", "colocated")
    assert workers
    for process in workers:  # (prefill workers get it too and ignore it)
        args = Path(f"/proc/{process['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"--async-scheduling" in args, process["id"]


def test_concurrent_greedy_streams_match_transformers(stack: Stack, model: Path) -> None:
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (4, 17, 33, 50)]
    lengths = (30, 45, 12, 38)  # streams end at different steps while others run on
    expected = [hf_greedy(model, p, n) for p, n in zip(prompts, lengths, strict=True)]

    def run(prompt: list[int], max_tokens: int) -> list[int]:
        req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=max_tokens))
        return stream_tokens(stack.stub, req)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(run, prompts, lengths))
    assert got == expected
    assert stack.wait_blocks_free() == dict.fromkeys(
        (p["id"] for p in stack.processes("prefill", "decode", "colocated")), 0.0
    )


def test_a_stream_cancelled_mid_decode_frees_every_block(stack: Stack) -> None:
    long = GenerateRequest(
        prompt_token_ids=list(range(3, 40)), sampling=SamplingParams(max_tokens=200, ignore_eos=True)
    )
    stream = stack.stub.GenerateStream(long, timeout=60)
    received = 0
    for msg in stream:
        received += len(msg.token_ids)
        if received >= 5:
            stream.cancel()
            break
    assert received >= 5
    assert stack.wait_blocks_free() == dict.fromkeys(
        (p["id"] for p in stack.processes("prefill", "decode", "colocated")), 0.0
    )
