"""``DecodeService.CancelCompletion`` against a real :class:`EngineLoop` driving a scripted
core: input checks, idempotence, the cancelled completion's last message, and a cancel that
comes before the request has forked (it waits; an abort by index then would drop the whole
request)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from decode_service.service import DecodeService
from engine.engine_loop import EngineLoop, LoadSnapshot
from engine.metrics import ProcessMetrics
from engine.request import EngineOutput, Request
from tandem.v1 import generation_pb2, worker_pb2

MAX_TOKENS = 40


@dataclass
class ScriptedCore:
    """Each step gives one token to every live completion; a request forks into its
    ``n`` completions at the first step after ``fork`` is set. ``abort_request`` behaves
    like the scheduler's: by index once forked, the whole request before."""

    fork: threading.Event = field(default_factory=threading.Event)
    last_num_scheduled_tokens: int = 1
    unforked: dict[str, int] = field(default_factory=dict)  # rid -> n
    live: dict[tuple[str, int], int] = field(default_factory=dict)  # (rid, index) -> tokens so far
    aborts: list[tuple[str, int | None]] = field(default_factory=list)

    def add_request(self, request: Request) -> None:
        self.unforked[request.req_id] = request.sampling.n

    def has_unfinished_requests(self) -> bool:
        return bool(self.unforked or self.live)

    def abort_request(self, req_id: str, index: int | None = None) -> bool:
        self.aborts.append((req_id, index))
        if self.unforked.pop(req_id, None) is not None:
            return True
        keys = [k for k in self.live if k[0] == req_id and index in (None, k[1])]
        for k in keys:
            del self.live[k]
        return bool(keys)

    def step(self) -> list[EngineOutput]:
        time.sleep(0.002)
        if self.fork.is_set():
            for rid, n in self.unforked.items():
                self.live.update({(rid, i): 0 for i in range(n)})
            self.unforked.clear()
        outputs = []
        for (rid, index), count in list(self.live.items()):
            finished = count + 1 == MAX_TOKENS
            outputs.append(
                EngineOutput(rid, [100 + count], finished, "length" if finished else None, index=index)
            )
            if finished:
                del self.live[(rid, index)]
            else:
                self.live[(rid, index)] = count + 1
        return outputs

    @property
    def scheduler(self) -> Any:
        return self  # ``DecodeService._abort`` releases a reservation first

    def release_reservation(self, req_id: str) -> bool:
        return False


class FakeRuntime:
    def __init__(self, core: ScriptedCore) -> None:
        self.loop = EngineLoop(core, lambda c: LoadSnapshot())
        self.config = type("Config", (), {"colocated": True})()
        self.eos_token_ids = (2,)
        self.metrics = ProcessMetrics("decode")
        self.background: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


class FakeReceiver:
    def forget(self, rid: str) -> None:
        pass

    async def quiesce(self, rid: str) -> None:
        pass


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@pytest.fixture
def core() -> ScriptedCore:
    return ScriptedCore()


def run(core: ScriptedCore, body: Any) -> Any:
    async def main() -> Any:
        runtime = FakeRuntime(core)
        runtime.loop.start()
        service = DecodeService(runtime)  # type: ignore[arg-type]
        service.attach(FakeReceiver(), "")  # type: ignore[arg-type]
        try:
            return await body(service)
        finally:
            runtime.loop.stop()

    return asyncio.run(main())


def generate(service: DecodeService, request_id: str, n: int) -> AsyncIterator[worker_pb2.DecodeResponse]:
    sampling = generation_pb2.SamplingParams(max_tokens=MAX_TOKENS, n=n, ignore_eos=True)
    request = worker_pb2.LocalGenerateRequest(
        request_id=request_id, prompt_token_ids=[5, 6, 7], sampling=sampling
    )
    return service.Generate(request, FakeContext())  # type: ignore[arg-type]


async def cancel(service: DecodeService, request_id: str, index: int) -> bool:
    request = worker_pb2.CancelCompletionRequest(request_id=request_id, index=index)
    return (await service.CancelCompletion(request, FakeContext())).known  # type: ignore[arg-type]


def by_index(msgs: list[worker_pb2.DecodeResponse]) -> Iterator[tuple[int, list[int], list[int]]]:
    """(index, its tokens, its finish reasons) per completion."""
    for i in sorted({m.index for m in msgs}):
        mine = [m for m in msgs if m.index == i]
        yield i, [t for m in mine for t in m.token_ids], [m.finish_reason for m in mine if m.finish_reason]


def test_cancel_before_the_fork_waits_for_it(core: ScriptedCore) -> None:
    async def body(service: DecodeService) -> list[worker_pb2.DecodeResponse]:
        stream = generate(service, "r1", 3)
        first = asyncio.ensure_future(anext(stream))
        while service._streams.get("r1") is None:
            await asyncio.sleep(0.001)
        assert await cancel(service, "r1", 1)
        await asyncio.sleep(0.05)
        assert core.aborts == []  # not forked yet: an abort by index would drop the request
        core.fork.set()
        return [await first] + [m async for m in stream]

    msgs = run(core, body)
    rid, index = core.aborts[0]
    assert rid.startswith("r1#") and index == 1
    assert [i for _, i in core.aborts if i is not None] == [1]
    results = list(by_index(msgs))
    assert [r[0] for r in results] == [0, 1, 2]
    for i, tokens, reasons in results:
        if i == 1:
            assert reasons == [generation_pb2.FINISH_REASON_ABORT] and len(tokens) <= 2
        else:
            assert reasons == [generation_pb2.FINISH_REASON_LENGTH]
            assert tokens == [100 + k for k in range(MAX_TOKENS)]
    assert msgs[-1].finish_reason  # the stream ended after the last completion's last message


def test_cancel_while_running_and_input_checks(core: ScriptedCore) -> None:
    core.fork.set()

    async def body(service: DecodeService) -> list[worker_pb2.DecodeResponse]:
        assert not await cancel(service, "nobody", 0)
        with pytest.raises(Aborted) as info:
            await cancel(service, "", 0)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details.startswith("request_id: ")
        stream = generate(service, "r2", 2)
        msgs = [await anext(stream)]  # forked
        with pytest.raises(Aborted) as info:
            await cancel(service, "r2", 2)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details.startswith("index: ")
        assert await cancel(service, "r2", 0)
        assert await cancel(service, "r2", 0)  # idempotent: aborted once
        msgs += [m async for m in stream]
        assert not await cancel(service, "r2", 1)  # the stream has ended
        return msgs

    msgs = run(core, body)
    assert [index for _, index in core.aborts if index is not None] == [0]  # once
    (_, tokens0, reasons0), (_, tokens1, reasons1) = by_index(msgs)
    assert reasons0 == [generation_pb2.FINISH_REASON_ABORT] and len(tokens0) < MAX_TOKENS // 2
    assert reasons1 == [generation_pb2.FINISH_REASON_LENGTH] and len(tokens1) == MAX_TOKENS
