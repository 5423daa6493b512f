"""``tandem generate`` against a fake grpc.aio Generation server on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from cli.main import main
from tandem.v1 import generation_pb2, generation_pb2_grpc

BAD_PROMPT = "bad"
BAD_DETAILS = "sampling.top_p must be in (0, 1]"
USAGE = generation_pb2.Usage(prompt_tokens=4, completion_tokens=3, cached_prompt_tokens=2)


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """Answers " Paris." as tokens [5, 6, 7]; the prompt "bad" gets INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.requests: list[generation_pb2.GenerateRequest] = []

    async def Generate(self, request: Any, context: Any) -> generation_pb2.GenerateResponse:
        self.requests.append(request)
        if request.prompt == BAD_PROMPT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, BAD_DETAILS)
        return generation_pb2.GenerateResponse(
            request_id=request.request_id or "req-1",
            text=" Paris.",
            token_ids=[5, 6, 7],
            finish_reason=generation_pb2.FINISH_REASON_STOP,
            usage=USAGE,
        )

    async def GenerateStream(
        self, request: Any, context: Any
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        self.requests.append(request)
        yield generation_pb2.GenerateStreamResponse(request_id="req-2", token_ids=[5], text=" Par")
        if request.prompt == BAD_PROMPT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, BAD_DETAILS)
        yield generation_pb2.GenerateStreamResponse(request_id="req-2", token_ids=[6], text="is")
        yield generation_pb2.GenerateStreamResponse(
            request_id="req-2",
            token_ids=[7],
            text=".",
            finish_reason=generation_pb2.FINISH_REASON_LENGTH,
            usage=USAGE,
        )


@pytest.fixture
def fake_router() -> Iterator[tuple[str, FakeGeneration]]:
    """``(target, servicer)`` of a grpc.aio server on its own event loop thread."""
    servicer = FakeGeneration()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        state["stop"] = asyncio.Event()
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        started.set()
        await state["stop"].wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{state['port']}", servicer
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(10)
    assert not thread.is_alive()
    loop.close()


def test_unary_prints_the_text_and_sends_greedy_defaults(
    fake_router: tuple[str, FakeGeneration], capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = fake_router
    assert main(["generate", "Hello", "--target", target]) == 0
    assert capsys.readouterr() == (" Paris.\n", "")
    (request,) = servicer.requests
    assert request.prompt == "Hello"
    assert request.request_id == ""
    assert list(request.prompt_token_ids) == []
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_k, sampling.ignore_eos) == (
        64,
        0.0,
        0,
        False,
    )
    assert not sampling.HasField("top_p")
    assert not sampling.HasField("seed")


def test_unary_json_and_every_sampling_option(
    fake_router: tuple[str, FakeGeneration], capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = fake_router
    argv = [
        *("generate", "Hello", "--target", target, "--request-id", "r7", "--max-tokens", "5"),
        *("--temperature", "0.5", "--top-p", "0.25", "--top-k", "3", "--seed", "11", "--ignore-eos"),
        *("--timeout", "10", "--json"),
    ]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {
        "request_id": "r7",
        "text": " Paris.",
        "token_ids": [5, 6, 7],
        "finish_reason": "FINISH_REASON_STOP",
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "cached_prompt_tokens": 2},
    }
    sampling = servicer.requests[0].sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (5, 0.5, 0.25, 3)
    assert (sampling.seed, sampling.ignore_eos) == (11, True)


def test_stream_prints_the_pieces(
    fake_router: tuple[str, FakeGeneration], capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = fake_router
    assert main(["generate", "Hello", "--target", target, "--stream"]) == 0
    assert capsys.readouterr() == (" Paris.\n", "")


def test_stream_json_joins_the_messages(
    fake_router: tuple[str, FakeGeneration], capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = fake_router
    assert main(["generate", "Hello", "--target", target, "--stream", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "request_id": "req-2",
        "text": " Paris.",
        "token_ids": [5, 6, 7],
        "finish_reason": "FINISH_REASON_LENGTH",
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "cached_prompt_tokens": 2},
    }


@pytest.mark.parametrize(
    ("mode", "partial"), [([], ""), (["--stream"], " Par\n"), (["--stream", "--json"], "")]
)
def test_grpc_error_exits_1_with_code_and_details(
    fake_router: tuple[str, FakeGeneration], capsys: pytest.CaptureFixture[str], mode: list[str], partial: str
) -> None:
    target, _ = fake_router
    assert main(["generate", BAD_PROMPT, "--target", target, *mode]) == 1
    assert capsys.readouterr() == (partial, f"error: INVALID_ARGUMENT: {BAD_DETAILS}\n")
