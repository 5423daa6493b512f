"""Ending one completion of an ``n`` > 1 request on the worker that generates it.

The router cuts a completion at a stop string; without telling the worker, the
worker would generate it on to ``max_tokens`` (decode steps and KV blocks for
text nobody reads). :class:`CompletionCanceller` sends the worker's
``DecodeWorker.CancelCompletion`` for such a completion, in the background with
a short deadline (a failure is logged only: the worker ends the completion with
the rest of the request anyway). The orchestrator :meth:`~CompletionCanceller.attach`\\ es
the worker's stream once its first message arrived (so the worker knows the
request id); cancels asked before then (a stop string in a completion's first
token, sampled by the prefill worker) are sent at that moment. After a
migration (``router.migration``) a completion runs as a stream of its own:
:meth:`~CompletionCanceller.redirect` makes cancelling it end that stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from tandem.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

#: Deadline of one ``CancelCompletion`` call (seconds).
CANCEL_TIMEOUT_S = 2.0


class CompletionCanceller:
    """Cancels completions of one request on its decode (or colocated) worker."""

    def __init__(self) -> None:
        self._stub: worker_pb2_grpc.DecodeWorkerStub | None = None
        self._worker_request_id = ""
        self._pending: set[int] = set()
        self._cancelled: set[int] = set()
        self._redirects: dict[int, Callable[[], object]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, stub: worker_pb2_grpc.DecodeWorkerStub, worker_request_id: str) -> None:
        """The worker stream ``worker_request_id`` (the ``request_id`` the worker was given)
        now generates the request; send the cancels asked so far."""
        if self._stub is stub and self._worker_request_id == worker_request_id:
            return
        self._stub, self._worker_request_id = stub, worker_request_id
        for index in sorted(self._pending):
            self._send(index)
        self._pending.clear()

    def cancel(self, index: int) -> None:
        """End completion ``index`` on the worker (now, or once a worker stream is attached);
        never raises, never waits."""
        self._cancelled.add(index)
        if index in self._redirects:
            self._redirects.pop(index)()
        elif self._stub is None:
            self._pending.add(index)
        else:
            self._send(index)

    def redirect(self, index: int, end: Callable[[], object]) -> None:
        """Completion ``index`` now runs as a stream of its own: cancelling it calls ``end``
        (at once when it was cancelled already)."""
        if index in self._cancelled:
            end()
        else:
            self._redirects[index] = end

    def _send(self, index: int) -> None:
        assert self._stub is not None
        request = worker_pb2.CancelCompletionRequest(request_id=self._worker_request_id, index=index)
        task = asyncio.get_running_loop().create_task(_call(self._stub, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _call(stub: worker_pb2_grpc.DecodeWorkerStub, request: worker_pb2.CancelCompletionRequest) -> None:
    try:
        reply = await stub.CancelCompletion(request, timeout=CANCEL_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        logger.warning(
            "cancelling completion %d of %s failed: %s %s",
            request.index,
            request.request_id,
            exc.code().name,
            exc.details(),
        )
        return
    if not reply.known:
        logger.debug("completion %d of %s: stream already ended", request.index, request.request_id)
