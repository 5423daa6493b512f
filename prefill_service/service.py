"""The ``tandem.v1.PrefillWorker`` servicer.

Request lifecycle on a prefill worker:
  1. ``Prefill`` checks the destination (layout, block count) and queues the
     prompt in the engine as a request that samples one token and keeps its
     blocks when it finishes (``hold_blocks_on_finish``);
  2. the engine reuses the prompt's longest cached prefix (prefix caching),
     computes the rest (batched with other prompts, chunked when long) and
     samples the first token;
  3. the KV of the prompt's blocks is pushed into the decode worker's reserved
     blocks through the ``kvtransfer`` sender, which returns once the receiver
     verified every block. With layer-wise streaming
     (``kv_transfer_layers_per_message`` > 0) each group of layers is sent as soon as
     the final prompt chunk computed it, overlapping the rest of the forward
     (:mod:`prefill_service.layer_stream`); otherwise the whole prompt is sent in one
     message after the forward;
  4. the blocks are released (``release_held``) and the first token returned,
     with the TTFT breakdown on this worker: engine queue and prefill compute
     (``Request`` phase timestamps, written by the scheduler) and KV transfer
     seconds; the engine queue time is also ``tandem_engine_queue_seconds``.
A cancellation or error at any point aborts the request and frees its blocks; a
stream cut short is first abandoned (``KvSender.abandon``), so a device backend's
copies have run and the decode worker's write grant closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import replace

import grpc

from engine.codec import logprobs_list_to_pb, sampling_params_from_pb, token_logprobs_to_pb
from engine.engine_core import EngineCore
from engine.errors import InvalidRequest, RequestAborted, TandemError
from engine.kv_cache_manager import cdiv
from engine.request import EngineOutput, Request
from engine.serving import abort_with
from engine.tracing import GEN_AI_USAGE_INPUT_TOKENS, span, transfer_attributes
from engine.worker_runtime import WorkerRuntime
from kvtransfer.base import KvSender, TransferStats
from kvtransfer.device_events import wait_cuda_event
from kvtransfer.layout import KvDestination
from prefill_service.layer_stream import LayerGroupReady, LayerStreamer
from tandem.v1 import worker_pb2, worker_pb2_grpc


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    """Computes prompts and pushes their KV to decode workers."""

    def __init__(self, runtime: WorkerRuntime, sender: KvSender) -> None:
        self._rt = runtime
        self._sender = sender
        self._streamer: LayerStreamer | None = None

    async def _layer_streamer(self) -> LayerStreamer | None:
        """The layer streamer, installed on the engine on first use; ``None`` when streaming is off."""
        per_message = self._rt.config.kv_transfer_layers_per_message
        if per_message <= 0:
            return None
        if self._streamer is None:
            runner = self._rt.runner
            streamer = LayerStreamer(
                runner.model,
                runner.device,
                self._rt.layout.num_layers,
                per_message,
                asyncio.get_running_loop(),
            )
            await self._rt.loop.call(lambda c: setattr(c, "before_execute", streamer.before_execute))
            self._streamer = streamer
        return self._streamer

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        try:
            return await self._prefill(request)
        except TandemError as exc:
            await abort_with(context, exc)

    async def _prefill(self, request: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        prompt = list(request.prompt_token_ids)
        destination = KvDestination.from_pb(request.destination)
        self._rt.layout.check_compatible(destination.layout)
        n_blocks = cdiv(len(prompt), self._rt.config.block_size)
        if len(destination.block_ids) != n_blocks:
            raise InvalidRequest(
                "destination.block_ids",
                f"{len(destination.block_ids)} blocks reserved for a prompt that needs {n_blocks}",
            )
        sampling = replace(sampling_params_from_pb(request.sampling), max_tokens=1)
        rid = f"{request.request_id}#{uuid.uuid4().hex[:12]}"
        req = Request(
            req_id=rid,
            prompt_token_ids=prompt,
            sampling=sampling,
            eos_token_ids=self._rt.eos_token_ids,
            hold_blocks_on_finish=True,
            cache_salt=request.cache_salt,
            priority=request.priority,
        )
        streamer = await self._layer_streamer()
        groups = None if streamer is None else streamer.watch(rid)
        streaming: asyncio.Future[TransferStats] | None = None
        queue = self._rt.loop.open_stream(rid)
        started = time.perf_counter()
        try:
            with span("prefill.queue"):  # until the engine thread takes it
                await self._rt.loop.call(lambda c: c.add_request(req))
            if groups is not None:
                streaming = asyncio.ensure_future(
                    self._stream(rid, request.request_id, destination, n_blocks, groups)
                )
            with span("prefill.compute") as compute:  # batch wait and compute
                outs = [await self._first_output(queue) for _ in range(sampling.n)]  # one per completion
                out = outs[0]
                compute.set_attributes(
                    {
                        GEN_AI_USAGE_INPUT_TOKENS: len(prompt),
                        "tandem.cached_tokens": out.num_cached_tokens,
                        "tandem.engine_queue_s": req.queue_seconds or 0.0,
                        "tandem.engine_prefill_s": req.prefill_seconds or 0.0,
                    }
                )
            prefill_s = time.perf_counter() - started
            with span("kv.transfer") as transfer:
                if streaming is not None and groups is not None:
                    groups.put_nowait(None)  # every group of the final chunk was posted before its token
                    stats = await streaming
                else:
                    block_table = await self._rt.loop.call(lambda c: c.scheduler.get_block_table(rid))
                    stats = await self._sender.send(
                        request.request_id, destination, block_table[:n_blocks], self._rt.runner.kv_cache
                    )
                transfer.set_attributes(
                    transfer_attributes(
                        destination.transport, stats.num_bytes, stats.num_blocks, stats.seconds
                    )
                )
        finally:
            if streamer is not None:
                streamer.unwatch(rid)
            cut_short = streaming is not None and not (
                streaming.done() and not streaming.cancelled() and streaming.exception() is None
            )
            if streaming is not None:  # cancelled when not finished; its error was raised above
                streaming.cancel()
                with contextlib.suppress(BaseException):
                    await streaming
            self._rt.loop.close_stream(rid)
            self._rt.spawn(self._free(rid, (request.request_id, destination) if cut_short else None))
        self._rt.metrics.observe_transfer(destination.transport, stats.num_bytes, stats.seconds)
        self._rt.metrics.prompt_tokens.inc(len(prompt))
        self._rt.metrics.prefix_cache_hit_tokens.inc(out.num_cached_tokens)
        self._rt.metrics.prefill_tokens.inc(len(prompt) - out.num_cached_tokens)
        # Written on the engine thread before the first output was posted to `queue`.
        queue_s, compute_s = req.queue_seconds or 0.0, req.prefill_seconds or 0.0
        self._rt.metrics.engine_queue.observe(queue_s)
        response = worker_pb2.PrefillResponse(
            first_token_id=out.new_token_ids[0],
            num_cached_tokens=out.num_cached_tokens,
            kv_bytes_sent=stats.num_bytes,
            kv_blocks_sent=stats.num_blocks,
            prefill_seconds=prefill_s,
            transfer_seconds=stats.seconds,
            engine_queue_seconds=queue_s,
            engine_prefill_seconds=compute_s,
        )
        if out.logprobs:
            response.first_token_logprobs.CopyFrom(token_logprobs_to_pb(out.logprobs[0]))
        if len(outs) > 1:  # n completions: the decode worker forks them
            ordered = sorted(outs, key=lambda o: o.index)
            response.first_token_ids.extend(o.new_token_ids[0] for o in ordered)
            response.first_tokens_logprobs.extend(
                logprobs_list_to_pb([lp for o in ordered for lp in o.logprobs])
            )
        if out.prompt_logprobs is not None:
            response.prompt_logprobs.extend(logprobs_list_to_pb(out.prompt_logprobs))
        return response

    async def _stream(
        self,
        rid: str,
        request_id: str,
        destination: KvDestination,
        n_blocks: int,
        groups: asyncio.Queue[LayerGroupReady | None],
    ) -> TransferStats:
        """Send each layer group of ``rid`` once its layers are computed (module docstring, step 3).

        ``None`` in ``groups`` means the forward is over: layers not sent yet go in one
        message. Returns the summed bytes and the wall seconds from the first send to the last ack.
        """
        num_layers, kv_cache = self._rt.layout.num_layers, self._rt.runner.kv_cache
        next_layer, num_bytes, first = 0, 0, None
        while next_layer < num_layers:
            group = await groups.get()
            if group is None:  # no (more) groups will come
                table = await self._rt.loop.call(lambda c: c.scheduler.get_block_table(rid))
                start, end, block_table = next_layer, num_layers, tuple(table)
            elif group.layer_end <= next_layer:  # a repeat (the prompt was computed again)
                continue
            else:
                if group.event is not None:
                    await wait_cuda_event(group.event)
                start, end, block_table = group.layer_start, group.layer_end, group.block_table
            first = time.perf_counter() if first is None else first
            stats = await self._sender.send(
                request_id,
                destination,
                block_table[:n_blocks],
                kv_cache,
                layer_start=start,
                layer_end=end,
                last=end == num_layers,
            )
            num_bytes, next_layer = num_bytes + stats.num_bytes, end
        assert first is not None
        return TransferStats(num_bytes, n_blocks, time.perf_counter() - first)

    @staticmethod
    async def _first_output(queue: asyncio.Queue[EngineOutput]) -> EngineOutput:
        out = await queue.get()
        if isinstance(out, BaseException):
            raise out
        if not out.new_token_ids:
            raise RequestAborted(f"prefill of {out.req_id} ended without a token ({out.finish_reason})")
        return out

    async def _free(self, rid: str, abandoned: tuple[str, KvDestination] | None = None) -> None:
        """Release ``rid``'s held blocks, or abort it if it is still queued or running; when its
        stream was cut short (``abandoned``: request id and destination), first tell the sender
        (``KvSender.abandon``: no copy may still read the blocks, the decode side stops waiting)."""
        if abandoned is not None:
            await self._sender.abandon(*abandoned)

        def free(core: EngineCore) -> None:
            if not core.scheduler.release_held(rid):
                core.abort_request(rid)

        with contextlib.suppress(Exception):
            await self._rt.loop.call(free)
