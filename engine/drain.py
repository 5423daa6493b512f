"""Graceful drain of a gRPC process on SIGTERM (torch-free).

Stages, as :func:`run_drain` drives them (``engine.serving.GrpcProcess`` calls it):
  1. ``before``: leave the Redis registry first, so routers stop picking the process;
  2. report NOT_SERVING on health (routers that still know it drop it at their next check);
  3. keep admitting for ``announce_s`` seconds while routers notice;
  4. close the :class:`DrainGate`: the admission methods (a new request) are refused
     with ``UNAVAILABLE``; calls that continue admitted work (a ``Decode`` of a
     reservation made earlier, a ``Release``) still pass;
  5. wait until no call is in flight and ``is_idle()`` holds (no request left in the
     engine, no reservation waiting), or ``timeout_s`` seconds after stage 1;
  6. the caller stops the server (calls still running are cancelled) and exits 0.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import grpc

from engine.security import OPEN_METHOD_PREFIXES, deny_handler

logger = logging.getLogger(__name__)

DRAINING_MESSAGE = "server is draining; retry on another worker"


@dataclass
class DrainPlan:
    """How one process drains.

    Attributes:
        timeout_s: most seconds from SIGTERM to stopping the server.
        admission_methods: full method names (``/pkg.Service/Method``) that admit
            new work; refused once the gate closes.
        announce_s: seconds between NOT_SERVING and closing the gate.
        is_idle: whether the process holds no admitted work (besides calls in flight).
        before: run first (deregistration); errors are logged.
        poll_s: seconds between idleness checks.
    """

    timeout_s: float = 30.0
    admission_methods: Collection[str] = ()
    announce_s: float = 0.0
    is_idle: Callable[[], bool] = lambda: True
    before: Callable[[], Awaitable[None]] | None = None
    poll_s: float = 0.05
    gate: DrainGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = DrainGate(self.admission_methods)


class DrainGate(grpc.aio.ServerInterceptor):
    """Counts calls in flight and, once closed, refuses the admission methods with ``UNAVAILABLE``.

    Health and reflection calls are neither counted nor refused.
    """

    def __init__(self, admission_methods: Collection[str]) -> None:
        self._admission = frozenset(admission_methods)
        self.closed = False
        self.inflight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self.closed and method in self._admission:
            return deny_handler(handler, grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        return self._counted(handler)

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        for kind, build in kinds.items():
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return build(  # type: ignore[no-any-return]
                    self._wrap(behaviour),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        raise AssertionError("an RPC method handler has one behaviour")

    def _wrap(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                self.inflight += 1
                try:
                    async for message in behaviour(request, context):
                        yield message
                finally:
                    self.inflight -= 1

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.inflight += 1
            try:
                return await behaviour(request, context)
            finally:
                self.inflight -= 1

        return call


async def run_drain(plan: DrainPlan, set_not_serving: Callable[[], Awaitable[None]]) -> bool:
    """Stages 1-5 of the module docstring; returns whether the process went idle in time."""
    start = time.monotonic()
    if plan.before is not None:
        try:
            await plan.before()
        except Exception:
            logger.exception("drain: deregistration failed")
    await set_not_serving()
    await asyncio.sleep(min(plan.announce_s, plan.timeout_s))
    plan.gate.closed = True
    logger.info("draining: new requests refused, waiting for %d calls in flight", plan.gate.inflight)
    while plan.gate.inflight > 0 or not plan.is_idle():
        if time.monotonic() - start >= plan.timeout_s:
            logger.warning("drain timeout (%.1f s): %d calls cut short", plan.timeout_s, plan.gate.inflight)
            return False
        await asyncio.sleep(plan.poll_s)
    logger.info("drained in %.2f s", time.monotonic() - start)
    return True


def once(fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """``fn`` wrapped to run at most once; later calls wait for the first one."""
    task: asyncio.Task[None] | None = None

    async def run() -> None:
        nonlocal task
        if task is None:

            async def wrapper() -> None:
                await fn()

            task = asyncio.ensure_future(wrapper())
        await asyncio.shield(task)

    return run
