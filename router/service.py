"""The public ``tandem.v1.Generation`` servicer: thin, async, protobuf at the edge.

Each call: bound the number of requests in flight (``RESOURCE_EXHAUSTED`` past
it), validate and tokenize (``INVALID_ARGUMENT``), run the request through the
:class:`Orchestrator`, detokenize incrementally, cut the text at the first stop
string (``engine.stop``: text that could begin a stop string is held back until
it cannot; on a match the stream ends with ``FINISH_REASON_STOP`` and the decode
call is cancelled, which frees the request's blocks) and answer. With ``n`` > 1
each completion has its own detokenizer and stop matcher, messages carry the
completion's ``index``, and the stream ends once every completion has ended; a
completion cut by a stop string while others run is cancelled on its worker
(``router.completion_cancel``: ``CancelCompletion`` frees its blocks). Errors map to
status codes in one place (``engine.serving.abort_with``); a worker's status is
passed on as it came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from engine.codec import finish_reason_to_pb, logprobs_list_to_pb
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import CapacityExceeded, InvalidRequest, TandemError
from engine.logging_setup import log_request
from engine.metrics import ProcessMetrics, RequestTimer
from engine.serving import abort_with
from engine.stop import StopStringMatcher
from engine.tokenizer import Tokenizer
from engine.tracing import annotate_request, annotate_result
from router.completion_cancel import CompletionCanceller
from router.orchestrator import Orchestrator
from router.validation import ParsedRequest, parse_generate_request
from tandem.v1 import generation_pb2, generation_pb2_grpc, kv_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """What the router knows of the served model (from config.json and tokenizer.json).

    ``block_size`` and ``dtype`` are defaults: ``GetModelInfo`` reports the
    workers' own layout when a worker is registered.
    """

    name: str
    architecture: str
    max_model_len: int
    vocab_size: int
    block_size: int
    dtype: str


class GenerationService(generation_pb2_grpc.GenerationServicer):
    """Serves ``Generate``, ``GenerateStream`` and ``GetModelInfo``."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        tokenizer: Tokenizer,
        model: ServedModel,
        metrics: ProcessMetrics,
        *,
        max_inflight: int,
        worker_layout: Callable[[], kv_pb2.LayoutDescriptor | None] = lambda: None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self._orchestrator = orchestrator
        self._tokenizer = tokenizer
        self._model = model
        self._metrics = metrics
        self._max_inflight = max_inflight
        self._worker_layout = worker_layout
        self._max_prompt_tokens = max_prompt_tokens
        self._inflight = 0

    async def GetModelInfo(
        self, request: generation_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ModelInfo:
        m = self._model
        layout = self._worker_layout()  # what the workers actually run, when one is up
        return generation_pb2.ModelInfo(
            model_name=m.name,
            architecture=m.architecture,
            max_model_len=m.max_model_len,
            vocab_size=m.vocab_size,
            block_size=layout.block_size if layout else m.block_size,
            dtype=layout.dtype if layout else m.dtype,
        )

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        choices: dict[int, generation_pb2.Completion] = {}
        prompt_logprobs: list[generation_pb2.TokenLogprobs] = []
        last = generation_pb2.GenerateStreamResponse()
        async for msg in self._stream(request, context):
            choice = choices.setdefault(msg.index, generation_pb2.Completion(index=msg.index))
            choice.token_ids.extend(msg.token_ids)
            choice.text += msg.text
            choice.logprobs.extend(msg.logprobs)
            if msg.finish_reason:
                choice.finish_reason = msg.finish_reason
            prompt_logprobs.extend(msg.prompt_logprobs)
            last = msg
        first = choices.get(0, generation_pb2.Completion())
        return generation_pb2.GenerateResponse(
            request_id=last.request_id,
            text=first.text,
            token_ids=first.token_ids,
            finish_reason=first.finish_reason,
            usage=last.usage,
            logprobs=first.logprobs,
            choices=[choices[i] for i in sorted(choices)],
            prompt_logprobs=prompt_logprobs,
        )

    async def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async for msg in self._stream(request, context):
            yield msg

    async def _stream(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        code, timer, parsed = "OK", RequestTimer(), None
        self._inflight += 1
        self._metrics.requests_running.set(self._inflight)
        try:
            if self._inflight > self._max_inflight:
                raise CapacityExceeded(f"router queue is full ({self._max_inflight} requests in flight)")
            parsed = parse_generate_request(
                request,
                self._tokenizer,
                vocab_size=self._model.vocab_size,
                max_model_len=self._model.max_model_len,
            )
            n_prompt, limit = len(parsed.prompt_token_ids), self._max_prompt_tokens
            if limit is not None and n_prompt > limit:
                raise InvalidRequest("prompt", f"{n_prompt} tokens, more than the {limit} accepted")
            annotate_request(
                model=self._model.name,
                request_id=parsed.request_id,
                max_tokens=parsed.sampling.max_tokens,
                input_tokens=n_prompt,
            )
            async for msg in self._run(parsed, context, timer):
                yield msg
        except TandemError as exc:
            code = exc.grpc_code
            await abort_with(context, exc)
        except grpc.aio.AioRpcError as exc:  # a worker's status, passed on
            code = exc.code().name
            await context.abort(exc.code(), f"worker error: {exc.details()}")
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            self._inflight -= 1
            self._metrics.requests_running.set(self._inflight)
            self._end(request, parsed, timer, code)

    def _end(
        self,
        request: generation_pb2.GenerateRequest,
        parsed: ParsedRequest | None,
        timer: RequestTimer,
        code: str,
    ) -> None:
        """Metrics, span attributes and the log line of a request that ended with ``code``."""
        self._metrics.observe_request(timer, code)
        annotate_result(
            output_tokens=timer.num_output_tokens,
            finish_reason=timer.finish_reason,
            cached_prompt_tokens=timer.num_cached_tokens,
        )
        log_request(
            request_id=parsed.request_id if parsed else request.request_id,
            status=code,
            finish_reason=timer.finish_reason,
            prompt_tokens=len(parsed.prompt_token_ids) if parsed else 0,
            cached_tokens=timer.num_cached_tokens,
            completion_tokens=timer.num_output_tokens,
            ttft_s=timer.ttft_s,
            e2e_s=timer.elapsed_s,
            prompt=request.prompt or list(request.prompt_token_ids),
        )

    async def _run(
        self, req: ParsedRequest, context: grpc.aio.ServicerContext, timer: RequestTimer
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        # One detokenizer and stop matcher per completion (sampling.n); a completion cut by a
        # stop string while others run is cancelled on the worker, and its later tokens ignored.
        n = req.sampling.n
        canceller = CompletionCanceller()
        detoks = [IncrementalDetokenizer(self._tokenizer, req.prompt_token_ids) for _ in range(n)]
        stoppers = [StopStringMatcher(req.sampling.stop) for _ in range(n)]
        done: set[int] = set()
        n_generated = 0
        cached = 0
        # aclosing: leaving early (stop strings) closes the orchestrator's stream now,
        # which cancels the decode call.
        async with contextlib.aclosing(
            self._orchestrator.generate(req, context.time_remaining(), canceller)
        ) as chunks:
            async for chunk in chunks:
                i = chunk.index
                if i in done:
                    continue
                detok, stopper = detoks[i], stoppers[i]
                n_generated += len(chunk.token_ids)
                self._metrics.observe_tokens(timer, len(chunk.token_ids))
                msg = generation_pb2.GenerateStreamResponse(
                    request_id=req.request_id,
                    token_ids=chunk.token_ids,
                    text=stopper.push(detok.push(chunk.token_ids)),
                    logprobs=logprobs_list_to_pb(chunk.logprobs),
                    index=i,
                    prompt_logprobs=logprobs_list_to_pb(chunk.prompt_logprobs or []),
                )
                cached = max(cached, chunk.num_cached_tokens)
                timer.num_cached_tokens = cached
                finish = chunk.finish_reason
                if finish is not None and not stopper.stopped:
                    msg.text += stopper.push(detok.finish())
                    msg.text += stopper.flush()
                if stopper.stopped:
                    finish = "stop"
                if finish is not None:
                    msg.finish_reason = finish_reason_to_pb(finish)
                    done.add(i)
                    if chunk.finish_reason is None and len(done) < n:  # the worker still runs it
                        canceller.cancel(i)
                if len(done) == n:
                    msg.usage.CopyFrom(
                        generation_pb2.Usage(
                            prompt_tokens=len(req.prompt_token_ids),
                            completion_tokens=n_generated,
                            cached_prompt_tokens=cached,
                        )
                    )
                    self._metrics.prompt_tokens.inc(len(req.prompt_token_ids))
                    timer.finish_reason = finish
                yield msg
                if len(done) == n:
                    return
