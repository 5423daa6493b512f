"""The prefill worker process: ``tandem prefill``.

Adds to the shared worker start-up (``engine.worker_runtime``) the prefill role:
a KV sender of the configured transport and the ``PrefillWorker`` servicer.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from engine.worker_config import WorkerConfig
from engine.worker_runtime import WorkerRole, WorkerRuntime, run_worker
from kvtransfer.auto import AutoKvSender
from kvtransfer.base import KvSender
from kvtransfer.layout import KvLayout
from kvtransfer.registry import get_backend
from kvtransfer.tcp import TcpKvSender, client_ssl_context
from prefill_service.service import PrefillService
from tandem.v1 import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


def make_sender(config: WorkerConfig, layout: KvLayout, worker_id: str) -> KvSender:
    """The KV sender of ``config.kv_transport``; ``tcp``, also under ``auto``, crosses hosts and
    dials with TLS from the worker's gRPC certificates (``config.security.tls``) when configured.

    Raises:
        ValueError: unknown transport.
    """
    sender_cls, _receiver_cls = get_backend(config.kv_transport)
    if issubclass(sender_cls, TcpKvSender):
        return sender_cls(layout, worker_id, ssl_context=client_ssl_context(config.security.tls))
    if issubclass(sender_cls, AutoKvSender):
        return sender_cls(layout, worker_id, ssl_context=client_ssl_context(config.security.tls))
    return sender_cls(layout, worker_id)


class PrefillRole(WorkerRole):
    """A KV sender of the configured transport and the servicer."""

    service_name = SERVICE_NAME
    admission_methods = ("Prefill",)

    def add_servicers(self, runtime: WorkerRuntime, server: grpc.aio.Server) -> None:
        self.sender = make_sender(runtime.config, runtime.layout, runtime.worker_id)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillService(runtime, self.sender), server)

    async def stop(self, runtime: WorkerRuntime) -> None:
        await self.sender.close()


async def serve(config: WorkerConfig) -> None:
    """Run a prefill worker until SIGTERM/SIGINT."""
    await run_worker(config, PrefillRole())


def run(config: WorkerConfig) -> int:
    """Blocking entry point used by ``tandem prefill``; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s prefill %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0
