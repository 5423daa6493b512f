"""gRPC security mechanics shared by every Tandem server and client (torch-free).

Servers:
  - :func:`server_credentials` turns a :class:`~engine.security_config.TlsConfig`
    into TLS (or mutual TLS) server credentials, ``None`` for plaintext;
  - :class:`TokenAuthInterceptor` refuses a call whose ``authorization:
    Bearer <token>`` metadata is missing or matches none of the accepted
    tokens with ``UNAUTHENTICATED``; health and reflection stay open.
    The router's public API takes the ``--auth-token`` list, workers take
    the internal token (:func:`server_interceptors`).

Clients:
  - :func:`channel_credentials`, :func:`open_channel` (sync) and
    :func:`open_aio_channel` (``grpc.aio``) dial with TLS when configured;
  - :func:`metadata_interceptors` add fixed metadata (the internal token) to
    every call of a ``grpc.aio`` channel; :func:`bearer_metadata` builds it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from engine.security_config import SecurityConfig, TlsConfig

#: Metadata key of the bearer token (gRPC metadata keys are lower case).
AUTHORIZATION = "authorization"
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
#: Methods that stay open without a token: health checks and server reflection.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

Metadata = tuple[tuple[str, str], ...]


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Server and channel options: the largest message sent and received, in bytes."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _read(path: Any) -> bytes | None:
    return None if path is None else bytes(path.read_bytes())


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """TLS server credentials of ``tls``, or ``None`` when it has no certificate.

    With ``tls.ca`` the server asks clients for a certificate signed by it, and
    with ``tls.require_client_cert`` refuses clients without one.

    Raises:
        OSError: a certificate file cannot be read.
    """
    if not tls.server_enabled:
        return None
    key, cert = _read(tls.key), _read(tls.cert)
    assert key is not None and cert is not None  # TlsConfig checks they go together
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=_read(tls.ca), require_client_auth=tls.require_client_cert
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials | None:
    """TLS channel credentials of ``tls`` (``None``: plaintext).

    The server is verified with ``tls.ca`` (or the system roots); ``tls.cert``
    and ``tls.key``, when given, are presented for mutual TLS.

    Raises:
        OSError: a certificate file cannot be read.
    """
    if not tls.client_enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca), private_key=_read(tls.key), certificate_chain=_read(tls.cert)
    )


def bearer_metadata(token: str | None) -> Metadata:
    """``(("authorization", "Bearer <token>"),)``, or ``()`` without a token."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


def open_channel(target: str, security: SecurityConfig) -> grpc.Channel:
    """A blocking channel to ``target`` with ``security``'s TLS and message limit."""
    options = grpc_options(security.max_message_bytes)
    creds = channel_credentials(security.tls)
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)


def open_aio_channel(target: str, security: SecurityConfig, metadata: Metadata = ()) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target`` with ``security``'s TLS and message
    limit that sends ``metadata`` on every call."""
    options = grpc_options(security.max_message_bytes)
    interceptors = metadata_interceptors(metadata) if metadata else None
    creds = channel_credentials(security.tls)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)


class _AddMetadata:
    """Appends fixed metadata to a call's details."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under the first call kind it implements, so
# every kind needs its own class.
class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return await continuation(self._details(client_call_details), requests)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), requests)


def metadata_interceptors(metadata: Metadata) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that append ``metadata`` to every call of a ``grpc.aio`` channel."""
    return [kind(metadata) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def token_matches(given: str, tokens: Sequence[str]) -> bool:
    """Whether ``given`` equals one of ``tokens``, comparing with every token in constant time."""
    given_bytes = given.encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given_bytes, token.encode())
    return matched


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the ``authorization: Bearer <token>`` entry of ``metadata``, or ``None``."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION or not isinstance(value, str):
            continue
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def deny_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends every call with ``code`` and ``message``,
    without parsing the request."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    build: Callable[..., grpc.RpcMethodHandler]
    if handler.request_streaming and handler.response_streaming:
        build = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        build = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        build = grpc.unary_stream_rpc_method_handler
    else:
        build = grpc.unary_unary_rpc_method_handler
    return build(deny, response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without one of ``tokens`` as a bearer token (``UNAUTHENTICATED``).

    Args:
        tokens: accepted tokens (at least one).
        open_prefixes: method-name prefixes served without a token.
    """

    def __init__(self, tokens: Sequence[str], open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES) -> None:
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._tokens = tuple(tokens)
        self._open = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(self._open):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        if token is not None and token_matches(token, self._tokens):
            return handler
        return deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def server_interceptors(security: SecurityConfig, *, public: bool) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors of a server: the public API checks ``auth_tokens``, workers the internal token."""
    tokens: Sequence[str] = (
        security.auth_tokens if public else ((security.internal_token,) if security.internal_token else ())
    )
    return [TokenAuthInterceptor(tokens)] if tokens else []
