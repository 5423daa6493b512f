"""Graceful drain of a real ``GrpcProcess``: deregister first, NOT_SERVING, admit during
the announce window, then refuse new requests while admitted work finishes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.drain import DRAINING_MESSAGE, DrainPlan, once
from engine.serving import GrpcProcess


def add_service(server: grpc.aio.Server) -> None:
    async def start(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"started"

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(6):
            await asyncio.sleep(0.1)
            yield bytes([i])

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Svc",
                {
                    "Start": grpc.unary_unary_rpc_method_handler(start),
                    "Slow": grpc.unary_stream_rpc_method_handler(slow),
                },
            ),
        )
    )


async def drain_scenario() -> dict[str, object]:
    events: list[str] = []
    pending = {"reservations": 1}  # admitted work outside any call (a reservation)

    async def deregister() -> None:
        events.append("deregistered")

    plan = DrainPlan(
        timeout_s=5.0,
        admission_methods=["/test.Svc/Start"],
        announce_s=0.3,
        is_idle=lambda: pending["reservations"] == 0,
        before=deregister,
    )
    process = GrpcProcess("127.0.0.1", 0, ["test.Svc"], add_service, drain=plan)
    await process.start()
    await process.set_serving()
    out: dict[str, object] = {}
    async with grpc.aio.insecure_channel(process.address) as channel:
        start = channel.unary_unary("/test.Svc/Start")
        health = health_pb2_grpc.HealthStub(channel)
        stream = channel.unary_stream("/test.Svc/Slow")(b"", timeout=10)
        first = await stream.read()  # the call is in flight before SIGTERM
        began = time.monotonic()
        process.request_stop()
        waiter = asyncio.create_task(process.wait_for_termination())
        await asyncio.sleep(0.1)
        out["health_while_draining"] = (await health.Check(health_pb2.HealthCheckRequest(), timeout=2)).status
        out["during_announce"] = await start(b"", timeout=2)
        await asyncio.sleep(0.3)
        try:
            await start(b"", timeout=2)
        except grpc.aio.AioRpcError as exc:
            out["after_announce"] = (exc.code().name, exc.details())
        rest = []
        while (message := await stream.read()) is not grpc.aio.EOF:
            rest.append(message)
        out["stream"] = [first, *rest]
        await asyncio.sleep(0.2)
        out["waiting_for_reservation"] = not waiter.done()
        pending["reservations"] = 0
        await asyncio.wait_for(waiter, timeout=5)
        out["drain_s_ok"] = 0.7 < time.monotonic() - began < 3.0
    out["events"] = events
    return out


def test_drain_finishes_admitted_work_and_refuses_new_requests() -> None:
    assert asyncio.run(drain_scenario()) == {
        "health_while_draining": health_pb2.HealthCheckResponse.NOT_SERVING,
        "during_announce": b"started",
        "after_announce": ("UNAVAILABLE", DRAINING_MESSAGE),
        "stream": [bytes([i]) for i in range(6)],
        "waiting_for_reservation": True,
        "drain_s_ok": True,
        "events": ["deregistered"],
    }


async def drain_times_out() -> float:
    plan = DrainPlan(timeout_s=0.3, is_idle=lambda: False)
    process = GrpcProcess("127.0.0.1", 0, [], lambda server: None, drain=plan)
    await process.start()
    began = time.monotonic()
    process.request_stop()
    await process.wait_for_termination()
    return time.monotonic() - began


def test_drain_gives_up_after_timeout() -> None:
    assert 0.3 <= asyncio.run(drain_times_out()) < 2.0


def test_once_runs_the_coroutine_function_once() -> None:
    calls: list[int] = []

    async def stop() -> None:
        await asyncio.sleep(0.01)
        calls.append(1)

    async def main() -> None:
        wrapped = once(stop)
        await asyncio.gather(wrapped(), wrapped())
        await wrapped()

    asyncio.run(main())
    assert calls == [1]
