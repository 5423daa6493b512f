"""The ``tcp`` backend: KV blocks over asyncio streams, between processes and across hosts.

Per message the sender writes a header frame (4-byte big-endian length +
serialized ``KvTransferHeader``) followed by ``payload_bytes`` raw bytes, then
reads one ack frame (length + ``KvTransferAck``); see :mod:`kvtransfer.framing`.
The sender keeps one connection per receiver address, used by one message at a
time (a lock per connection), and reconnects once when a reused connection turns
out broken. The receiver bounds what a peer can make it allocate: header frames
up to :data:`kvtransfer.framing.MAX_HEADER_BYTES`, payloads exactly the size the
header's blocks and layers imply under the receiver's layout. A refused message's
payload is read and dropped in bounded chunks so the connection stays usable; a
header it cannot trust (oversized, unparsable, payload larger than the whole
cache) is answered and the connection closed.

TLS: given an ``ssl.SSLContext`` (:func:`server_ssl_context` and
:func:`client_ssl_context` build them from the worker's
:class:`~engine.security_config.TlsConfig`, the same certificates as its gRPC
server and channels), the receiver listens with TLS, asking for a client
certificate signed by the CA and, under mutual TLS, refusing peers without one;
the sender verifies the receiver's certificate against the CA and the host of
the transfer address, presenting its own certificate when it has one. A peer
that fails the handshake is dropped before a byte of its message is read.

Fault injection (tests only; off unless the variable is set):
``TANDEM_FAULT_INJECT``, read once when a sender is built, is a comma-separated
list of faults applied to that sender's first messages, one each, in order;
later messages are untouched. ``corrupt_kv_once`` flips one payload bit after
the checksums were computed (the receiver must refuse it with ``DATA_LOSS``);
``drop_kv_once`` cuts the connection halfway through the payload (the transfer
fails with ``UNAVAILABLE``, or is resent on a fresh connection when the cut one
had been reused); ``stall_kv_once`` pauses :data:`FAULT_STALL_S` seconds halfway
through the payload (a window to cancel or expire a request mid-transfer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from engine.errors import InvalidRequest, TransferFailed
from engine.security_config import TlsConfig
from kvtransfer import framing
from kvtransfer.base import KvReceiver, KvSender, TransferStats
from kvtransfer.layout import KvDestination, KvLayout
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to a receiver (TLS handshake included).
CONNECT_TIMEOUT_S = 10.0
#: Seconds a receiver waits for a peer's TLS handshake.
HANDSHAKE_TIMEOUT_S = 10.0
#: Environment variable of the test-only fault hook (see the module docstring).
FAULT_INJECT_ENV = "TANDEM_FAULT_INJECT"
#: Faults :data:`FAULT_INJECT_ENV` may list.
FAULTS = ("corrupt_kv_once", "drop_kv_once", "stall_kv_once")
#: Seconds a ``stall_kv_once`` message pauses halfway through its payload.
FAULT_STALL_S = 3.0


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The receiver's TLS context of ``tls``, or ``None`` (plaintext) when it has no certificate.

    With ``tls.ca`` peers are asked for a certificate signed by it (and refused when
    they present another); with ``tls.require_client_cert`` they must present one.

    Raises:
        OSError, ssl.SSLError: a certificate or key file cannot be read or parsed.
    """
    if not tls.server_enabled:
        return None
    assert tls.cert is not None and tls.key is not None  # TlsConfig checks they go together
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        context.load_verify_locations(cafile=tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The sender's TLS context of ``tls``, or ``None`` (plaintext) when TLS is off for clients.

    The receiver's certificate is verified against ``tls.ca`` (the system roots
    without one) and the host of the transfer address; ``tls.cert`` and ``tls.key``,
    when given, are presented for mutual TLS.

    Raises:
        OSError, ssl.SSLError: a certificate or key file cannot be read or parsed.
    """
    if not tls.client_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def faults_from_env(env: Mapping[str, str] = os.environ) -> list[str]:
    """The faults :data:`FAULT_INJECT_ENV` lists, in order (empty: none, the default).

    Raises:
        ValueError: a fault not in :data:`FAULTS`.
    """
    faults = [f.strip() for f in env.get(FAULT_INJECT_ENV, "").split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(
            f"{FAULT_INJECT_ENV}: unknown faults {unknown}; expected some of {', '.join(FAULTS)}"
        )
    if faults:
        logger.warning("test-only fault injection on: %s", ",".join(faults))
    return faults


class _Connection:
    """One stream to a receiver address, used by one message at a time."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class TcpKvSender(KvSender):
    """:class:`KvSender` over TCP; see the module docstring for the protocol.

    Args:
        layout: this worker's cache layout.
        worker_id: sent as ``src_worker_id``.
        ssl_context: dial receivers with TLS (:func:`client_ssl_context`); ``None``: plaintext.

    Raises:
        ValueError: :data:`FAULT_INJECT_ENV` lists an unknown fault.
    """

    name = "tcp"

    def __init__(
        self, layout: KvLayout, worker_id: str, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(layout, worker_id)
        self.ssl_context = ssl_context
        self._connections: dict[str, _Connection] = {}
        self._faults = faults_from_env()

    async def send(
        self,
        request_id: str,
        destination: KvDestination,
        src_block_ids: Sequence[int],
        kv_cache: torch.Tensor,
        *,
        layer_start: int = 0,
        layer_end: int | None = None,
        last: bool = True,
    ) -> TransferStats:
        """See :meth:`KvSender.send`."""
        started = time.perf_counter()
        header, payload = await self._encode(
            request_id, destination, src_block_ids, kv_cache, layer_start, layer_end, last
        )
        address = destination.transfer_address
        conn = self._connections.setdefault(address, _Connection())
        async with conn.lock:
            ack = await self._exchange(conn, address, header, payload)
        if not ack.ok:
            raise framing.error_from_ack(ack)
        return TransferStats(len(payload), len(src_block_ids), time.perf_counter() - started)

    async def close(self) -> None:
        """Close every connection."""
        writers = [conn.writer for conn in self._connections.values() if conn.writer is not None]
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()
        for writer in writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _exchange(
        self, conn: _Connection, address: str, header: kv_pb2.KvTransferHeader, payload: memoryview
    ) -> kv_pb2.KvTransferAck:
        """Send one message and read its ack, reconnecting once if a reused connection is broken."""
        while True:
            fresh = conn.writer is None
            if fresh:
                conn.reader, conn.writer = await _connect(address, self.ssl_context)
            assert conn.reader is not None and conn.writer is not None
            try:
                conn.writer.write(framing.pack_frame(header))
                await self._write_payload(conn.writer, payload)
                await conn.writer.drain()
                raw = await framing.read_frame(conn.reader, framing.MAX_ACK_BYTES)
                if raw is None:
                    raise ConnectionResetError("receiver closed the connection")
                return kv_pb2.KvTransferAck.FromString(raw)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
                conn.close()
                if fresh:
                    raise TransferFailed(f"KV transfer to {address} failed: {exc!r}") from exc
                logger.info("KV connection to %s broke (%r); reconnecting", address, exc)
            except BaseException:
                conn.close()  # cancelled or failed mid-message: the stream is out of step
                raise

    async def _write_payload(self, writer: asyncio.StreamWriter, payload: memoryview) -> None:
        """Write the payload, applying the next test-only fault when one is armed."""
        fault = self._faults.pop(0) if self._faults else None
        if fault == "corrupt_kv_once":
            corrupted = bytearray(payload)  # the checksums in the header cover the original bytes
            corrupted[len(corrupted) // 2] ^= 0x01
            logger.warning("fault injection: flipped one bit of a %d-byte KV payload", len(corrupted))
            writer.write(corrupted)
        elif fault == "drop_kv_once":
            writer.write(payload[: len(payload) // 2])
            await writer.drain()
            logger.warning("fault injection: cut the KV connection halfway through a payload")
            writer.transport.abort()
            raise ConnectionResetError("fault injection: connection cut mid-transfer")
        elif fault == "stall_kv_once":
            half = len(payload) // 2
            writer.write(payload[:half])
            await writer.drain()
            logger.warning("fault injection: stalling a KV payload for %g s", FAULT_STALL_S)
            await asyncio.sleep(FAULT_STALL_S)
            writer.write(payload[half:])
        else:
            writer.write(payload)


async def _connect(
    address: str, ssl_context: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream to ``"host:port"`` (``"[v6]:port"`` for IPv6), with TLS when ``ssl_context`` is given.

    Raises:
        TransferFailed: bad address, refused, unreachable, timed out, or the TLS
            handshake failed (untrusted certificate, plaintext peer).
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TransferFailed(f"bad tcp transfer address {address!r}; expected host:port")
    host = host.strip("[]")
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(
                host, int(port), ssl=ssl_context, server_hostname=host if ssl_context else None
            ),
            CONNECT_TIMEOUT_S,
        )
    except (OSError, TimeoutError) as exc:
        raise TransferFailed(f"cannot connect to KV receiver at {address}: {exc!r}") from exc


class TcpKvReceiver(KvReceiver):
    """:class:`KvReceiver` over TCP; binds ``host:port`` on :meth:`start`.

    Args (beyond :class:`KvReceiver`'s):
        ssl_context: listen with TLS (:func:`server_ssl_context`); ``None``: plaintext.

    Attributes:
        num_connections: connections accepted since start (a gauge of sender reuse).
    """

    name = "tcp"

    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KvLayout,
        worker_id: str,
        epoch: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(kv_cache, layout, worker_id, epoch, host=host, port=port)
        self.ssl_context = ssl_context
        self.num_connections = 0
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self) -> str:
        """Bind and listen; returns ``"host:port"`` with the port actually bound."""
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if self.ssl_context else None,
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def close(self) -> None:
        """Stop listening, drop every connection and fail pending waits."""
        self._fail_all("KV receiver closed")
        if self._server is None:
            return
        self._server.close()
        handlers = list(self._connections)
        for writer in self._connections.values():
            writer.close()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle one connection: messages one after another until the peer closes."""
        self.num_connections += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._connections[handler] = writer
        try:
            while await self._handle_message(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the sender went away mid-message; nothing was written
        except Exception:
            logger.exception("KV connection from %s failed", writer.get_extra_info("peername"))
        finally:
            del self._connections[handler]
            writer.close()

    async def _handle_message(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read, check, apply and acknowledge one message; returns whether to keep the connection."""
        try:
            raw = await framing.read_frame(reader, framing.MAX_HEADER_BYTES)
        except TransferFailed as exc:
            await _answer(writer, framing.ack_refused(exc))
            return False
        if raw is None:
            return False
        try:
            header = kv_pb2.KvTransferHeader.FromString(raw)
        except DecodeError:
            await _answer(writer, framing.ack_refused(InvalidRequest("header", "not a KvTransferHeader")))
            return False
        if header.payload_bytes > self.max_payload_bytes:
            detail = f"{header.payload_bytes} bytes exceed the whole cache ({self.max_payload_bytes} bytes)"
            await _answer(writer, framing.ack_refused(InvalidRequest("payload_bytes", detail)))
            return False
        admitted = self._admit(header)
        if isinstance(admitted, kv_pb2.KvTransferAck):
            await framing.discard_payload(reader, header.payload_bytes)
            ack = admitted
        else:
            payload = await framing.read_payload(reader, header.payload_bytes)
            ack = await self._commit(admitted, header, payload)
        await _answer(writer, ack)
        return True


async def _answer(writer: asyncio.StreamWriter, ack: kv_pb2.KvTransferAck) -> None:
    """Write one ack frame."""
    writer.write(framing.pack_frame(ack))
    await writer.drain()
