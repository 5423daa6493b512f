"""One request's trip through the disaggregated pools, seen from the router.

Lifecycle (decode-first reservation, push model; ARCHITECTURE.md):
  1. pick a decode worker D and ``Reserve`` blocks for the prompt under a lease;
  2. pick a prefill worker P and call ``Prefill`` with D's ``KvDestination``: P
     computes the prompt, pushes the KV into D's blocks and samples token 0;
  3. yield token 0 to the client at once;
  4. unless the request already finished, call ``Decode`` on D and relay its
     tokens; otherwise ``Release`` the reservation.
Any failure or cancellation before step 4 releases the reservation (a shielded
``Release``; the lease frees it anyway if D cannot be reached); cancelling the
``Decode`` stream makes D abort the request and free its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import grpc

from engine.batch import TokenLogprobs
from engine.codec import finish_reason_from_pb, sampling_params_to_pb, token_logprobs_from_pb
from engine.errors import WorkerUnavailable
from engine.metrics import ProcessMetrics
from engine.tracing import annotate, span
from router.prefix_index import PrefixIndex, prefill_routing_request
from router.routing import RoutingPolicy, RoutingRequest, WorkerView, cached_tokens
from router.validation import ParsedRequest
from router.worker_pool import WorkerPool
from tandem.v1 import kv_pb2, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass
class TokenChunk:
    """New tokens of a request; the last chunk has ``finish_reason`` set.

    ``logprobs`` has one entry per token when the request asked for them.
    """

    token_ids: list[int]
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass
class _Reservation:
    stub: worker_pb2_grpc.DecodeWorkerStub
    destination: kv_pb2.KvDestination
    attempt_id: str
    handed_over: bool = False


class Orchestrator:
    """Drives requests through a prefill and a decode worker.

    Args:
        pool: healthy workers and their channels.
        policy: routing policy picking a worker of each pool.
        eos_token_ids: end-of-sequence ids of the model.
        max_model_len: longest prompt plus completion (tokens).
        lease_ms: lease asked for each decode reservation (milliseconds).
        prefix_index: the block-ownership index, consulted for the prefill
            pick when the policy uses it (``prefix``).
        metrics: counts ``tandem_routing_decisions_total`` (one per prefill pick) and
            observes ``tandem_request_queue_seconds``.
    """

    def __init__(
        self,
        pool: WorkerPool,
        policy: RoutingPolicy,
        *,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        lease_ms: int,
        prefix_index: PrefixIndex | None = None,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._prefix_index = prefix_index if policy.uses_prefix_index else None
        self._metrics = metrics
        self._eos = frozenset(eos_token_ids)
        self._max_model_len = max_model_len
        self._lease_ms = lease_ms
        self._background: set[asyncio.Task[None]] = set()

    async def generate(self, req: ParsedRequest, timeout_s: float | None) -> AsyncGenerator[TokenChunk, None]:
        """Yield ``req``'s tokens as they are produced.

        Args:
            timeout_s: seconds left of the client's deadline (None: no deadline);
                every downstream call gets what remains.

        Raises:
            WorkerUnavailable: no healthy worker in a pool.
            grpc.aio.AioRpcError: a worker failed the call (status passed on).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = None if timeout_s is None else loop.time() + timeout_s

        def remaining() -> float | None:
            return None if deadline is None else max(0.001, deadline - loop.time())

        routing = RoutingRequest(req.request_id, len(req.prompt_token_ids))
        colocated = self._pool.healthy(worker_pb2.WORKER_ROLE_COLOCATED)
        if colocated:  # the baseline deployment (`tandem serve --colocated`)
            async for chunk in self._generate_colocated(
                req, self._policy.pick(colocated, routing), remaining()
            ):
                yield chunk
            return
        # The prefill pick may wait on Redis; both picks' loads are then counted with no await between.
        with span("tandem.route"):
            prefill, prefill_tokens = await self._pick_prefill(req)
            decode = self._policy.pick(self._pool.healthy(worker_pb2.WORKER_ROLE_DECODE), routing)
            annotate({"route.decode_worker": decode.worker_id})
        n_prompt = len(req.prompt_token_ids)
        with self._pool.in_flight(decode.worker_id, n_prompt), contextlib.ExitStack() as prefill_load:
            prefill_load.enter_context(self._pool.in_flight(prefill.worker_id, prefill_tokens))
            # Unique per attempt, so that a release by request id touches nobody else's blocks.
            attempt_id = f"{req.request_id}.{uuid.uuid4().hex[:8]}"
            d_stub, reserved = await self._reserve(req, decode, routing, attempt_id, remaining())
            reservation = _Reservation(d_stub, reserved.destination, attempt_id)
            try:
                p_stub = worker_pb2_grpc.PrefillWorkerStub(self._pool.channel(prefill.worker_id))
                if self._metrics is not None:
                    self._metrics.request_queue.observe(loop.time() - started)
                prefilled = await p_stub.Prefill(
                    worker_pb2.PrefillRequest(
                        request_id=attempt_id,
                        prompt_token_ids=req.prompt_token_ids,
                        sampling=sampling_params_to_pb(req.sampling),
                        destination=reservation.destination,
                        cache_salt=req.cache_salt,
                    ),
                    timeout=remaining(),
                )
                prefill_load.close()  # P's share of the load ends with its call, not with decode
                first = prefilled.first_token_id
                finish = self._finish_after_first_token(req, first)
                first_logprobs = (
                    [token_logprobs_from_pb(prefilled.first_token_logprobs)]
                    if prefilled.HasField("first_token_logprobs")
                    else []
                )
                yield TokenChunk([first], finish, prefilled.num_cached_tokens, first_logprobs)
                if finish is not None:
                    return
                reservation.handed_over = True
                async with contextlib.aclosing(self._decode(req, reservation, first, remaining())) as chunks:
                    async for chunk in chunks:
                        yield chunk
            finally:
                if not reservation.handed_over:
                    self._release_in_background(
                        d_stub,
                        worker_pb2.ReleaseRequest(
                            request_id=attempt_id,
                            reservation_id=reservation.destination.reservation_id,
                            epoch=reservation.destination.epoch,
                        ),
                    )

    async def _generate_colocated(
        self, req: ParsedRequest, worker: WorkerView, timeout_s: float | None
    ) -> AsyncGenerator[TokenChunk, None]:
        """The whole request on one colocated worker; cancelling the call frees its blocks."""
        with self._pool.in_flight(worker.worker_id, len(req.prompt_token_ids)):
            stub = worker_pb2_grpc.DecodeWorkerStub(self._pool.channel(worker.worker_id))
            call = stub.Generate(
                worker_pb2.LocalGenerateRequest(
                    request_id=f"{req.request_id}.{uuid.uuid4().hex[:8]}",
                    prompt_token_ids=req.prompt_token_ids,
                    sampling=sampling_params_to_pb(req.sampling),
                ),
                timeout=timeout_s,
            )
            try:
                async for msg in call:
                    finish = finish_reason_from_pb(msg.finish_reason)
                    logprobs = [token_logprobs_from_pb(lp) for lp in msg.logprobs]
                    yield TokenChunk(list(msg.token_ids), finish, logprobs=logprobs)
                    if finish is not None:
                        return
                raise WorkerUnavailable(f"colocated worker {worker.worker_id} ended the stream early")
            finally:
                call.cancel()

    async def _pick_prefill(self, req: ParsedRequest) -> tuple[WorkerView, int]:
        """Pick a prefill worker, with the prompt's cached prefix per worker when the policy uses it.

        Returns:
            The worker and the prompt tokens it will compute (its cached prefix excluded).
        """
        candidates = self._pool.healthy(worker_pb2.WORKER_ROLE_PREFILL)
        routing = await prefill_routing_request(
            self._prefix_index, req.request_id, req.prompt_token_ids, req.cache_salt, candidates
        )
        chosen = self._policy.pick(candidates, routing)
        reason = self._policy.reason(chosen, routing)
        annotate(
            {
                "route.policy": self._policy.name,
                "route.reason": reason,
                "route.prefill_worker": chosen.worker_id,
                "route.cached_prefix_tokens": cached_tokens(chosen, routing),
            }
        )
        if self._metrics is not None:
            self._metrics.routing_decisions.labels(policy=self._policy.name, reason=reason).inc()
        return chosen, len(req.prompt_token_ids) - cached_tokens(chosen, routing)

    async def _reserve(
        self,
        req: ParsedRequest,
        first: WorkerView,
        routing: RoutingRequest,
        attempt_id: str,
        timeout_s: float | None,
    ) -> tuple[worker_pb2_grpc.DecodeWorkerStub, worker_pb2.ReserveResponse]:
        """``Reserve`` on ``first``; a decode worker that is UNAVAILABLE (e.g. just died,
        not yet dropped by the health check) is skipped for another, up to 3 tries.
        Nothing has reached the client yet, so the retry is invisible to it."""
        tried: set[str] = set()
        worker = first
        while True:
            stub = worker_pb2_grpc.DecodeWorkerStub(self._pool.channel(worker.worker_id))
            try:
                reply = await stub.Reserve(
                    worker_pb2.ReserveRequest(
                        request_id=attempt_id,
                        num_prompt_tokens=len(req.prompt_token_ids),
                        max_tokens=req.sampling.max_tokens,
                        lease_ms=self._lease_ms,
                    ),
                    timeout=timeout_s,
                )
                return stub, reply
            except grpc.aio.AioRpcError as exc:
                # The reservation may exist without us knowing its id: release by request id.
                self._release_in_background(stub, worker_pb2.ReleaseRequest(request_id=attempt_id))
                tried.add(worker.worker_id)
                others = [
                    w for w in self._pool.healthy(worker_pb2.WORKER_ROLE_DECODE) if w.worker_id not in tried
                ]
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not others or len(tried) >= 3:
                    raise
                logger.warning(
                    "decode worker %s unavailable for %s: trying another", worker.worker_id, attempt_id
                )
                worker = self._policy.pick(others, routing)
            except BaseException:  # cancelled: same reasoning
                self._release_in_background(stub, worker_pb2.ReleaseRequest(request_id=attempt_id))
                raise

    def _finish_after_first_token(self, req: ParsedRequest, token_id: int) -> str | None:
        if (token_id in self._eos and not req.sampling.ignore_eos) or token_id in req.sampling.stop_token_ids:
            return "stop"
        if req.sampling.max_tokens <= 1 or len(req.prompt_token_ids) + 1 >= self._max_model_len:
            return "length"
        return None

    async def _decode(
        self, req: ParsedRequest, reservation: _Reservation, first_token: int, timeout_s: float | None
    ) -> AsyncGenerator[TokenChunk, None]:
        call = reservation.stub.Decode(
            worker_pb2.DecodeRequest(
                request_id=reservation.attempt_id,
                reservation_id=reservation.destination.reservation_id,
                epoch=reservation.destination.epoch,
                prompt_token_ids=req.prompt_token_ids,
                first_token_id=first_token,
                sampling=sampling_params_to_pb(req.sampling),
            ),
            timeout=timeout_s,
        )
        try:
            async for msg in call:
                finish = finish_reason_from_pb(msg.finish_reason)
                yield TokenChunk(
                    list(msg.token_ids), finish, logprobs=[token_logprobs_from_pb(lp) for lp in msg.logprobs]
                )
                if finish is not None:
                    return
            raise WorkerUnavailable(
                f"decode worker {reservation.destination.worker_id} ended the stream early"
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            raise WorkerUnavailable(  # the worker died or became unreachable mid-stream
                f"decode worker {reservation.destination.worker_id} failed mid-stream: {exc.details()}"
            ) from exc
        finally:
            call.cancel()

    def _release_in_background(
        self, stub: worker_pb2_grpc.DecodeWorkerStub, request: worker_pb2.ReleaseRequest
    ) -> None:
        """Release a reservation without waiting (also runs when the caller was cancelled)."""

        async def release() -> None:
            try:
                await stub.Release(request, timeout=5.0)
            except grpc.aio.AioRpcError as exc:  # the lease frees the blocks anyway
                logger.warning("release of %s failed: %s", request.request_id, exc.code().name)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
