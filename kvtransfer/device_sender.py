"""The prefill side of the device control channel (steps 2-5 of :mod:`kvtransfer.device`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import DecodeError

from engine.errors import InvalidRequest, TransferFailed
from kvtransfer import framing
from kvtransfer.base import NO_CHECKSUM, KvSender, TransferStats
from kvtransfer.device import SenderChannel, read_frame, send_frame
from kvtransfer.device_handshake import connect
from kvtransfer.layout import KvDestination, KvLayout
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Connections a message tries when the one it waited for was closed before it began.
MAX_ATTEMPTS = 3


@dataclass(eq=False)
class _Connection:
    """One control connection of a sender, its channel, and the lock serializing its messages."""

    address: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    channel: SenderChannel
    transport: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Reservations granted on this connection whose ``last`` message is not sent yet.
    granted: set[str] = field(default_factory=set)
    closed: bool = False


class DeviceKvSender(KvSender):
    """:class:`KvSender` of the device backends; asks the receiver for transport :attr:`name`."""

    name = "auto"

    def __init__(self, layout: KvLayout, worker_id: str) -> None:
        super().__init__(layout, worker_id)
        self._connections: dict[str, _Connection] = {}
        #: Handshakes in progress, by address: owned by the sender, not by the request that asked.
        self._opening: dict[str, asyncio.Task[_Connection]] = {}
        #: GPU bytes held per pair (communicators, staging buffers); filled by the channels.
        self.memory: dict[str, int] = {}

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
        """See :meth:`KvSender.send`; the data moves device to device (:mod:`kvtransfer.device`).

        A later message of a granted reservation returns once its data is sent (``cuda_ipc``:
        its copy launched) and ``KvWriteDone`` written; errors of such messages surface at
        the ``last`` one (step 3). Cancelled before its message began (waiting for the
        handshake or its turn on the connection), nothing is sent; cancelled after, the
        message is finished first, so the connection other reservations share stays in step.
        """
        started = time.perf_counter()
        header = self._device_header(
            request_id, destination, src_block_ids, kv_cache, layer_start, layer_end, last
        )
        address, asked = destination.transfer_address, self._asked(destination)

        async def exchange(conn: _Connection) -> kv_pb2.KvTransferAck:
            return await self._exchange(conn, header, src_block_ids, kv_cache)

        ack = await self._on_connection(address, kv_cache, asked, exchange)
        if not ack.ok:
            raise framing.error_from_ack(ack)
        return TransferStats(header.payload_bytes, len(src_block_ids), time.perf_counter() - started)

    async def abandon(self, request_id: str, destination: KvDestination) -> None:
        """Close the grant of ``destination``'s reservation, if one is open (step 4).

        Returns once this connection's copies ran; never raises (a broken connection
        closes the grant on the receiver anyway).
        """
        rid, address = destination.reservation_id, destination.transfer_address
        conn = self._connections.get(address)
        if conn is None or rid not in conn.granted:
            return
        header = kv_pb2.KvTransferHeader(
            request_id=request_id, destination=destination.to_pb(), src_worker_id=self.worker_id, last=True
        )

        async def close_grant() -> None:
            async with conn.lock:
                if self._connections.get(address) is not conn or rid not in conn.granted:
                    return
                conn.granted.discard(rid)
                try:
                    await conn.channel.flush()
                    await send_frame(conn.writer, header)
                except Exception as exc:
                    logger.info("abandon of %s on %s failed: %r", rid, address, exc)
                    await self._drop(conn)

        await _finish_uncancelled(asyncio.ensure_future(close_grant()))

    def _asked(self, destination: KvDestination) -> str:
        """The transport asked for in the ``KvHello``: this sender's :attr:`name`."""
        return self.name

    def transport_to(self, address: str) -> str | None:
        """The transport chosen with the receiver at ``address`` (``None`` before the handshake)."""
        conn = self._connections.get(address)
        return None if conn is None else conn.transport

    async def close(self) -> None:
        """Stop every handshake; close every connection and channel."""
        for opening in list(self._opening.values()):
            opening.cancel()
        await asyncio.gather(*self._opening.values(), return_exceptions=True)
        for conn in list(self._connections.values()):
            await self._drop(conn)

    def _device_header(
        self,
        request_id: str,
        destination: KvDestination,
        src_block_ids: Sequence[int],
        kv_cache: torch.Tensor,
        layer_start: int,
        layer_end: int | None,
        last: bool,
    ) -> kv_pb2.KvTransferHeader:
        """Check the request locally (as every backend) and build its header (no checksums)."""
        self._check_send(destination, src_block_ids, kv_cache)
        if not src_block_ids:  # a header without blocks is an abandon (step 4)
            raise InvalidRequest("src_block_ids", "no blocks to send")
        end = self.layout.num_layers if layer_end is None else layer_end
        if not 0 <= layer_start < end <= self.layout.num_layers:
            raise InvalidRequest(
                "layer_start", f"layers [{layer_start}, {end}) are not inside [0, {self.layout.num_layers})"
            )
        bad = [b for b in src_block_ids if not 0 <= b < kv_cache.shape[2]]
        if bad:
            raise InvalidRequest("src_block_ids", f"{bad} are outside [0, {kv_cache.shape[2]})")
        return kv_pb2.KvTransferHeader(
            request_id=request_id,
            destination=destination.to_pb(),
            layout=self.layout.to_pb(),
            src_worker_id=self.worker_id,
            block_indices=range(len(src_block_ids)),
            layer_start=layer_start,
            layer_end=end,
            checksum_algorithm=NO_CHECKSUM,
            payload_bytes=self.layout.payload_bytes(len(src_block_ids), layer_start, end),
            last=last,
        )

    async def _on_connection(
        self,
        address: str,
        kv_cache: torch.Tensor,
        asked: str,
        work: Callable[[_Connection], Awaitable[_T]],
    ) -> _T:
        """Run ``work`` on the pair's connection when its turn comes (one message at a time).

        A connection closed by the receiver before ``work`` began is replaced (nothing was
        sent on it). An I/O error during ``work`` drops that connection only: a connection
        opened meanwhile for other reservations is left alone.

        Raises:
            TransferFailed: the connection broke during ``work``, or kept being closed.
        """
        began = asyncio.Event()

        async def run() -> _T:
            for _ in range(MAX_ATTEMPTS):
                conn = await self._connection(address, kv_cache, asked)
                async with conn.lock:
                    if self._connections.get(address) is not conn:
                        continue  # dropped while this message waited for its turn
                    if conn.reader.at_eof():  # e.g. cut by the receiver's fence: nothing sent yet
                        await self._drop(conn)
                        continue
                    began.set()
                    try:
                        return await work(conn)
                    except (ConnectionError, asyncio.IncompleteReadError, DecodeError) as exc:
                        await self._drop(conn)
                        raise TransferFailed(f"KV control connection to {address} broke: {exc!r}") from exc
                    except BaseException:
                        await self._drop(conn)  # out of step with the receiver
                        raise
            raise TransferFailed(f"KV control connection to {address} closed {MAX_ATTEMPTS} times in a row")

        return await _finish_uncancelled(asyncio.ensure_future(run()), began)

    async def _exchange(
        self,
        conn: _Connection,
        header: kv_pb2.KvTransferHeader,
        src_block_ids: Sequence[int],
        kv_cache: torch.Tensor,
    ) -> kv_pb2.KvTransferAck:
        """[header → grant, the first message of a reservation only] → data → done → ack of the
        ``last`` message only (steps 2 and 3); other messages return an ok ack once their done
        is written. A failed data movement raises (the caller drops the connection, which
        closes its grants)."""
        rid = header.destination.reservation_id
        conn.writer.write(framing.pack_frame(header))
        if rid not in conn.granted:
            await conn.writer.drain()
            grant = kv_pb2.KvWriteGrant.FromString(await read_frame(conn.reader))
            if not grant.granted:
                return grant.final
            conn.granted.add(rid)
        if header.last:
            conn.granted.discard(rid)
        try:
            await conn.channel.push(header, src_block_ids, kv_cache)
        except Exception as exc:  # tell the receiver, then surface it
            conn.writer.write(framing.pack_frame(kv_pb2.KvWriteDone(ok=False, error=repr(exc))))
            with contextlib.suppress(ConnectionError):
                await conn.writer.drain()
            raise TransferFailed(f"KV data movement failed: {exc!r}") from exc
        await send_frame(conn.writer, kv_pb2.KvWriteDone(ok=True))
        if not header.last:
            return framing.ack_ok()
        return kv_pb2.KvTransferAck.FromString(await read_frame(conn.reader))

    async def _connection(self, address: str, kv_cache: torch.Tensor, asked: str) -> _Connection:
        """The handshaken connection to ``address``, opened on first use (once per pair, step 1).

        The handshake runs in a task of its own that a cancelled caller leaves running: a
        handshake cut halfway would leave the receiver's half of the pair's channel waiting.
        """
        conn = self._connections.get(address)
        if conn is not None:
            return conn
        opening = self._opening.get(address)
        if opening is None:
            opening = asyncio.ensure_future(self._open(address, kv_cache, asked))
            self._opening[address] = opening
            opening.add_done_callback(lambda task: self._opened(address, task))
        return await asyncio.shield(opening)

    async def _open(self, address: str, kv_cache: torch.Tensor, asked: str) -> _Connection:
        side = await connect(self, address, kv_cache, asked)
        conn = _Connection(address, side.reader, side.writer, side.channel, side.transport)
        self._connections[address] = conn
        return conn

    def _opened(self, address: str, task: asyncio.Task[_Connection]) -> None:
        """Forget a finished handshake (a failed one is retried by the next message)."""
        if self._opening.get(address) is task:
            del self._opening[address]
        if not task.cancelled():
            task.exception()  # retrieved: its callers saw it, or all of them were cancelled

    async def _drop(self, conn: _Connection) -> None:
        """Close ``conn`` once its copies ran (step 5), and forget it if it is still the pair's."""
        if self._connections.get(conn.address) is conn:
            del self._connections[conn.address]
        if conn.closed:
            return
        conn.closed = True
        try:
            with contextlib.suppress(Exception):
                await conn.channel.flush()
        finally:
            conn.writer.close()
        with contextlib.suppress(Exception):
            await conn.channel.close()


async def _finish_uncancelled(task: asyncio.Future[_T], began: asyncio.Event | None = None) -> _T:
    """``task``'s result; if the caller is cancelled meanwhile, ``task`` is cancelled too while
    ``began`` is unset (its message has not started), else it is awaited to its end before the
    cancellation propagates (``began=None``: always)."""
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            if not task.done():  # the caller was cancelled, not the task
                if began is not None and not began.is_set():
                    task.cancel()
                    raise
                cancelled = True
                continue
            if not cancelled:
                raise
        except BaseException:
            if not cancelled:
                raise
        if cancelled:  # the message is over; the caller was cancelled meanwhile
            raise asyncio.CancelledError
        return result
