"""``cli.bench.runner`` against a fake ``Generation`` server on loopback: open and closed
loops, bounds, drain timeout, stop (Ctrl-C), failures by status code."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pytest

from cli.bench import workload
from cli.bench.runner import RequestRecord, Runner, RunResult, RunSpec, build_request
from cli.bench.workload import BenchRequest, LengthDist
from tandem.v1 import generation_pb2, generation_pb2_grpc


@dataclass
class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """Streams ``max_tokens`` tokens: the first after ``ttft_s``, then one per ``itl_s``.

    A request whose id ends in ``-<i>`` with ``i`` in ``fail`` is aborted with that code.
    Records what it received, the most streams open at once, and client cancellations.
    """

    ttft_s: float = 0.01
    itl_s: float = 0.005
    fail: dict[int, grpc.StatusCode] = field(default_factory=dict)
    vocab_size: int = 100
    max_model_len: int = 128
    received: list[generation_pb2.GenerateRequest] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    cancelled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def GetModelInfo(self, request, context):
        return generation_pb2.ModelInfo(
            model_name="fake", architecture="Fake", max_model_len=self.max_model_len,
            vocab_size=self.vocab_size, block_size=16, dtype="float32",
        )  # fmt: skip

    def GenerateStream(self, request, context):
        with self.lock:
            self.received.append(request)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            index = int(request.request_id.rsplit("-", 1)[1])
            if index in self.fail:
                context.abort(self.fail[index], f"fake failure of {index}")
            n = request.sampling.max_tokens
            for i in range(n):
                time.sleep(self.ttft_s if i == 0 else self.itl_s)
                if not context.is_active():
                    with self.lock:
                        self.cancelled += 1
                    return
                last = i == n - 1
                yield generation_pb2.GenerateStreamResponse(
                    request_id=request.request_id, token_ids=[i % self.vocab_size], text="x",
                    finish_reason=generation_pb2.FINISH_REASON_LENGTH if last else generation_pb2.FINISH_REASON_UNSPECIFIED,
                    usage=generation_pb2.Usage(
                        prompt_tokens=len(request.prompt_token_ids) or 7, completion_tokens=n,
                        cached_prompt_tokens=3,
                    ) if last else None,
                )  # fmt: skip
        finally:
            with self.lock:
                self.active -= 1


@contextmanager
def fake_router() -> Iterator[tuple[FakeGeneration, str]]:
    """A fake router on 127.0.0.1; yields (servicer, address)."""
    servicer = FakeGeneration()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture
def fake() -> Iterator[tuple[FakeGeneration, str]]:
    with fake_router() as servicer_and_address:
        yield servicer_and_address


def requests(output_len: int = 4, input_len: int = 8) -> Iterator[BenchRequest]:
    return workload.synthetic_requests(0, 100, LengthDist.fixed(input_len), LengthDist.fixed(output_len))


def run(
    address: str, spec: RunSpec, reqs: Iterator[BenchRequest], stop_after: float | None = None
) -> RunResult:
    async def main() -> RunResult:
        stop = asyncio.Event()
        if stop_after is not None:
            asyncio.get_running_loop().call_later(stop_after, stop.set)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            arrivals = workload.poisson_arrivals(spec.request_rate, spec.seed) if spec.request_rate else None
            done: list[int] = []
            result = await Runner(
                stub, spec, reqs, arrivals, stop, on_done=lambda r: done.append(r.index)
            ).run()
        assert sorted(done) == sorted(r.index for r in result.records)  # on_done once per record
        return result

    return asyncio.run(main())


def assert_well_formed(record: RequestRecord, output_len: int) -> None:
    assert record.status == "completed" and record.code == "OK" and record.error == ""
    assert len(record.token_times) == output_len
    times = [record.send_time, *record.token_times, record.end_time]
    assert times == sorted(times) and record.send_time >= 0


def test_build_request() -> None:
    ids = BenchRequest(3, (5, 6, 7), None, 3, 9)
    greedy = build_request(ids, "id-3", RunSpec(request_rate=1.0, num_requests=1, seed=40))
    assert list(greedy.prompt_token_ids) == [5, 6, 7] and greedy.prompt == "" and greedy.request_id == "id-3"
    assert (greedy.sampling.max_tokens, greedy.sampling.ignore_eos, greedy.sampling.temperature) == (
        9,
        True,
        0.0,
    )
    assert not greedy.sampling.HasField("seed")
    text = BenchRequest(3, None, "hello", 1, 2)
    sampled = build_request(text, "id-3", RunSpec(concurrency=1, num_requests=1, seed=40, temperature=0.5))
    assert sampled.prompt == "hello" and not sampled.prompt_token_ids
    assert (sampled.sampling.seed, sampled.sampling.temperature) == (43, 0.5)
    with pytest.raises(ValueError):
        RunSpec(request_rate=1.0, concurrency=2, num_requests=1)
    with pytest.raises(ValueError):
        RunSpec(request_rate=1.0)


def test_open_loop_burst_sends_every_request(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    result = run(address, RunSpec(request_rate=float("inf"), num_requests=10), requests())
    assert [r.index for r in result.records] == list(range(10))
    for r in result.records:
        assert_well_formed(r, 4)
        assert (r.prompt_len, r.output_len, r.cached_prompt_tokens) == (8, 4, 3)
    assert len({r.request_id for r in result.records}) == 10
    assert servicer.max_active == 10  # a burst: all in flight together
    sent = [list(q.prompt_token_ids) for q in sorted(servicer.received, key=lambda q: q.request_id)]
    expected = [list(r.prompt_token_ids or ()) for r in itertools.islice(requests(), 10)]
    assert sorted(sent) == sorted(expected)
    assert not result.interrupted and result.duration_s >= max(r.end_time for r in result.records)


def test_open_loop_follows_arrivals_and_duration(fake: tuple[FakeGeneration, str]) -> None:
    _, address = fake
    spec = RunSpec(request_rate=40.0, duration_s=0.5, seed=3)
    offsets = list(itertools.takewhile(lambda t: t < 0.5, workload.poisson_arrivals(40.0, seed=3)))
    result = run(address, spec, requests())
    assert len(result.records) == len(offsets)
    for record, offset in zip(result.records, offsets, strict=True):
        assert offset <= record.send_time < offset + 0.15
        assert_well_formed(record, 4)


def test_closed_loop_keeps_concurrency(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    result = run(address, RunSpec(concurrency=3, num_requests=9), requests())
    assert sorted(r.index for r in result.records) == list(range(9))
    assert servicer.max_active == 3
    for r in result.records:
        assert_well_formed(r, 4)


def test_closed_loop_duration_bound(fake: tuple[FakeGeneration, str]) -> None:
    _, address = fake  # each request takes about 0.01 + 3 * 0.005 s
    result = run(address, RunSpec(concurrency=2, duration_s=0.3), requests())
    assert 6 <= len(result.records) <= 24
    assert all(r.send_time < 0.3 and r.status == "completed" for r in result.records)


def test_failures_are_recorded_by_code(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    servicer.fail = {1: grpc.StatusCode.RESOURCE_EXHAUSTED, 4: grpc.StatusCode.INVALID_ARGUMENT}
    result = run(address, RunSpec(concurrency=2, num_requests=6), requests())
    by_index = {r.index: r for r in result.records}
    assert {i: (r.status, r.code) for i, r in by_index.items() if r.status != "completed"} == {
        1: ("failed", "RESOURCE_EXHAUSTED"), 4: ("failed", "INVALID_ARGUMENT")}  # fmt: skip
    assert by_index[1].error == "fake failure of 1" and by_index[1].token_times == []


def test_drain_timeout_cancels_in_flight(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    servicer.itl_s = 0.2  # 20 tokens take 4 s
    start = time.monotonic()
    result = run(
        address, RunSpec(request_rate=float("inf"), num_requests=3, drain_timeout_s=0.3), requests(20)
    )
    assert time.monotonic() - start < 2.0
    assert [(r.status, r.code) for r in result.records] == [("cancelled", "CANCELLED")] * 3
    assert all(0 < len(r.token_times) < 20 and r.end_time >= 0.3 for r in result.records)
    assert not result.interrupted
    deadline = time.monotonic() + 2
    while servicer.cancelled < 3 and time.monotonic() < deadline:  # the server sees the cancellations
        time.sleep(0.05)
    assert servicer.cancelled == 3


def test_stop_cancels_and_stops_sending(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    servicer.itl_s = 0.1
    spec = RunSpec(request_rate=20.0, num_requests=1000, seed=1)
    start = time.monotonic()
    result = run(address, spec, requests(50), stop_after=0.4)
    assert time.monotonic() - start < 2.0
    assert result.interrupted
    assert 1 <= len(result.records) < 30
    assert {r.status for r in result.records} == {"cancelled"}
    assert len(servicer.received) == len(result.records)


def test_request_timeout_is_deadline_exceeded(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    servicer.itl_s = 0.1
    result = run(address, RunSpec(concurrency=1, num_requests=1, request_timeout_s=0.2), requests(20))
    (record,) = result.records
    assert (record.status, record.code) == ("failed", "DEADLINE_EXCEEDED")
    assert 1 <= len(record.token_times) < 20
