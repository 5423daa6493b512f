"""The disaggregated path with both workers on a CUDA GPU (skipped without one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tandem.v1 import generation_pb2
from tests.e2e.stack import Stack, stream_tokens
from tests.e2e.test_disaggregated import hf_greedy
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("gpu") / "model", seed=2)


@pytest.fixture(scope="module")
def stack(model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(model, tmp_path_factory.mktemp("gstack"), redis_server.url, device="cuda").start()
    yield s
    assert s.stop() == 0


def test_gpu_workers_match_transformers(stack: Stack, model: Path) -> None:
    for n in (7, 33, 64):
        prompt = [(13 * i + n) % 500 + 2 for i in range(n)]
        req = generation_pb2.GenerateRequest(
            prompt_token_ids=prompt, sampling=generation_pb2.SamplingParams(max_tokens=32)
        )
        assert stream_tokens(stack.stub, req)[0] == hf_greedy(model, prompt, 32), n
    assert stack.wait_blocks_free() == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}
