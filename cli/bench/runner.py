"""Drives ``tandem.v1.Generation/GenerateStream`` with ``grpc.aio`` and records timings.

One run:

1. **Send.** Open loop (``request_rate``): request ``i`` is sent at its arrival offset,
   whether or not earlier requests finished. Closed loop (``concurrency``): ``C``
   workers each send their next request as soon as their previous one ends. Sending
   stops after ``num_requests`` requests or once ``duration_s`` has passed (open loop:
   once the next arrival offset reaches it), whichever comes first, or when ``stop``
   is set (Ctrl-C).
2. **Drain.** Requests in flight get ``drain_timeout_s`` more seconds to finish.
3. **Cancel.** What is still in flight then (or at once when ``stop`` is set) is
   cancelled on the client, which cancels the RPC at the router; those requests are
   recorded as ``cancelled``.

Every sent request gets exactly one :class:`RequestRecord`. Times are seconds of
``time.perf_counter`` measured from the start of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from cli.bench.workload import BenchRequest

if TYPE_CHECKING:
    from tandem.v1 import generation_pb2, generation_pb2_grpc

Status = Literal["completed", "failed", "cancelled"]


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds from the start of the run.

    Attributes:
        index: the request's workload index.
        request_id: the id sent to the router.
        prompt_len: prompt tokens (the router's ``usage.prompt_tokens`` once known).
        output_len: ``max_tokens`` asked for.
        group: shared-prefix group, or ``None``.
        send_time: when the call was started.
        token_times: arrival time of each generated token, in order (tokens of one
            stream message share its arrival time).
        end_time: when the stream ended, failed or was cancelled.
        status: ``completed``, ``failed`` or ``cancelled`` (by this client).
        code: gRPC status code name (``OK`` when completed).
        error: the status details of a failure (empty otherwise).
        cached_prompt_tokens: ``usage.cached_prompt_tokens`` of a completed request.
    """

    index: int
    request_id: str
    prompt_len: int
    output_len: int
    group: int | None = None
    send_time: float = math.nan
    token_times: list[float] = field(default_factory=list)
    end_time: float = math.nan
    status: Status = "cancelled"
    code: str = "CANCELLED"
    error: str = ""
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class RunSpec:
    """How one run sends; exactly one of ``request_rate`` and ``concurrency`` is set.

    Attributes:
        request_rate: Poisson arrivals per second (``inf``: all at once).
        concurrency: closed-loop workers.
        num_requests: most requests to send (``None``: no bound).
        duration_s: stop sending after this many seconds (``None``: no bound).
        drain_timeout_s: seconds in-flight requests get after sending stops.
        request_timeout_s: gRPC deadline of each request (``None``: none).
        temperature: sampling temperature (0: greedy); request ``i`` uses seed ``seed + i``.
        seed: seed of arrivals, of request contents and of sampling.
    """

    request_rate: float | None = None
    concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    drain_timeout_s: float = 60.0
    request_timeout_s: float | None = None
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.request_rate is None) == (self.concurrency is None):
            raise ValueError("exactly one of request_rate and concurrency is set")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("a run needs num_requests or duration_s")


@dataclass
class RunResult:
    """Records of every sent request (in send order) and the run's wall time in seconds."""

    spec: RunSpec
    records: list[RequestRecord]
    duration_s: float
    interrupted: bool


def build_request(req: BenchRequest, request_id: str, spec: RunSpec) -> generation_pb2.GenerateRequest:
    """The ``GenerateRequest`` of ``req``: ``max_tokens = output_len`` with ``ignore_eos``."""
    from tandem.v1 import generation_pb2

    sampling = generation_pb2.SamplingParams(
        max_tokens=req.output_len, temperature=spec.temperature, ignore_eos=True
    )
    if spec.temperature > 0:
        sampling.seed = spec.seed + req.index
    if req.prompt_token_ids is not None:
        return generation_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=req.prompt_token_ids, sampling=sampling
        )
    return generation_pb2.GenerateRequest(request_id=request_id, prompt=req.prompt or "", sampling=sampling)


class Runner:
    """Sends one run's requests over ``stub`` and records them.

    Args:
        stub: a ``grpc.aio`` ``GenerationStub``.
        spec: how to send.
        requests: the workload (only as many items as the bounds allow are taken).
        arrivals: send offsets in seconds (open loop only).
        stop: set to end the run early (sending stops and in-flight calls are cancelled).
        on_done: called with each finished record (e.g. a progress bar).
    """

    def __init__(
        self,
        stub: generation_pb2_grpc.GenerationStub,
        spec: RunSpec,
        requests: Iterator[BenchRequest],
        arrivals: Iterator[float] | None,
        stop: asyncio.Event,
        on_done: Callable[[RequestRecord], None] = lambda record: None,
    ) -> None:
        self.stub = stub
        self.spec = spec
        self.requests = itertools.islice(requests, spec.num_requests)
        self.arrivals = arrivals
        self.stop = stop
        self.on_done = on_done
        self.records: list[RequestRecord] = []
        self.run_id = uuid.uuid4().hex[:8]
        self.t0 = 0.0

    def clock(self) -> float:
        """Seconds since the start of the run."""
        return time.perf_counter() - self.t0

    async def run(self) -> RunResult:
        """Send, drain, cancel (see the module docstring); returns every record."""
        self.t0 = time.perf_counter()
        if self.spec.concurrency is not None:
            tasks = {asyncio.create_task(self._worker()) for _ in range(self.spec.concurrency)}
            await self._wait(tasks, self.spec.duration_s)
        else:
            tasks = set()
            await self._send_open_loop(tasks)
        await self._wait(tasks, self.spec.drain_timeout_s)
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                raise outcome
        return RunResult(self.spec, self.records, self.clock(), self.stop.is_set())

    def _sending(self) -> bool:
        duration = self.spec.duration_s
        return not self.stop.is_set() and (duration is None or self.clock() < duration)

    async def _send_open_loop(self, tasks: set[asyncio.Task[None]]) -> None:
        assert self.arrivals is not None
        for req, offset in zip(self.requests, self.arrivals, strict=False):
            if self.spec.duration_s is not None and offset >= self.spec.duration_s:
                return
            delay = offset - self.clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
            if self.stop.is_set():
                return
            tasks.add(asyncio.create_task(self._call(req)))

    async def _worker(self) -> None:
        while self._sending():
            req = next(self.requests, None)
            if req is None:
                return
            await self._call(req)

    async def _wait(self, tasks: set[asyncio.Task[None]], timeout: float | None) -> None:
        """Until every task is done, ``timeout`` seconds pass, or ``stop`` is set."""
        pending = {t for t in tasks if not t.done()}
        if not pending or self.stop.is_set():
            return
        deadline = None if timeout is None else time.perf_counter() + timeout
        stopper = asyncio.create_task(self.stop.wait())
        try:
            while pending and not stopper.done():
                remaining = None if deadline is None else deadline - time.perf_counter()
                if remaining is not None and remaining <= 0:
                    return
                done, _ = await asyncio.wait(
                    {*pending, stopper}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
        finally:
            stopper.cancel()

    async def _call(self, req: BenchRequest) -> None:
        import grpc

        record = RequestRecord(
            req.index, f"bench-{self.run_id}-{req.index}", req.prompt_len, req.output_len, req.group
        )
        self.records.append(record)
        request = build_request(req, record.request_id, self.spec)
        record.send_time = self.clock()
        call = self.stub.GenerateStream(request, timeout=self.spec.request_timeout_s)
        try:
            async for message in call:
                now = self.clock()
                record.token_times.extend(now for _ in message.token_ids)
                if message.HasField("usage"):
                    record.prompt_len = message.usage.prompt_tokens
                    record.cached_prompt_tokens = message.usage.cached_prompt_tokens
            record.status, record.code = "completed", "OK"
        except grpc.aio.AioRpcError as error:
            record.status, record.code, record.error = "failed", error.code().name, error.details() or ""
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            record.end_time = self.clock()
            self.on_done(record)
