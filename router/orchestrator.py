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
``Decode`` stream makes D abort the request and free its blocks, and a ``Decode``
call that ends before D answered anything is followed by a ``Release`` too (the
call may have died before D's handler claimed the reservation).

Worker failures:
  - ``Prefill`` failing with ``UNAVAILABLE`` (P died before the transfer
    completed, or the transfer to D broke) releases the reservation, waits for
    the release, reserves again (a new attempt id, so a late write of the dead
    attempt finds no reservation) and retries on another prefill worker, up to
    ``max_prefill_retries`` times. Nothing reached the client yet, so it sees
    one first token only.
  - D dying mid-stream ends the stream with ``UNAVAILABLE`` naming D, or, with
    ``migrate_on_failure``, resumes the request on other decode workers
    (``router.migration``): each completion not finished (all ``n`` of them
    run side by side) becomes an ``n`` = 1 request whose prompt, the prompt
    plus that completion's tokens already yielded, is prefilled again (on a
    prefill worker, into a reservation on a surviving decode worker) with
    ``max_tokens`` reduced by those tokens and the completion's own sampling
    parameters. The caller sees one seamless stream per completion: tokens
    continue where they stopped (greedy decoding gives exactly the tokens D
    would have produced; seeded sampling draws new ones), and
    ``num_cached_tokens`` is reported for the original prompt only. At most
    ``MAX_MIGRATIONS`` decode workers may be lost under one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass, field

import grpc

from engine.batch import TokenLogprobs
from engine.codec import finish_reason_from_pb, sampling_params_to_pb, token_logprobs_from_pb
from engine.errors import WorkerUnavailable
from engine.metrics import ProcessMetrics
from engine.tracing import annotate, annotate_phases, span
from router.completion_cancel import CompletionCanceller
from router.migration import relay_concurrently, resumed
from router.prefix_index import PrefixIndex, prefill_routing_request
from router.routing import RoutingPolicy, RoutingRequest, WorkerView, cached_tokens
from router.validation import ParsedRequest
from router.worker_pool import WorkerPool
from tandem.v1 import kv_pb2, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass
class TokenChunk:
    """New tokens of completion ``index`` of a request; its last chunk has ``finish_reason`` set.

    ``logprobs`` has one entry per token when the request asked for them;
    ``prompt_logprobs`` (prompt tokens 1 ..) comes on completion 0's first
    chunk when the request asked for them.
    """

    token_ids: list[int]
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    index: int = 0
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass
class _Reservation:
    stub: worker_pb2_grpc.DecodeWorkerStub
    destination: kv_pb2.KvDestination
    attempt_id: str
    #: D's ``Decode`` claimed the reservation (its first message arrived); until then a
    #: ``Decode`` call that died before D's handler ran (a deadline already past, a cancel
    #: in flight) leaves the reservation to us, so an abnormal end releases it (a release
    #: after D's claim finds nothing: blocks are freed exactly once).
    handed_over: bool = False

    def release_request(self) -> worker_pb2.ReleaseRequest:
        return worker_pb2.ReleaseRequest(
            request_id=self.attempt_id,
            reservation_id=self.destination.reservation_id,
            epoch=self.destination.epoch,
        )


class DecodeWorkerLost(WorkerUnavailable):
    """A decode worker died or ended its stream mid-request (tokens may have reached the client)."""

    def __init__(self, worker_id: str, message: str) -> None:
        super().__init__(message)
        self.worker_id = worker_id


#: Most times one request moves to another decode worker (``migrate_on_failure``).
MAX_MIGRATIONS = 3


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
            observes TTFT's phases when the first token is known
            (``tandem_request_queue_seconds``: the wait here plus the worker's engine
            queue; ``tandem_request_prefill_seconds``;
            ``tandem_request_kv_transfer_seconds``), which also go on the request's span.
        migrate_on_failure: resume a request whose decode worker died mid-stream on
            another decode worker (module docstring) instead of failing it.
        max_prefill_retries: other prefill workers tried after a ``Prefill`` call
            fails with ``UNAVAILABLE``.
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
        migrate_on_failure: bool = False,
        max_prefill_retries: int = 2,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._prefix_index = prefix_index if policy.uses_prefix_index else None
        self._metrics = metrics
        self._eos = frozenset(eos_token_ids)
        self._max_model_len = max_model_len
        self._lease_ms = lease_ms
        self._migrate_on_failure = migrate_on_failure
        self._max_prefill_retries = max_prefill_retries
        self._background: set[asyncio.Task[None]] = set()

    async def generate(
        self, req: ParsedRequest, timeout_s: float | None, canceller: CompletionCanceller | None = None
    ) -> AsyncGenerator[TokenChunk, None]:
        """Yield ``req``'s tokens as they are produced.

        Args:
            timeout_s: seconds left of the client's deadline (None: no deadline);
                every downstream call gets what remains.
            canceller: attached to the worker stream that generates the completions,
                once it has answered, so the caller can end one completion early (after a
                migration, redirected to the stream resuming that completion).

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
                req, self._policy.pick(colocated, routing), remaining(), started, canceller
            ):
                yield chunk
            return
        async with contextlib.aclosing(
            self._generate_migrating(req, remaining, started, set(), canceller)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _generate_migrating(
        self,
        req: ParsedRequest,
        remaining: Callable[[], float | None],
        started: float,
        lost: set[str],
        canceller: CompletionCanceller | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """Steps 1-4 of the module docstring; a decode worker lost mid-stream joins ``lost``
        (one set per client request, shared by its resumed streams: ``MAX_MIGRATIONS`` counts
        per request) and, with ``migrate_on_failure``, every completion not finished resumes
        on another decode worker (``router.migration``).

        Raises:
            DecodeWorkerLost: the decode worker died mid-stream and the request is not moved.
        """
        emitted: list[list[int]] = [[] for _ in range(req.sampling.n)]  # tokens yielded per completion
        finished: set[int] = set()
        try:
            async with contextlib.aclosing(
                self._generate_disaggregated(req, remaining, started, frozenset(lost), canceller)
            ) as chunks:
                async for chunk in chunks:
                    emitted[chunk.index].extend(chunk.token_ids)
                    if chunk.finish_reason is not None:
                        finished.add(chunk.index)
                    yield chunk
            return
        except DecodeWorkerLost as exc:
            lost.add(exc.worker_id)
            others = [w for w in self._pool.healthy(worker_pb2.WORKER_ROLE_DECODE) if w.worker_id not in lost]
            if not self._migrate_on_failure or not others or len(lost) > MAX_MIGRATIONS:
                raise
            logger.warning(
                "%s; migrating request %s to another decode worker after %d tokens",
                exc,
                req.request_id,
                sum(map(len, emitted)),
            )
        streams = {
            i: self._generate_migrating(resumed(req, i, emitted[i]), remaining, started, lost)
            for i in range(req.sampling.n)
            if i not in finished
        }
        async with contextlib.aclosing(relay_concurrently(streams, canceller)) as resumed_chunks:
            async for chunk in resumed_chunks:
                yield chunk

    async def _generate_disaggregated(
        self,
        req: ParsedRequest,
        remaining: Callable[[], float | None],
        started: float,
        avoid_decode: frozenset[str],
        canceller: CompletionCanceller | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """Steps 1-4 of the module docstring on decode workers not in ``avoid_decode``.

        Raises:
            DecodeWorkerLost: the decode worker died mid-stream.
        """
        routing = RoutingRequest(req.request_id, len(req.prompt_token_ids))
        # The prefill pick may wait on Redis; both picks' loads are then counted with no await between.
        with span("tandem.route"):
            prefill, prefill_tokens = await self._pick_prefill(req)
            decodes = self._pool.healthy(worker_pb2.WORKER_ROLE_DECODE)
            decode = self._policy.pick([w for w in decodes if w.worker_id not in avoid_decode], routing)
            annotate({"route.decode_worker": decode.worker_id})
        with self._pool.in_flight(decode.worker_id, len(req.prompt_token_ids)):
            reservation, prefilled = await self._prefill_with_retries(
                req, prefill, prefill_tokens, decode, avoid_decode, remaining, started
            )
            try:
                firsts = list(prefilled.first_token_ids) or [prefilled.first_token_id]
                first_logprobs = [token_logprobs_from_pb(lp) for lp in prefilled.first_tokens_logprobs] or (
                    [token_logprobs_from_pb(prefilled.first_token_logprobs)]
                    if prefilled.HasField("first_token_logprobs")
                    else []
                )
                prompt_logprobs = None
                if req.sampling.prompt_logprobs is not None:
                    prompt_logprobs = [token_logprobs_from_pb(lp) for lp in prefilled.prompt_logprobs]
                done: set[int] = set()
                for i, first in enumerate(firsts):  # one first token per completion (sampling.n)
                    finish = self._finish_after_first_token(req, first)
                    if finish is not None:
                        done.add(i)
                    yield TokenChunk(
                        [first],
                        finish,
                        prefilled.num_cached_tokens,
                        first_logprobs[i : i + 1],
                        index=i,
                        prompt_logprobs=prompt_logprobs if i == 0 else None,
                    )
                if len(done) == len(firsts):
                    return
                async with contextlib.aclosing(
                    self._decode(req, reservation, firsts, done, remaining(), canceller)
                ) as chunks:
                    async for chunk in chunks:
                        yield chunk
            finally:
                if not reservation.handed_over:
                    self._release_in_background(reservation.stub, reservation.release_request())

    async def _prefill_with_retries(
        self,
        req: ParsedRequest,
        prefill: WorkerView,
        prefill_tokens: int,
        decode: WorkerView,
        avoid_decode: frozenset[str],
        remaining: Callable[[], float | None],
        started: float,
    ) -> tuple[_Reservation, worker_pb2.PrefillResponse]:
        """Reserve on a decode worker and ``Prefill`` into it; on ``UNAVAILABLE`` from ``Prefill``,
        release, reserve again and retry on another prefill worker (module docstring).

        Returns:
            The filled reservation (the caller releases or decodes it) and P's reply.
        """
        routing = RoutingRequest(req.request_id, len(req.prompt_token_ids))
        tried: set[str] = set()
        while True:
            # Unique per attempt, so that a release by request id touches nobody else's blocks,
            # and a late write of a failed attempt finds no reservation.
            attempt_id = f"{req.request_id}.{uuid.uuid4().hex[:8]}"
            d_stub, reserved = await self._reserve(
                req, decode, routing, attempt_id, remaining(), avoid_decode
            )
            reservation = _Reservation(d_stub, reserved.destination, attempt_id)
            try:
                p_stub = worker_pb2_grpc.PrefillWorkerStub(self._pool.channel(prefill.worker_id))
                router_wait_s = asyncio.get_running_loop().time() - started
                with self._pool.in_flight(prefill.worker_id, prefill_tokens):  # P's load ends with its call
                    prefilled = await p_stub.Prefill(
                        worker_pb2.PrefillRequest(
                            request_id=attempt_id,
                            prompt_token_ids=req.prompt_token_ids,
                            sampling=sampling_params_to_pb(req.sampling),
                            destination=reservation.destination,
                            cache_salt=req.cache_salt,
                            priority=req.priority,
                        ),
                        timeout=remaining(),
                    )
                if not avoid_decode:  # else a stream resumed after a lost decode worker: no first token
                    self._observe_first_token(
                        router_wait_s,
                        prefilled.engine_queue_seconds,
                        prefilled.engine_prefill_seconds,
                        prefilled.transfer_seconds,
                    )
                return reservation, prefilled
            except grpc.aio.AioRpcError as exc:
                release = self._release_in_background(d_stub, reservation.release_request())
                tried.add(prefill.worker_id)
                if exc.code() != grpc.StatusCode.UNAVAILABLE or len(tried) > self._max_prefill_retries:
                    raise
                try:
                    next_prefill, prefill_tokens = await self._pick_prefill(req, exclude=tried)
                except WorkerUnavailable:
                    raise exc from None
                logger.warning(
                    "prefill worker %s failed %s (%s): retrying on %s",
                    prefill.worker_id,
                    attempt_id,
                    exc.details(),
                    next_prefill.worker_id,
                )
                prefill = next_prefill
                await asyncio.shield(release)  # blocks go back before the retry reserves again
                decodes = self._pool.healthy(worker_pb2.WORKER_ROLE_DECODE)
                candidates = [w for w in decodes if w.worker_id not in avoid_decode]
                decode = next((w for w in candidates if w.worker_id == decode.worker_id), None) or (
                    self._policy.pick(candidates, routing)
                )
            except BaseException:  # cancelled or failed otherwise: nothing will fill the blocks
                self._release_in_background(d_stub, reservation.release_request())
                raise

    async def _generate_colocated(
        self,
        req: ParsedRequest,
        worker: WorkerView,
        timeout_s: float | None,
        started: float,
        canceller: CompletionCanceller | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """The whole request on one colocated worker; cancelling the call frees its blocks.
        ``started``: the request's arrival (event-loop time)."""
        with self._pool.in_flight(worker.worker_id, len(req.prompt_token_ids)):
            stub = worker_pb2_grpc.DecodeWorkerStub(self._pool.channel(worker.worker_id))
            worker_request_id = f"{req.request_id}.{uuid.uuid4().hex[:8]}"
            router_wait_s = asyncio.get_running_loop().time() - started
            call = stub.Generate(
                worker_pb2.LocalGenerateRequest(
                    request_id=worker_request_id,
                    prompt_token_ids=req.prompt_token_ids,
                    sampling=sampling_params_to_pb(req.sampling),
                    priority=req.priority,
                ),
                timeout=timeout_s,
            )
            try:
                done: set[int] = set()
                first_of_0 = True  # the worker sends prompt log-probabilities on completion 0's first message
                first = True  # the stream's first message carries the worker's TTFT breakdown
                async for msg in call:
                    if canceller is not None:
                        canceller.attach(stub, worker_request_id)
                    if first:
                        first = False
                        self._observe_first_token(
                            router_wait_s, msg.engine_queue_seconds, msg.engine_prefill_seconds
                        )
                    finish = finish_reason_from_pb(msg.finish_reason)
                    logprobs = [token_logprobs_from_pb(lp) for lp in msg.logprobs]
                    prompt_logprobs = None
                    if req.sampling.prompt_logprobs is not None and msg.index == 0 and first_of_0:
                        prompt_logprobs = [token_logprobs_from_pb(lp) for lp in msg.prompt_logprobs]
                        first_of_0 = False
                    yield TokenChunk(
                        list(msg.token_ids),
                        finish,
                        logprobs=logprobs,
                        index=msg.index,
                        prompt_logprobs=prompt_logprobs,
                    )
                    if finish is not None:
                        done.add(msg.index)
                        if len(done) == req.sampling.n:
                            return
                raise WorkerUnavailable(f"colocated worker {worker.worker_id} ended the stream early")
            finally:
                call.cancel()

    async def _pick_prefill(
        self, req: ParsedRequest, exclude: Collection[str] = ()
    ) -> tuple[WorkerView, int]:
        """Pick a prefill worker not in ``exclude``, with the prompt's cached prefix per worker
        when the policy uses it.

        Returns:
            The worker and the prompt tokens it will compute (its cached prefix excluded).

        Raises:
            WorkerUnavailable: no healthy prefill worker outside ``exclude``.
        """
        candidates = [
            w for w in self._pool.healthy(worker_pb2.WORKER_ROLE_PREFILL) if w.worker_id not in exclude
        ]
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
        avoid: frozenset[str] = frozenset(),
    ) -> tuple[worker_pb2_grpc.DecodeWorkerStub, worker_pb2.ReserveResponse]:
        """``Reserve`` on ``first``; a decode worker that is UNAVAILABLE (e.g. just died,
        not yet dropped by the health check) is skipped for another (never one in
        ``avoid``), up to 3 tries. Nothing has reached the client yet, so the retry
        is invisible to it."""
        tried: set[str] = set(avoid)
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
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not others or len(tried - avoid) >= 3:
                    raise
                logger.warning(
                    "decode worker %s unavailable for %s: trying another", worker.worker_id, attempt_id
                )
                worker = self._policy.pick(others, routing)
            except BaseException:  # cancelled: same reasoning
                self._release_in_background(stub, worker_pb2.ReleaseRequest(request_id=attempt_id))
                raise

    def _observe_first_token(
        self,
        router_wait_s: float,
        engine_queue_s: float,
        engine_prefill_s: float,
        kv_transfer_s: float | None = None,
    ) -> None:
        """Record TTFT's phases (seconds) as the worker reported them: in the router's
        histograms (queue = the wait here plus the worker's engine queue) and on the
        request's span (``tandem.phase.*_s`` and a ``tandem.first_token`` event)."""
        if self._metrics is not None:
            self._metrics.observe_ttft_phases(router_wait_s + engine_queue_s, engine_prefill_s, kv_transfer_s)
        phases = {"router_wait": router_wait_s, "engine_queue": engine_queue_s, "prefill": engine_prefill_s}
        if kv_transfer_s is not None:
            phases["kv_transfer"] = kv_transfer_s
        annotate_phases("tandem.first_token", phases)

    def _finish_after_first_token(self, req: ParsedRequest, token_id: int) -> str | None:
        if (token_id in self._eos and not req.sampling.ignore_eos) or token_id in req.sampling.stop_token_ids:
            return "stop"
        if req.sampling.max_tokens <= 1 or len(req.prompt_token_ids) + 1 >= self._max_model_len:
            return "length"
        return None

    async def _decode(
        self,
        req: ParsedRequest,
        reservation: _Reservation,
        first_tokens: list[int],
        done: set[int],
        timeout_s: float | None,
        canceller: CompletionCanceller | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """Relay D's stream for the completions not in ``done`` (those ended at their first token);
        the seconds to D's first message go on the request's span (``tandem.first_decode``)."""
        called = asyncio.get_running_loop().time()
        call = reservation.stub.Decode(
            worker_pb2.DecodeRequest(
                request_id=reservation.attempt_id,
                reservation_id=reservation.destination.reservation_id,
                epoch=reservation.destination.epoch,
                prompt_token_ids=req.prompt_token_ids,
                first_token_id=first_tokens[0],
                first_token_ids=first_tokens if len(first_tokens) > 1 else [],
                sampling=sampling_params_to_pb(req.sampling),
                priority=req.priority,
            ),
            timeout=timeout_s,
        )
        done = set(done)
        try:
            async for msg in call:
                if not reservation.handed_over:
                    annotate_phases(
                        "tandem.first_decode", {"first_decode": asyncio.get_running_loop().time() - called}
                    )
                reservation.handed_over = True
                if canceller is not None:
                    canceller.attach(reservation.stub, reservation.attempt_id)
                if msg.index in done:  # D reports completions that ended at their first token too
                    continue
                finish = finish_reason_from_pb(msg.finish_reason)
                yield TokenChunk(
                    list(msg.token_ids),
                    finish,
                    logprobs=[token_logprobs_from_pb(lp) for lp in msg.logprobs],
                    index=msg.index,
                )
                if finish is not None:
                    done.add(msg.index)
                    if len(done) == len(first_tokens):
                        return
            worker_id = reservation.destination.worker_id
            raise DecodeWorkerLost(worker_id, f"decode worker {worker_id} ended the stream early")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            worker_id = reservation.destination.worker_id
            raise DecodeWorkerLost(  # the worker died or became unreachable mid-stream
                worker_id, f"decode worker {worker_id} failed mid-stream: {exc.details()}"
            ) from exc
        finally:
            call.cancel()

    def _release_in_background(
        self, stub: worker_pb2_grpc.DecodeWorkerStub, request: worker_pb2.ReleaseRequest
    ) -> asyncio.Task[None]:
        """Release a reservation without waiting (also runs when the caller was cancelled);
        returns the task, which never raises."""
        task = asyncio.get_running_loop().create_task(self._release(stub, request, timeout_s=5.0))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @staticmethod
    async def _release(
        stub: worker_pb2_grpc.DecodeWorkerStub, request: worker_pb2.ReleaseRequest, *, timeout_s: float
    ) -> None:
        """``Release`` a reservation; a failure is logged only (the lease frees the blocks anyway)."""
        try:
            await stub.Release(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.warning("release of %s failed: %s", request.request_id, exc.code().name)
