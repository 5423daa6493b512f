"""The router's stream ends at a stop string and closes the worker stream at once
(a fake orchestrator stands in for the workers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from engine.batch import TokenLogprobs
from engine.metrics import ProcessMetrics
from engine.tokenizer import Tokenizer
from router.orchestrator import TokenChunk
from router.service import GenerationService, ServedModel
from router.validation import ParsedRequest
from tandem.v1 import generation_pb2
from tests.helpers.checkpoints import _train_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog while the farmer watches."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    _train_tokenizer(512).save(str(path))
    return Tokenizer.from_pretrained(path.parent)


class FakeOrchestrator:
    """Yields the tokens of :data:`TEXT` one per chunk (first with a log-probability) and
    records how many chunks were pulled and whether the stream was closed."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.pulled = 0
        self.closed = False

    async def generate(
        self, req: ParsedRequest, timeout_s: float | None, canceller: Any = None
    ) -> AsyncGenerator[TokenChunk, None]:
        try:
            for i, token in enumerate(self.token_ids):
                self.pulled += 1
                last = i == len(self.token_ids) - 1
                logprobs = [TokenLogprobs(token, -0.25, ((token, -0.25),))] if i == 0 else []
                yield TokenChunk([token], "length" if last else None, logprobs=logprobs)
        finally:
            self.closed = True


class FakeContext:
    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"unexpected abort: {code} {details}")


def run(
    tokenizer: Tokenizer, stop: list[str]
) -> tuple[FakeOrchestrator, list[generation_pb2.GenerateStreamResponse]]:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    orchestrator = FakeOrchestrator(ids)
    model = ServedModel("m", "LlamaForCausalLM", 256, 512, 16, "float32")
    service = GenerationService(
        orchestrator,  # type: ignore[arg-type]
        tokenizer,
        model,
        ProcessMetrics("router"),
        max_inflight=4,
    )
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=[0, 5], sampling=generation_pb2.SamplingParams(max_tokens=100, stop=stop)
    )

    async def collect() -> list[generation_pb2.GenerateStreamResponse]:
        return [m async for m in service.GenerateStream(request, FakeContext())]  # type: ignore[arg-type]

    return orchestrator, asyncio.run(collect())


def test_stop_string_ends_the_stream_and_closes_the_worker_stream(tokenizer: Tokenizer) -> None:
    orchestrator, msgs = run(tokenizer, ["lazy"])
    assert "".join(m.text for m in msgs) == TEXT[: TEXT.index("lazy")]
    assert msgs[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    assert all(m.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    n_tokens = sum(len(m.token_ids) for m in msgs)
    assert orchestrator.closed and orchestrator.pulled == n_tokens < len(orchestrator.token_ids)
    assert msgs[-1].usage.completion_tokens == n_tokens
    assert [lp.token_id for lp in msgs[0].logprobs] == list(msgs[0].token_ids)


def test_without_a_match_the_whole_text_streams(tokenizer: Tokenizer) -> None:
    orchestrator, msgs = run(tokenizer, ["zebra", "watches!"])
    assert "".join(m.text for m in msgs) == TEXT
    assert msgs[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert orchestrator.pulled == len(orchestrator.token_ids)


def test_stop_string_at_the_very_end_reports_stop(tokenizer: Tokenizer) -> None:
    _, msgs = run(tokenizer, ["watches."])
    assert "".join(m.text for m in msgs) == TEXT[: TEXT.index("watches.")]
    assert msgs[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
