"""The decode side of the device control channel: grants, one-way messages, abandon and the
fence (steps 2-5 of :mod:`kvtransfer.device`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, ClassVar

from google.protobuf.message import DecodeError

from engine.errors import TandemError, TransferFailed
from kvtransfer import framing
from kvtransfer.base import NO_CHECKSUM, KvReceiver, _Reservation
from kvtransfer.device import ReceiverChannel, read_frame, send_frame
from kvtransfer.device_handshake import DEVICE_TRANSPORTS, accept
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch

    from kvtransfer.layout import KvLayout

logger = logging.getLogger(__name__)

#: Seconds :meth:`DeviceKvReceiver.quiesce` waits for an open grant to close before cutting
#: its connection (shorter than the router's 5 s ``Release`` deadline).
FENCE_TIMEOUT_S = 2.0


class DeviceKvReceiver(KvReceiver):
    """:class:`KvReceiver` of the device backends: serves the control channel on ``host:port``.

    Serves the transports in :attr:`accepted`; ``auto`` (this class) serves both.
    """

    name = "auto"
    checksum_algorithm = NO_CHECKSUM
    #: Transports this receiver serves.
    accepted: ClassVar[tuple[str, ...]] = DEVICE_TRANSPORTS
    #: torch.distributed backend of ``nccl`` pairs; ``None`` follows the cache's device
    #: (``nccl`` on CUDA, ``gloo`` on CPU).
    dist_backend: ClassVar[str | None] = None

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
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        #: Per-transport state the backends keep (the IPC export, the TCPStore).
        self.backend_state: dict[str, object] = {}
        #: GPU bytes held for peers (communicators, staging buffers); filled by the channels.
        self.memory: dict[str, int] = {}
        #: Open grants (step 2): reservation id → (set when it closes, its connection).
        self._grants: dict[str, tuple[asyncio.Event, asyncio.StreamWriter]] = {}

    async def quiesce(self, reservation_id: str) -> None:
        """Return once no sender can write into ``reservation_id``'s blocks any more (step 5):
        at once without an open grant, else when it closes, or after :data:`FENCE_TIMEOUT_S`
        seconds, cutting the grant's connection."""
        grant = self._grants.get(reservation_id)
        if grant is None:
            return
        closed, writer = grant
        try:
            await asyncio.wait_for(closed.wait(), FENCE_TIMEOUT_S)
        except TimeoutError:
            logger.warning(
                "write grant of %s still open after %g s: cutting its KV control connection",
                reservation_id,
                FENCE_TIMEOUT_S,
            )
            writer.close()

    async def start(self) -> str:
        """Listen for control connections; returns ``"host:port"``."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def close(self) -> None:
        """Stop listening, drop every connection and fail pending waits."""
        self._fail_all("KV receiver closed")
        if self._server is None:
            return
        self._server.close()
        for writer in self._handlers.values():
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def writable(self, res: _Reservation) -> bool:
        """Whether ``res`` is still live and incomplete (checked right before writing into its blocks)."""
        return self._reservations.get(res.reservation_id) is res and res.error is None and res.result is None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers[handler] = writer
        channel: ReceiverChannel | None = None
        granted: dict[str, _Reservation] = {}
        try:
            channel = await accept(self, reader, writer)
            while channel is not None and await self._handle_message(reader, writer, channel, granted):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, DecodeError, TransferFailed) as exc:
            logger.info("KV control connection from %s ended: %r", writer.get_extra_info("peername"), exc)
        except Exception:
            logger.exception("KV control connection from %s failed", writer.get_extra_info("peername"))
        finally:
            del self._handlers[handler]
            writer.close()
            for rid in list(granted):
                self._close_grant(granted, rid, writer)
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def _handle_message(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        channel: ReceiverChannel,
        granted: dict[str, _Reservation],
    ) -> bool:
        """Admit (and grant), receive, record one message and acknowledge a ``last`` one
        (steps 2-4); ``granted``: this connection's open grants. Returns whether to go on."""
        raw = await framing.read_frame(reader, framing.MAX_HEADER_BYTES)
        if raw is None:
            return False
        header = kv_pb2.KvTransferHeader.FromString(raw)
        rid = header.destination.reservation_id
        res = granted.get(rid)
        refusal: kv_pb2.KvTransferAck | None = None
        if res is None and not header.block_indices:
            # An abandon without an open grant here: its sender reads no answer, and one
            # written anyway would be read as the answer to a later message of another request.
            logger.info("ignored an abandon of %s: no open grant on this connection", rid)
            return True
        if res is None:
            admitted = self._admit(header)
            if isinstance(admitted, kv_pb2.KvTransferAck):
                await send_frame(writer, kv_pb2.KvWriteGrant(granted=False, final=admitted))
                return True
            res = admitted
            granted[rid] = res
            self._grants[rid] = (asyncio.Event(), writer)
            await send_frame(writer, kv_pb2.KvWriteGrant(granted=True))
        elif not header.block_indices:  # abandoned by the sender (step 4)
            res.fail(TransferFailed(f"reservation {rid!r}: the sender abandoned the transfer"))
            self._close_grant(granted, rid, writer)
            return True
        else:
            admitted = self._admit(header)
            if admitted is not res:
                refusal = (
                    admitted
                    if isinstance(admitted, kv_pb2.KvTransferAck)
                    else framing.ack_refused(TransferFailed(f"reservation {rid!r} was replaced"))
                )
        error = await self._receive(reader, channel, res, header)
        if refusal is not None:
            ack = refusal
        elif error is not None:
            res.fail(error)
            ack = framing.ack_refused(error)
        else:
            ack = self._finish(res, header, None)
        if header.last:
            self._close_grant(granted, rid, writer)
            await send_frame(writer, ack)
        elif not ack.ok:
            logger.warning("refused streamed KV message for %s: %s", rid, ack.error)
        return True

    async def _receive(
        self,
        reader: asyncio.StreamReader,
        channel: ReceiverChannel,
        res: _Reservation,
        header: kv_pb2.KvTransferHeader,
    ) -> TandemError | None:
        """Take a granted message's data in (a released or failed reservation's data is drained,
        not written) and read its ``KvWriteDone``; returns the error to fail the reservation with."""
        receiving = asyncio.ensure_future(channel.receive(self, res, header))
        try:
            done = kv_pb2.KvWriteDone.FromString(await read_frame(reader))
        except BaseException:
            receiving.add_done_callback(_retrieve)  # the connection ended; the channel closes it
            raise
        if not done.ok:  # the rest of the data may never come; the sender drops the connection
            receiving.add_done_callback(_retrieve)
            return TransferFailed(f"sender failed writing the KV: {done.error}")
        try:
            await receiving
        except TandemError as exc:
            return exc
        return None

    def _close_grant(self, granted: dict[str, _Reservation], rid: str, writer: asyncio.StreamWriter) -> None:
        """Close ``rid``'s grant on the connection of ``writer`` and wake :meth:`quiesce`."""
        granted.pop(rid, None)
        grant = self._grants.get(rid)
        if grant is not None and grant[1] is writer:
            del self._grants[rid]
            grant[0].set()


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a finished future's error as seen (logged at debug level)."""
    if not future.cancelled() and future.exception() is not None:
        logger.debug("KV receive of a closed connection ended: %r", future.exception())
