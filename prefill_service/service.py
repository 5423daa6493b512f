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
     verified every block;
  4. the blocks are released (``release_held``) and the first token returned.
A cancellation or error at any point aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import replace

import grpc

from engine.codec import sampling_params_from_pb, token_logprobs_to_pb
from engine.engine_core import EngineCore
from engine.errors import InvalidRequest, RequestAborted, TandemError
from engine.kv_cache_manager import cdiv
from engine.request import EngineOutput, Request
from engine.serving import abort_with
from engine.tracing import GEN_AI_USAGE_INPUT_TOKENS, span, transfer_attributes
from engine.worker_runtime import WorkerRuntime
from kvtransfer.base import KvSender
from kvtransfer.layout import KvDestination
from tandem.v1 import worker_pb2, worker_pb2_grpc


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    """Computes prompts and pushes their KV to decode workers."""

    def __init__(self, runtime: WorkerRuntime, sender: KvSender) -> None:
        self._rt = runtime
        self._sender = sender

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
        )
        queue = self._rt.loop.open_stream(rid)
        started = time.perf_counter()
        try:
            with span("prefill.queue"):  # until the engine thread takes it
                await self._rt.loop.call(lambda c: c.add_request(req))
            with span("prefill.compute") as compute:  # batch wait and compute
                out = await self._first_output(queue)
                compute.set_attributes(
                    {GEN_AI_USAGE_INPUT_TOKENS: len(prompt), "tandem.cached_tokens": out.num_cached_tokens}
                )
            prefill_s = time.perf_counter() - started
            with span("kv.transfer") as transfer:
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
            self._rt.loop.close_stream(rid)
            self._rt.spawn(self._free(rid))
        self._rt.metrics.observe_transfer(destination.transport, stats.num_bytes, stats.seconds)
        self._rt.metrics.prompt_tokens.inc(len(prompt))
        self._rt.metrics.prefix_cache_hit_tokens.inc(out.num_cached_tokens)
        self._rt.metrics.prefill_tokens.inc(len(prompt) - out.num_cached_tokens)
        response = worker_pb2.PrefillResponse(
            first_token_id=out.new_token_ids[0],
            num_cached_tokens=out.num_cached_tokens,
            kv_bytes_sent=stats.num_bytes,
            kv_blocks_sent=stats.num_blocks,
            prefill_seconds=prefill_s,
            transfer_seconds=stats.seconds,
        )
        if out.logprobs:
            response.first_token_logprobs.CopyFrom(token_logprobs_to_pb(out.logprobs[0]))
        return response

    @staticmethod
    async def _first_output(queue: asyncio.Queue[EngineOutput]) -> EngineOutput:
        out = await queue.get()
        if isinstance(out, BaseException):
            raise out
        if not out.new_token_ids:
            raise RequestAborted(f"prefill of {out.req_id} ended without a token ({out.finish_reason})")
        return out

    async def _free(self, rid: str) -> None:
        """Release ``rid``'s held blocks, or abort it if it is still queued or running."""

        def free(core: EngineCore) -> None:
            if not core.scheduler.release_held(rid):
                core.abort_request(rid)

        with contextlib.suppress(Exception):
            await self._rt.loop.call(free)
