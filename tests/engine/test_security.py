"""TLS, mutual TLS and bearer tokens on a real ``GrpcProcess`` on loopback, with
certificates generated in the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.security import (
    UNAUTHENTICATED_MESSAGE,
    bearer_metadata,
    bearer_token,
    open_aio_channel,
    server_credentials,
    server_interceptors,
    token_matches,
)
from engine.security_config import SecurityConfig, TlsConfig
from engine.serving import GrpcProcess
from tests.helpers.certs import Pki, make_pki

SAY = "/test.Echo/Say"
COUNT = "/test.Echo/Count"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def add_echo(server: grpc.aio.Server) -> None:
    async def say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"echo:" + request

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i])

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Say": grpc.unary_unary_rpc_method_handler(say),
                    "Count": grpc.unary_stream_rpc_method_handler(count),
                },
            ),
        )
    )


async def with_server(
    server_security: SecurityConfig, body: Callable[[str], Awaitable[Any]], *, public: bool = True
) -> Any:
    process = GrpcProcess(
        "127.0.0.1",
        0,
        ["test.Echo"],
        add_echo,
        credentials=server_credentials(server_security.tls),
        interceptors=server_interceptors(server_security, public=public),
    )
    await process.start()
    await process.set_serving()
    try:
        return await body(process.address)
    finally:
        process.request_stop()
        await process.wait_for_termination()


async def call_say(
    address: str, security: SecurityConfig, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[str, bytes | str]:
    """``(status name, reply or details)`` of one ``Say`` call."""
    async with open_aio_channel(address, security) as channel:
        say = channel.unary_unary(SAY)
        try:
            reply = await say(b"hi", timeout=5, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
        return "OK", reply


def test_bearer_token_parsing_and_constant_time_match() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert bearer_token(None) is None
    assert token_matches("b", ["a", "b", "c"]) is True
    assert token_matches("bb", ["a", "b"]) is False
    assert token_matches("", ["a"]) is False
    assert bearer_metadata("t") == (("authorization", "Bearer t"),)
    assert bearer_metadata(None) == ()


def test_tls_server_accepts_verified_client_and_refuses_plaintext(pki: Pki) -> None:
    server = SecurityConfig(tls=TlsConfig(cert=pki.server_cert, key=pki.server_key))

    async def body(address: str) -> list[tuple[str, bytes | str]]:
        return [
            await call_say(address, SecurityConfig(tls=TlsConfig(ca=pki.ca))),
            ((await call_say(address, SecurityConfig()))[0], ""),
        ]

    ok, plaintext = asyncio.run(with_server(server, body))
    assert ok == ("OK", b"echo:hi")
    assert plaintext == ("UNAVAILABLE", "")


def test_mutual_tls_refuses_client_without_or_with_foreign_certificate(pki: Pki) -> None:
    server = SecurityConfig(
        tls=TlsConfig(cert=pki.server_cert, key=pki.server_key, ca=pki.ca, require_client_cert=True)
    )
    good = SecurityConfig(tls=TlsConfig(cert=pki.client_cert, key=pki.client_key, ca=pki.ca))
    no_cert = SecurityConfig(tls=TlsConfig(ca=pki.ca))
    rogue = SecurityConfig(tls=TlsConfig(cert=pki.rogue_cert, key=pki.rogue_key, ca=pki.ca))

    async def body(address: str) -> list[str]:
        return [(await call_say(address, sec))[0] for sec in (good, no_cert, rogue)]

    assert asyncio.run(with_server(server, body)) == ["OK", "UNAVAILABLE", "UNAVAILABLE"]


def test_bearer_tokens_checked_on_unary_and_stream_health_stays_open() -> None:
    server = SecurityConfig(auth_tokens=("alpha", "beta"))
    plain = SecurityConfig()

    async def body(address: str) -> dict[str, Any]:
        results: dict[str, Any] = {
            "missing": await call_say(address, plain),
            "wrong": await call_say(address, plain, bearer_metadata("gamma")),
            "right": await call_say(address, plain, bearer_metadata("beta")),
        }
        async with open_aio_channel(address, plain) as channel:
            count = channel.unary_stream(COUNT)
            try:
                results["stream_missing"] = [m async for m in count(b"", timeout=5)]
            except grpc.aio.AioRpcError as exc:
                results["stream_missing"] = exc.code().name
            results["stream_right"] = [
                m async for m in count(b"", timeout=5, metadata=bearer_metadata("alpha"))
            ]
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            results["health"] = health.status
        # A channel that adds the token to every call (what the router does for the internal token).
        async with open_aio_channel(address, plain, bearer_metadata("alpha")) as channel:
            results["channel_token"] = await channel.unary_unary(SAY)(b"x", timeout=5)
            results["channel_stream"] = [m async for m in channel.unary_stream(COUNT)(b"", timeout=5)]
        return results

    results = asyncio.run(with_server(server, body))
    assert results == {
        "missing": ("UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE),
        "wrong": ("UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE),
        "right": ("OK", b"echo:hi"),
        "stream_missing": "UNAUTHENTICATED",
        "stream_right": [b"\x00", b"\x01", b"\x02"],
        "health": health_pb2.HealthCheckResponse.SERVING,
        "channel_token": b"echo:x",
        "channel_stream": [b"\x00", b"\x01", b"\x02"],
    }


def test_internal_token_guards_worker_servers() -> None:
    server = SecurityConfig(internal_token="inside", auth_tokens=("public",))

    async def body(address: str) -> list[str]:
        plain = SecurityConfig()
        return [
            (await call_say(address, plain))[0],
            (await call_say(address, plain, bearer_metadata("public")))[0],
            (await call_say(address, plain, bearer_metadata("inside")))[0],
        ]

    # A worker (public=False) takes the internal token only, never a public one.
    assert asyncio.run(with_server(server, body, public=False)) == [
        "UNAUTHENTICATED",
        "UNAUTHENTICATED",
        "OK",
    ]


def test_server_without_tokens_has_no_interceptor() -> None:
    assert server_interceptors(SecurityConfig(), public=True) == []
    assert server_interceptors(SecurityConfig(auth_tokens=("a",)), public=False) == []


def test_tls_config_rejects_half_configurations(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        TlsConfig(cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="--tls-require-client-cert needs"):
        TlsConfig(require_client_cert=True)
