"""The router cancels, on the worker, a completion that a stop string ends while others
run (``router.completion_cancel``; a fake orchestrator and a fake worker stub)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine.metrics import ProcessMetrics
from engine.tokenizer import Tokenizer
from router.completion_cancel import CANCEL_TIMEOUT_S, CompletionCanceller
from router.orchestrator import TokenChunk
from router.service import GenerationService, ServedModel
from router.validation import ParsedRequest
from tandem.v1 import generation_pb2, worker_pb2
from tests.helpers.checkpoints import _train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A farmer watches the fox from the barn door.",
    "Rain falls on the hills while the dog sleeps.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    _train_tokenizer(512).save(str(path))
    return Tokenizer.from_pretrained(path.parent)


class FakeStub:
    """Records ``CancelCompletion`` calls; fails them with ``fail`` when set."""

    def __init__(self, fail: grpc.StatusCode | None = None) -> None:
        self.calls: list[tuple[str, int, float]] = []
        self.fail = fail

    async def CancelCompletion(
        self, request: worker_pb2.CancelCompletionRequest, timeout: float
    ) -> worker_pb2.CancelCompletionResponse:
        self.calls.append((request.request_id, request.index, timeout))
        if self.fail is not None:
            raise grpc.aio.AioRpcError(self.fail, grpc.aio.Metadata(), grpc.aio.Metadata(), "worker gone")
        return worker_pb2.CancelCompletionResponse(known=True)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_cancels_wait_for_the_worker_stream_and_failures_are_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> tuple[FakeStub, FakeStub]:
        canceller, stub = CompletionCanceller(), FakeStub()
        canceller.cancel(2)  # no worker stream yet: kept
        await settle()
        canceller.attach(stub, "req.1")  # type: ignore[arg-type]
        canceller.attach(stub, "req.1")  # type: ignore[arg-type]  # every message attaches: sent once
        await settle()
        canceller.cancel(0)
        await settle()
        failing = FakeStub(grpc.StatusCode.UNAVAILABLE)
        canceller.attach(failing, "req.2")  # type: ignore[arg-type]
        canceller.cancel(1)
        await settle()
        return stub, failing

    with caplog.at_level(logging.WARNING, logger="router.completion_cancel"):
        stub, failing = asyncio.run(main())
    assert stub.calls == [("req.1", 2, CANCEL_TIMEOUT_S), ("req.1", 0, CANCEL_TIMEOUT_S)]
    assert failing.calls == [("req.2", 1, CANCEL_TIMEOUT_S)]
    assert "cancelling completion 1 of req.2 failed: UNAVAILABLE worker gone" in caplog.text


class ThreeCompletions:
    """Streams :data:`TEXTS` as completions 0-2, one token of each in turn, from a worker
    stream that it attaches to the canceller (the router's orchestrator does so)."""

    def __init__(self, token_ids: list[list[int]]) -> None:
        self.token_ids = token_ids
        self.stub = FakeStub()

    async def generate(
        self, req: ParsedRequest, timeout_s: float | None, canceller: CompletionCanceller | None = None
    ) -> AsyncGenerator[TokenChunk, None]:
        assert canceller is not None
        canceller.attach(self.stub, "worker-req")  # type: ignore[arg-type]
        for step in range(max(map(len, self.token_ids))):
            for index, ids in enumerate(self.token_ids):
                if step < len(ids):
                    yield TokenChunk([ids[step]], "length" if step == len(ids) - 1 else None, index=index)
            await asyncio.sleep(0)


class FakeContext:
    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"unexpected abort: {code} {details}")


def run(tokenizer: Tokenizer, stop: list[str]) -> tuple[FakeStub, generation_pb2.GenerateResponse]:
    orchestrator = ThreeCompletions([tokenizer.encode(t, add_special_tokens=False) for t in TEXTS])
    service = GenerationService(
        orchestrator,  # type: ignore[arg-type]
        tokenizer,
        ServedModel("m", "LlamaForCausalLM", 256, 512, 16, "float32"),
        ProcessMetrics("router"),
        max_inflight=4,
    )
    sampling = generation_pb2.SamplingParams(max_tokens=100, stop=stop, n=3)
    request = generation_pb2.GenerateRequest(prompt_token_ids=[0, 5], sampling=sampling)

    async def main() -> generation_pb2.GenerateResponse:
        reply = await service.Generate(request, FakeContext())  # type: ignore[arg-type]
        await settle()
        return reply

    return orchestrator.stub, asyncio.run(main())


def test_a_stop_string_cancels_that_completion_on_the_worker(tokenizer: Tokenizer) -> None:
    stub, reply = run(tokenizer, ["farmer"])
    assert stub.calls == [("worker-req", 1, CANCEL_TIMEOUT_S)]
    assert [c.text for c in reply.choices] == [TEXTS[0], "A ", TEXTS[2]]
    assert [c.finish_reason for c in reply.choices] == [
        generation_pb2.FINISH_REASON_LENGTH,
        generation_pb2.FINISH_REASON_STOP,
        generation_pb2.FINISH_REASON_LENGTH,
    ]


def test_no_cancel_when_the_stop_ends_the_last_completion_or_none_matches(tokenizer: Tokenizer) -> None:
    # "fox" ends completions 0 and 1 (2 runs on: both are cancelled); "the" ends all three
    stub, reply = run(tokenizer, ["fox"])
    assert [c.finish_reason for c in reply.choices] == [generation_pb2.FINISH_REASON_STOP] * 2 + [
        generation_pb2.FINISH_REASON_LENGTH
    ]
    assert sorted(index for _, index, _ in stub.calls) == [0, 1]
    stub, reply = run(tokenizer, ["zebra"])
    assert stub.calls == []
    stub, reply = run(tokenizer, ["the"])
    assert [c.finish_reason for c in reply.choices] == [generation_pb2.FINISH_REASON_STOP] * 3
    assert len(stub.calls) == 2  # the third stop ended the request: its stream closes instead
