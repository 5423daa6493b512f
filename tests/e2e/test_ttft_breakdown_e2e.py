"""TTFT broken down into queue, prefill compute and KV transfer, end to end through
real processes, with the prefill engine saturated.

``--max-num-batched-tokens 4`` and 160-token prompts: a prompt takes 40 chunked
steps and fills every step's budget, so the prefill engine computes one prompt at
a time and concurrent prompts wait in its queue. Then:

- each ``PrefillResponse`` (worker RPCs called directly, as the router does)
  reports its engine queue, prefill compute and transfer seconds; they add up to
  no more than the call's wall time, and the prompt computed last waited at least
  one whole prefill in the engine queue;
- through the router, ``tandem_request_queue_seconds`` (router wait plus engine
  queue), ``tandem_request_prefill_seconds`` and
  ``tandem_request_kv_transfer_seconds`` get one sample per request, their sums add
  up to no more than the TTFTs the client measured, and the prefill worker's
  ``tandem_engine_queue_seconds`` counts the same requests; each request's router
  span (exported over OTLP) carries its phases, which add up to no more than its
  client-measured TTFT;
- the same on a colocated worker (``Generate``'s first message), without transfer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tandem.v1 import generation_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import Stack
from tests.helpers.checkpoints import make_tiny_llama
from tests.helpers.metrics import scrape_metric
from tests.helpers.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.e2e

BUDGET = 4
PROMPT_LEN = 160  # 40 steps of BUDGET tokens: one prompt fills the engine
N = 3
SLACK_S = 0.05  # per request: clocks of different processes, gRPC hand-offs
SERVE_FLAGS = ["--max-num-batched-tokens", str(BUDGET), "--no-enable-prefix-caching"]
PHASES = ("request_queue", "request_prefill", "request_kv_transfer", "time_to_first_token")


def prompts(seed: int) -> list[list[int]]:
    """``N`` distinct prompts (ids in ``[2, 500)``)."""
    return [[(7 * i + 13 * k + seed) % 498 + 2 for i in range(PROMPT_LEN)] for k in range(N)]


def start_stack(model: Path, run_dir: Path, redis_url: str, *flags: str) -> Stack:
    return Stack(model, run_dir, redis_url, [*SERVE_FLAGS, *flags]).start()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("ttft") / "model", seed=5)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def stack(
    model: Path, receiver: OtlpReceiver, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with mock.patch.dict(os.environ, {"OTEL_BSP_SCHEDULE_DELAY": "100"}):  # export spans every 100 ms
        s = start_stack(
            model,
            tmp_path_factory.mktemp("ttft-stack"),
            redis_server.url,
            *("--otel-exporter-otlp-endpoint", receiver.endpoint),
        )
    yield s
    assert s.stop() == 0


def histogram(process: dict[str, Any], name: str) -> tuple[float, float]:
    """``(count, sum)`` of an unlabelled histogram of one process."""
    address = process["metrics_address"]
    return scrape_metric(address, f"{name}_count"), scrape_metric(address, f"{name}_sum")


def router_phases(
    stack: Stack, wait_for: dict[str, tuple[float, float]] | None = None
) -> dict[str, tuple[float, float]]:
    """``(count, sum)`` of the router's TTFT histograms; with ``wait_for`` (an earlier reading),
    once its TTFT count grew by ``N`` (the router records it as each request ends)."""
    deadline = time.monotonic() + 10.0
    while True:
        phases = {name: histogram(stack.cluster["router"], f"tandem_{name}_seconds") for name in PHASES}
        ttft = "time_to_first_token"
        if wait_for is None or phases[ttft][0] >= wait_for[ttft][0] + N or time.monotonic() > deadline:
            return phases
        time.sleep(0.05)


def client_ttfts(stack: Stack, batch: list[list[int]], request_ids: list[str] | None = None) -> list[float]:
    """Send ``batch`` through the router at once (``GenerateStream``); each request's
    seconds from the call to its first message. Call :func:`warm_up` first: the first
    requests through a fresh router may meet one-time costs that spread their arrivals."""

    def one(prompt: list[int], request_id: str) -> float:
        request = generation_pb2.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=generation_pb2.SamplingParams(max_tokens=2, ignore_eos=True),
        )
        started = time.perf_counter()
        stream = stack.stub.GenerateStream(request, timeout=60)
        ttft = None
        tokens = 0
        for msg in stream:
            ttft = time.perf_counter() - started if ttft is None else ttft
            tokens += len(msg.token_ids)
        assert tokens == 2 and ttft is not None
        return ttft

    with ThreadPoolExecutor(N) as pool:
        return list(pool.map(one, batch, request_ids or [""] * len(batch)))


def warm_up(stack: Stack) -> None:
    """One request through the router (channels to the workers, first-use costs)."""
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=[5, 6, 7], sampling=generation_pb2.SamplingParams(max_tokens=2, ignore_eos=True)
    )
    assert len(stack.stub.Generate(request, timeout=60).token_ids) == 2


def test_prefill_response_reports_the_engine_queue_of_a_saturated_worker(stack: Stack) -> None:
    prefill, decode = stack.processes("prefill")[0], stack.processes("decode")[0]
    with stack.worker_channel(prefill) as p_channel, stack.worker_channel(decode) as d_channel:
        p_stub, d_stub = (
            worker_pb2_grpc.PrefillWorkerStub(p_channel),
            worker_pb2_grpc.DecodeWorkerStub(d_channel),
        )
        reserved = [
            d_stub.Reserve(
                worker_pb2.ReserveRequest(
                    request_id=f"q-{k}", num_prompt_tokens=PROMPT_LEN, max_tokens=2, lease_ms=60_000
                ),
                timeout=30,
            )
            for k in range(N)
        ]
        sent = time.perf_counter()
        calls = [
            p_stub.Prefill.future(
                worker_pb2.PrefillRequest(
                    request_id=f"q-{k}",
                    prompt_token_ids=prompt,
                    sampling=generation_pb2.SamplingParams(max_tokens=2, ignore_eos=True),
                    destination=reserved[k].destination,
                ),
                timeout=60,
            )
            for k, prompt in enumerate(prompts(seed=0))
        ]
        done_at: dict[int, float] = {}
        for k, call in enumerate(calls):
            call.add_done_callback(lambda _c, k=k: done_at.setdefault(k, time.perf_counter()))
        replies = [call.result() for call in calls]
        for k, r in enumerate(reserved):
            d_stub.Release(
                worker_pb2.ReleaseRequest(
                    request_id=f"q-{k}",
                    reservation_id=r.destination.reservation_id,
                    epoch=r.destination.epoch,
                ),
                timeout=30,
            )
    for k, reply in enumerate(replies):
        queue, compute, transfer = (
            reply.engine_queue_seconds,
            reply.engine_prefill_seconds,
            reply.transfer_seconds,
        )
        assert queue >= 0.0 and compute > 0.0 and transfer > 0.0, reply
        # The engine's phases lie inside the worker's own wall time, which lies inside the call.
        assert queue + compute <= reply.prefill_seconds + 0.005, reply
        assert queue + compute + transfer <= done_at[k] - sent + SLACK_S, (k, reply)
    # One prompt at a time: the prompt computed last waited for (at least) another's whole prefill.
    queues = sorted(r.engine_queue_seconds for r in replies)
    assert queues[-1] >= min(r.engine_prefill_seconds for r in replies), queues
    assert queues[-1] > 0.01, queues
    assert stack.wait_blocks_free() == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}


def router_spans(receiver: OtlpReceiver, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Attributes of each request's router span (the ``Generation`` server span), once exported."""

    def roots(spans: list[Any]) -> dict[str, dict[str, Any]]:
        return {
            str(s.attributes["gen_ai.response.id"]): s.attributes
            for s in spans
            if s.service == "tandem-router" and s.attributes.get("gen_ai.response.id") in request_ids
        }

    return roots(receiver.wait_for(lambda spans: len(roots(spans)) == len(request_ids), timeout_s=30.0))


def test_router_histograms_and_spans_split_ttft_into_queue_prefill_and_transfer(
    stack: Stack, receiver: OtlpReceiver
) -> None:
    prefill = stack.processes("prefill")[0]
    warm_up(stack)
    before, engine_before = router_phases(stack), histogram(prefill, "tandem_engine_queue_seconds")
    request_ids = [f"ttft-{k}" for k in range(N)]
    ttfts = client_ttfts(stack, prompts(seed=100), request_ids)
    after, engine_after = router_phases(stack, before), histogram(prefill, "tandem_engine_queue_seconds")
    count = {name: after[name][0] - before[name][0] for name in PHASES}
    total = {name: after[name][1] - before[name][1] for name in PHASES}
    assert count == dict.fromkeys(PHASES, N)
    assert engine_after[0] - engine_before[0] == N
    engine_queue_sum = engine_after[1] - engine_before[1]
    # The router's queue is its own wait plus the worker's engine queue.
    assert engine_queue_sum <= total["request_queue"] + 1e-9
    # (How long the engine queue is here depends on how close together the router passes
    # the requests on; that it is measured is shown by the direct-call test above.)
    phases = total["request_queue"] + total["request_prefill"] + total["request_kv_transfer"]
    assert phases <= sum(ttfts) + N * SLACK_S, (total, ttfts)
    assert phases <= total["time_to_first_token"] + 1e-9, total  # the router's own TTFT clock
    # Each request's span: the same phases, within the TTFT its client measured.
    spans = router_spans(receiver, request_ids)
    assert sorted(spans) == request_ids
    for request_id, ttft in zip(request_ids, ttfts, strict=True):
        attrs = spans[request_id]
        phase = {
            name: float(attrs[f"tandem.phase.{name}_s"])
            for name in ("router_wait", "engine_queue", "prefill", "kv_transfer", "first_decode")
        }
        assert all(v >= 0.0 for v in phase.values()) and phase["prefill"] > 0.0, phase
        to_first_token = (
            phase["router_wait"] + phase["engine_queue"] + phase["prefill"] + phase["kv_transfer"]
        )
        assert to_first_token <= ttft + SLACK_S, (request_id, phase, ttft)


def test_colocated_worker_reports_its_queue_and_prefill(
    model: Path, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    s = start_stack(model, tmp_path_factory.mktemp("ttft-colo"), redis_server.url, "--colocated")
    try:
        worker = s.processes("colocated")[0]
        warm_up(s)
        before, engine_before = router_phases(s), histogram(worker, "tandem_engine_queue_seconds")
        ttfts = client_ttfts(s, prompts(seed=200))
        after, engine_after = router_phases(s, before), histogram(worker, "tandem_engine_queue_seconds")
    finally:
        assert s.stop() == 0
    count = {name: after[name][0] - before[name][0] for name in PHASES}
    total = {name: after[name][1] - before[name][1] for name in PHASES}
    assert count == {**dict.fromkeys(PHASES, N), "request_kv_transfer": 0}
    assert engine_after[0] - engine_before[0] == N
    engine_queue_sum = engine_after[1] - engine_before[1]
    assert engine_queue_sum <= total["request_queue"] + 1e-9
    assert total["request_queue"] + total["request_prefill"] <= sum(ttfts) + N * SLACK_S, (total, ttfts)
