"""The ``tandem.v1.DecodeWorker`` servicer.

Request lifecycle on a decode worker:
  1. ``Reserve``: the scheduler takes ``ceil(prompt / block_size)`` blocks for
     the request (``CapacityExceeded`` → ``RESOURCE_EXHAUSTED``: the reservation
     is the credit); the KV receiver is told to expect writes into exactly those
     blocks, for this epoch; a lease timer frees them if nobody claims them.
  2. a prefill worker pushes the KV through ``kvtransfer`` (checksums verified
     before anything is written to the cache).
  3. ``Decode``: claims the reservation, waits until every block has arrived,
     joins the request to the running batch and streams its tokens. A
     cancelled or failed stream aborts the request, freeing its blocks.
  ``Release`` (or the lease) ends a reservation that will not be decoded.
  ``CancelCompletion`` ends one completion of a ``Decode`` (or colocated
  ``Generate``) stream with ``n`` > 1 early (``decode_service.streams``): its
  blocks are freed and the stream goes on with the others.
The engine's state is touched only on the engine thread (``EngineLoop.call``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from decode_service.reservations import Reservation, ReservationTable, lease_expiry_unix_ms
from decode_service.streams import OpenStream, OpenStreams
from engine.codec import finish_reason_to_pb, logprobs_list_to_pb, sampling_params_from_pb
from engine.engine_core import EngineCore
from engine.errors import InvalidRequest, TandemError
from engine.request import EngineOutput, Request
from engine.serving import abort_with
from engine.tracing import annotate, annotate_result, span
from engine.worker_runtime import WorkerRuntime
from kvtransfer.base import KvReceiver
from kvtransfer.layout import KvDestination
from tandem.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)


class DecodeService(worker_pb2_grpc.DecodeWorkerServicer):
    """Reserves blocks, receives KV and streams generated tokens."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self._rt = runtime
        self._receiver: KvReceiver | None = None
        self._receiver_address = ""
        self._table: ReservationTable | None = None
        self._streams = OpenStreams()

    def attach(self, receiver: KvReceiver, address: str) -> None:
        """Use ``receiver`` (listening on ``address``) for incoming KV; call before serving."""
        self._receiver = receiver
        self._receiver_address = address

    @property
    def receiver(self) -> KvReceiver:
        assert self._receiver is not None, "DecodeService.attach() was not called"
        return self._receiver

    @property
    def table(self) -> ReservationTable:
        """Live reservations (created once the epoch is known)."""
        if self._table is None:
            self._table = ReservationTable(self._rt.epoch, self._on_lease_expired)
        return self._table

    async def Reserve(
        self, request: worker_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReserveResponse:
        try:
            return await self._reserve(request)
        except TandemError as exc:
            await abort_with(context, exc)

    async def _reserve(self, request: worker_pb2.ReserveRequest) -> worker_pb2.ReserveResponse:
        if request.num_prompt_tokens < 1:
            raise InvalidRequest("num_prompt_tokens", "must be >= 1")
        rid = f"{request.request_id}#{uuid.uuid4().hex[:12]}"
        n_tokens, max_tokens = request.num_prompt_tokens, request.max_tokens or None
        block_ids = await self._reserve_blocks(rid, n_tokens, max_tokens)
        annotate({"reservation_id": rid, "reserved_blocks": len(block_ids)})
        lease_s = (request.lease_ms or self._rt.config.lease_ms) / 1000.0
        reservation = Reservation(
            rid, request.request_id, self._rt.epoch, block_ids, n_tokens, lease_expiry_unix_ms(lease_s)
        )
        self.receiver.expect(rid, request.request_id, self._rt.epoch, block_ids)
        self.table.add(reservation, lease_s)
        destination = KvDestination(
            worker_id=self._rt.worker_id,
            epoch=self._rt.epoch,
            reservation_id=rid,
            block_ids=tuple(block_ids),
            transport=self.receiver.name,
            transfer_address=self._receiver_address,
            layout=self._rt.layout,
            lease_expires_unix_ms=reservation.expires_unix_ms,
        )
        return worker_pb2.ReserveResponse(destination=destination.to_pb())

    async def _reserve_blocks(self, rid: str, n_tokens: int, max_tokens: int | None) -> list[int]:
        """Reserve on the engine thread; if the caller is cancelled meanwhile, free the blocks
        as soon as the reservation lands, so a cancelled ``Reserve`` never strands them."""
        task = asyncio.ensure_future(
            self._rt.loop.call(lambda c: c.scheduler.reserve(rid, n_tokens, max_tokens))
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:

            def cleanup(done: asyncio.Future[list[int]]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._rt.spawn(self._free_reservation(rid))

            task.add_done_callback(cleanup)
            raise

    async def Release(
        self, request: worker_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseResponse:
        if request.reservation_id:
            found = self.table.release(request.reservation_id, request.epoch)
            ended = [found] if found is not None else []
        else:  # the caller lost the reservation id (its Reserve call was interrupted)
            ended = self.table.release_request(request.request_id)
        for reservation in ended:
            await self._free_reservation(reservation.reservation_id)
        return worker_pb2.ReleaseResponse(released=bool(ended))

    def _on_lease_expired(self, reservation: Reservation) -> None:
        logger.warning(
            "lease of %s expired: releasing %d blocks", reservation.reservation_id, len(reservation.block_ids)
        )
        self._rt.spawn(self._free_reservation(reservation.reservation_id))

    async def _free_reservation(self, rid: str) -> None:
        """Forget ``rid`` and free its blocks once no KV sender can write them any more
        (``KvReceiver.quiesce``); shielded, so a cancelled ``Release`` still frees them."""
        self.receiver.forget(rid)

        async def free() -> None:
            await self.receiver.quiesce(rid)
            await self._rt.loop.call(lambda c: c.scheduler.release_reservation(rid))

        await asyncio.shield(free())

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        try:
            reservation = self.table.claim(request.reservation_id, request.epoch)
        except TandemError as exc:
            await abort_with(context, exc)
        rid = reservation.reservation_id
        queue = self._rt.loop.open_stream(rid)
        stream: OpenStream | None = None
        try:
            sampling = sampling_params_from_pb(request.sampling)
            stream = self._streams.open(request.request_id, rid, sampling.n, queue)
            timeout_s = request.transfer_wait_ms / 1000.0 or max(
                0.1, reservation.expires_unix_ms / 1000.0 - time.time()
            )
            with span("decode.admission"):  # KV arrived, joins the batch
                received = await self.receiver.wait_complete(rid, timeout_s=min(timeout_s, 600.0))
                self._rt.metrics.kv_transfer_bytes.labels(backend=self.receiver.name).inc(received.num_bytes)
                annotate({"kv.bytes": received.num_bytes, "kv.blocks": len(received.block_ids)})
                req = Request(
                    req_id=rid,
                    prompt_token_ids=list(request.prompt_token_ids),
                    sampling=replace(sampling, prompt_logprobs=None),  # the prefill worker computed those
                    eos_token_ids=self._rt.eos_token_ids,
                    priority=request.priority,
                )
                firsts = list(request.first_token_ids) or [request.first_token_id]
                start = await self._rt.loop.call(lambda c: c.scheduler.add_prefilled_completions(req, firsts))
            with span("decode.generate"):  # the request's life in the batch
                n_tokens = 0
                async for out in self._outputs(stream, start):
                    n_tokens += len(out.new_token_ids)
                    if out.finished:
                        annotate_result(output_tokens=n_tokens, finish_reason=out.finish_reason)
                    yield worker_pb2.DecodeResponse(
                        token_ids=out.new_token_ids,
                        finish_reason=finish_reason_to_pb(out.finish_reason),
                        logprobs=logprobs_list_to_pb(out.logprobs),
                        index=out.index,
                    )
        except TandemError as exc:
            await abort_with(context, exc)
        finally:
            if stream is not None:
                self._streams.close(stream)
            self._rt.loop.close_stream(rid)
            self.receiver.forget(rid)
            self._rt.spawn(self._abort(rid))

    async def Generate(
        self, request: worker_pb2.LocalGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        """Colocated mode: the whole request in this engine (prefill batched with decodes)."""
        if not self._rt.config.colocated:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this decode worker is not colocated")
        rid = f"{request.request_id}#{uuid.uuid4().hex[:12]}"
        queue = self._rt.loop.open_stream(rid)
        stream: OpenStream | None = None
        try:
            req = Request(
                req_id=rid,
                prompt_token_ids=list(request.prompt_token_ids),
                sampling=sampling_params_from_pb(request.sampling),
                eos_token_ids=self._rt.eos_token_ids,
                priority=request.priority,
            )
            stream = self._streams.open(request.request_id, rid, req.sampling.n, queue)
            await self._rt.loop.call(lambda c: c.add_request(req))
            first = True
            async for out in self._outputs(stream, None):
                msg = worker_pb2.DecodeResponse(
                    token_ids=out.new_token_ids,
                    finish_reason=finish_reason_to_pb(out.finish_reason),
                    logprobs=logprobs_list_to_pb(out.logprobs),
                    index=out.index,
                    prompt_logprobs=logprobs_list_to_pb(out.prompt_logprobs or []),
                )
                if first:  # the engine wrote the phase timestamps before the first output
                    first = False
                    msg.engine_queue_seconds = req.queue_seconds or 0.0
                    msg.engine_prefill_seconds = req.prefill_seconds or 0.0
                    self._rt.metrics.engine_queue.observe(msg.engine_queue_seconds)
                yield msg
        except TandemError as exc:
            await abort_with(context, exc)
        finally:
            if stream is not None:
                self._streams.close(stream)
            self._rt.loop.close_stream(rid)
            self._rt.spawn(self._abort(rid))

    async def CancelCompletion(
        self, request: worker_pb2.CancelCompletionRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.CancelCompletionResponse:
        """End completion ``index`` of the open stream ``request_id`` (idempotent).

        An unknown ``request_id`` (its stream ended, or never was) answers
        ``known`` false. Errors: empty ``request_id`` or ``index`` not below the
        request's ``sampling.n`` → ``INVALID_ARGUMENT``.
        """
        try:
            if not request.request_id:
                raise InvalidRequest("request_id", "must not be empty")
            stream = self._streams.get(request.request_id)
            if stream is None:
                return worker_pb2.CancelCompletionResponse(known=False)
            stream.check_index(request.index)
            if stream.needs_abort(request.index):
                stream.cancelled.add(request.index)
                if stream.started:  # else the stream ends it when it starts
                    await self._end_completion(stream, request.index)
            return worker_pb2.CancelCompletionResponse(known=True)
        except TandemError as exc:
            await abort_with(context, exc)

    async def _outputs(
        self, stream: OpenStream, start: list[EngineOutput] | None
    ) -> AsyncIterator[EngineOutput]:
        """The completions already finished in ``start`` (``Decode``: what
        ``add_prefilled_completions`` returned), then the request's outputs until each
        of its completions has had its last.

        Every output taken from the queue counts in ``tandem_generation_tokens_total``
        (tokens the engine generated); outputs of a completion after its last (a
        cancelled completion's, still in flight) are dropped.
        """
        if start is not None:
            for out in start:
                if out.finished:
                    stream.ended.add(out.index)
                    yield out
            await self._start(stream)
        while not stream.done:
            out = await stream.queue.get()
            if isinstance(out, BaseException):
                raise out
            self._rt.metrics.generation_tokens.inc(len(out.new_token_ids))
            if not stream.started:  # Generate: the first output comes once the request has forked
                await self._start(stream)
            if out.index in stream.ended:
                continue
            if out.finished:
                stream.ended.add(out.index)
            yield out

    async def _start(self, stream: OpenStream) -> None:
        """Mark ``stream`` started (its completions exist on the engine) and end those
        cancelled before."""
        stream.started = True
        for index in sorted(stream.cancelled - stream.ended):
            await self._end_completion(stream, index)

    async def _end_completion(self, stream: OpenStream, index: int) -> None:
        """Abort completion ``index`` on the engine (its blocks go back; those shared with
        running completions when the last of them ends) and queue its last output.
        Shielded: once begun it finishes even if the caller is cancelled, so the stream
        never waits for a completion nobody runs. The engine delivers a step's outputs
        before the abort's result, so the ``"abort"`` output comes after any real one."""

        async def end() -> None:
            try:
                await self._rt.loop.call(lambda c: c.abort_request(stream.rid, index))
            finally:
                stream.queue.put_nowait(stream.aborted_output(index))

        await asyncio.shield(end())

    async def _abort(self, rid: str) -> None:
        """Free whatever ``rid`` still holds: its reservation, or the running request
        (a finished request holds nothing). Both are tried because a cancelled
        ``add_prefilled_request`` may still have run on the engine thread."""

        def abort(core: EngineCore) -> None:
            if not core.scheduler.release_reservation(rid):
                core.abort_request(rid)

        with contextlib.suppress(Exception):
            await self.receiver.quiesce(rid)
            await self._rt.loop.call(abort)
