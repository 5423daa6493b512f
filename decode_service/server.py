"""The decode worker process: ``tandem decode``.

Adds to the shared worker start-up (``engine.worker_runtime``) the decode role:
a KV receiver and the ``DecodeWorker`` servicer.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from decode_service.service import DecodeService
from engine.worker_config import WorkerConfig
from engine.worker_runtime import WorkerRole, WorkerRuntime, run_worker
from kvtransfer.base import KvReceiver
from kvtransfer.registry import get_backend, receiver_backend
from kvtransfer.tcp import TcpKvReceiver, server_ssl_context
from tandem.v1 import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name


class DecodeRole(WorkerRole):
    """A KV receiver of the configured transport, bound before registration so
    that its address is in the worker's registry entry, and the servicer."""

    service_name = SERVICE_NAME
    admission_methods = ("Reserve", "Generate")

    def __init__(self) -> None:
        self.service: DecodeService | None = None
        self.receiver: KvReceiver | None = None

    def add_servicers(self, runtime: WorkerRuntime, server: grpc.aio.Server) -> None:
        self.service = DecodeService(runtime)
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self.service, server)

    async def start(self, runtime: WorkerRuntime) -> tuple[str, str]:
        config = runtime.config
        transport = receiver_backend(config.kv_transport, runtime.runner.kv_cache)  # auto on CPU = tcp
        _sender_cls, receiver_cls = get_backend(transport)
        tls = {}  # the tcp backend crosses hosts: TLS with the worker's gRPC certificates
        if issubclass(receiver_cls, TcpKvReceiver):
            tls = {"ssl_context": server_ssl_context(config.security.tls)}
        self.receiver = receiver_cls(
            runtime.runner.kv_cache,
            runtime.layout,
            runtime.worker_id,
            0,
            host=config.host,
            port=config.transfer_port,
            **tls,
        )
        address = config.advertised(await self.receiver.start())  # what prefill workers dial
        assert self.service is not None
        self.service.attach(self.receiver, address)
        return transport, address

    def on_registered(self, runtime: WorkerRuntime) -> None:
        assert self.receiver is not None
        self.receiver.epoch = runtime.epoch

    def is_idle(self, runtime: WorkerRuntime) -> bool:
        """No request in the engine and no reservation waiting for its ``Decode``."""
        assert self.service is not None
        return super().is_idle(runtime) and len(self.service.table) == 0

    async def stop(self, runtime: WorkerRuntime) -> None:
        if self.receiver is not None:
            await self.receiver.close()


async def serve(config: WorkerConfig) -> None:
    """Run a decode worker until SIGTERM/SIGINT."""
    await run_worker(config, DecodeRole())


def run(config: WorkerConfig) -> int:
    """Blocking entry point used by ``tandem decode``; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s decode %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0
