"""What every Tandem gRPC server shares (torch-free): start-up, health,
reflection, error mapping and graceful shutdown on SIGTERM/SIGINT.

Lifecycle of a process built on :class:`GrpcProcess`:
  1. ``start()`` binds the server with the health and reflection services and
     reports NOT_SERVING;
  2. the caller finishes its own start-up and calls ``set_serving()``;
  3. SIGTERM or SIGINT reports NOT_SERVING, stops accepting new calls, lets
     calls in flight finish for ``grace_s`` seconds, then returns from
     ``wait_for_termination()``; with a :class:`engine.drain.DrainPlan` it
     deregisters first and finishes admitted work (see ``engine.drain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.drain import DrainPlan, run_drain
from engine.errors import grpc_status_name
from engine.security import grpc_options
from engine.security_config import DEFAULT_MAX_MESSAGE_BYTES
from engine.tracing import server_interceptors

logger = logging.getLogger(__name__)

#: Default largest gRPC message accepted or sent (bytes); ``--max-message-bytes`` changes it.
MAX_MESSAGE_BYTES = DEFAULT_MAX_MESSAGE_BYTES


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` an exception maps to (see ``engine.errors``)."""
    return grpc.StatusCode[grpc_status_name(exc)]


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status code mapped from ``exc`` and its message."""
    await context.abort(status_code_for(exc), str(exc) or type(exc).__name__)
    raise AssertionError("unreachable: context.abort raises")


class GrpcProcess:
    """A ``grpc.aio`` server with health, reflection and signal-driven drain.

    Args:
        host: bind address.
        port: bind port (0 picks a free one; see :attr:`port` after start).
        service_names: full names of the services added (for reflection and
            health), e.g. ``"tandem.v1.Generation"``.
        add_servicers: callback that adds the process's servicers to the server.
        grace_s: seconds calls in flight get to finish on shutdown (without ``drain``).
        credentials: TLS server credentials (``engine.security.server_credentials``);
            ``None`` serves plaintext.
        interceptors: server interceptors (authentication), run in order.
        max_message_bytes: largest message received or sent (bytes).
        drain: how SIGTERM drains the process (``engine.drain``); ``None``: stop
            accepting calls at once and give those in flight ``grace_s``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        service_names: Sequence[str],
        add_servicers: Callable[[grpc.aio.Server], None],
        *,
        grace_s: float = 10.0,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        drain: DrainPlan | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.grace_s = grace_s
        self._credentials = credentials
        # Tracing last (none while it is off): it sees only calls that were let through.
        self._interceptors = [*interceptors, *([drain.gate] if drain else []), *server_interceptors()]
        self._max_message_bytes = max_message_bytes
        self._drain = drain
        self._service_names = list(service_names)
        self._add_servicers = add_servicers
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._stop = asyncio.Event()

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and start the server, reporting NOT_SERVING until :meth:`set_serving`.

        Raises:
            RuntimeError: the port could not be bound.
        """
        server = grpc.aio.server(
            options=grpc_options(self._max_message_bytes), interceptors=self._interceptors or None
        )
        self._add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        address = f"{self.host}:{self.port}"
        if self._credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, self._credentials)
        if bound == 0:
            raise RuntimeError(f"cannot bind gRPC server to {self.host}:{self.port}")
        self.port = bound
        await server.start()
        self._server = server
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
                loop.add_signal_handler(sig, self.request_stop)

    async def set_serving(self) -> None:
        """Report SERVING on the overall health and on every service."""
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)

    async def _set_status(self, status: int) -> None:
        for name in ["", *self._service_names]:
            result = self._health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested (SIGTERM or :meth:`request_stop`)."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the process to drain and stop (what SIGTERM does)."""
        logger.info("stop requested: draining")
        self._stop.set()

    async def wait_for_termination(self) -> None:
        """Block until a stop is requested, then report NOT_SERVING and drain."""
        await self._stop.wait()
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        if self._drain is None:
            await self._set_status(not_serving)
        else:
            await run_drain(self._drain, lambda: self._set_status(not_serving))
        if self._server is not None:
            await self._server.stop(self.grace_s if self._drain is None else 1.0)
