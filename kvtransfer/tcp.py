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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from engine.errors import InvalidRequest, TransferFailed
from kvtransfer import framing
from kvtransfer.base import KvReceiver, KvSender, TransferStats
from kvtransfer.layout import KvDestination, KvLayout
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to a receiver.
CONNECT_TIMEOUT_S = 10.0


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
    """:class:`KvSender` over TCP; see the module docstring for the protocol."""

    name = "tcp"

    def __init__(self, layout: KvLayout, worker_id: str) -> None:
        super().__init__(layout, worker_id)
        self._connections: dict[str, _Connection] = {}

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
                conn.reader, conn.writer = await _connect(address)
            assert conn.reader is not None and conn.writer is not None
            try:
                conn.writer.write(framing.pack_frame(header))
                conn.writer.write(payload)
                await conn.writer.drain()
                raw = await framing.read_frame(conn.reader, framing.MAX_ACK_BYTES)
                if raw is None:
                    raise ConnectionResetError("receiver closed the connection")
                return kv_pb2.KvTransferAck.FromString(raw)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                conn.close()
                if fresh:
                    raise TransferFailed(f"KV transfer to {address} failed: {exc!r}") from exc
                logger.info("KV connection to %s broke (%r); reconnecting", address, exc)
            except BaseException:
                conn.close()  # cancelled or failed mid-message: the stream is out of step
                raise


async def _connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream to ``"host:port"`` (``"[v6]:port"`` for IPv6).

    Raises:
        TransferFailed: bad address, refused, unreachable or timed out.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TransferFailed(f"bad tcp transfer address {address!r}; expected host:port")
    try:
        return await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise TransferFailed(f"cannot connect to KV receiver at {address}: {exc!r}") from exc


class TcpKvReceiver(KvReceiver):
    """:class:`KvReceiver` over TCP; binds ``host:port`` on :meth:`start`.

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
    ) -> None:
        super().__init__(kv_cache, layout, worker_id, epoch, host=host, port=port)
        self.num_connections = 0
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self) -> str:
        """Bind and listen; returns ``"host:port"`` with the port actually bound."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
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
        except (ConnectionError, asyncio.IncompleteReadError):
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
