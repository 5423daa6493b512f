"""The control channel shared by the device backends (``cuda_ipc``, ``nccl``), and ``auto`` selection.

Block data of these backends moves device to device and never crosses the
control socket; the socket carries typed protobuf frames only (as on ``tcp``:
4-byte big-endian length + message, :mod:`kvtransfer.framing`). Lifecycle:

1. Handshake, once per (prefill worker, decode worker) pair: the sender connects
   to the decode worker's control address and sends ``KvHello`` (its host id,
   device, layout and the transport it asks for). The receiver checks the layout
   (a mismatch answers ``KvExport(ok=False)`` → :class:`LayoutMismatch`), picks the
   transport (:func:`choose_transport`), and answers ``KvExport`` carrying what the
   transport needs: the CUDA IPC handle of its cache, or the TCPStore rendezvous
   of a two-rank torch.distributed group. Each side opens a *channel*; the sender
   keeps the connection and channel for every later message.
2. A reservation's first message on a connection: ``KvTransferHeader``
   (``checksum_algorithm = "none"``) → the receiver applies exactly
   :class:`kvtransfer.base.KvReceiver`'s admission checks and answers
   ``KvWriteGrant``. A grant covers the whole reservation (every later layer
   group) on this connection until it *closes*: after the ``last`` message, an
   abandon, or when the connection ends. Refused: nothing is written, no grant.
3. Every granted message: the sender moves the data (``cuda_ipc``: launches the
   copy into the reserved blocks on its transfer stream; ``nccl``: sends staging
   chunks the receiver scatters) and sends ``KvWriteDone``; the receiver records
   the blocks × layers. Later messages of a granted reservation are one-way:
   header, data, done, no grant and no ack, so a streamed layer group costs no
   control round trip. The ``last`` message is answered with ``KvTransferAck``
   (``cuda_ipc`` waits for its copy's CUDA event first: the transfer stream runs
   in order, so every earlier copy is in place too). A refused or failed earlier
   message fails the reservation on the receiver, which then refuses the
   ``last`` one: the error still reaches the request's sender.
4. Abandon: a sender whose request stops before its ``last`` message
   (:meth:`DeviceKvSender.abandon`) waits for its copies, then sends a header
   with no blocks; the receiver fails the reservation and closes the grant.
5. Fence: while a grant is open the sender may write into the reserved blocks
   at any time, so a decode worker that releases a reservation frees its blocks
   only once :meth:`DeviceKvReceiver.quiesce` returned: the grant closed (the
   prefill side's cancel reaches its sender as an abandon within milliseconds),
   or :data:`FENCE_TIMEOUT_S` passed, when the connection is cut (its sender's
   next message fails). A sender drops a connection only after its copies ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from google.protobuf.message import DecodeError, Message

from engine.errors import InvalidRequest, LayoutMismatch, TandemError, TransferFailed
from kvtransfer import framing
from kvtransfer.base import NO_CHECKSUM, KvReceiver, KvSender, TransferStats, _Reservation
from kvtransfer.layout import KvDestination, KvLayout
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Transports a device receiver can serve.
DEVICE_TRANSPORTS = ("cuda_ipc", "nccl")
#: Seconds to wait for a control connection or a handshake answer.
HANDSHAKE_TIMEOUT_S = 60.0
#: Seconds :meth:`DeviceKvReceiver.quiesce` waits for an open grant to close before cutting
#: its connection (shorter than the router's 5 s ``Release`` deadline).
FENCE_TIMEOUT_S = 2.0


@functools.cache
def host_id() -> str:
    """This machine's identity: a digest of ``/etc/machine-id`` (or the boot id) and the host name.

    Two workers with the same value share a host, so CUDA IPC can join them.
    """
    machine = ""
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        with contextlib.suppress(OSError):
            machine = Path(path).read_text().strip()
            if machine:
                break
    return hashlib.sha256(f"{machine}/{socket.gethostname()}".encode()).hexdigest()[:16]


def peer_info(worker_id: str, layout: KvLayout, kv_cache: torch.Tensor) -> kv_pb2.KvPeerInfo:
    """This side's ``KvPeerInfo``: worker, host, the cache's device (ordinal and UUID on CUDA) and layout."""
    device = kv_cache.device
    info = kv_pb2.KvPeerInfo(
        worker_id=worker_id, host_id=host_id(), device_type=device.type, layout=layout.to_pb()
    )
    if device.type == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        info.device_index = index
        info.device_uuid = str(torch.cuda.get_device_properties(index).uuid)
    return info


def choose_transport(
    asked: str, accepted: Sequence[str], sender: kv_pb2.KvPeerInfo, receiver: kv_pb2.KvPeerInfo
) -> str:
    """The transport a pair uses: ``asked`` if concrete, else (``"auto"``) ``cuda_ipc`` when both
    caches are on CUDA of one host, ``nccl`` otherwise.

    Raises:
        InvalidRequest: ``asked`` is unknown, not ``accepted`` by this receiver, or
            impossible for the pair (``cuda_ipc`` across hosts or off CUDA, ``nccl``
            between a CPU and a CUDA cache).
    """
    same_host_cuda = (
        sender.host_id == receiver.host_id and sender.device_type == receiver.device_type == "cuda"
    )
    if asked == "auto":
        choice = "cuda_ipc" if same_host_cuda else "nccl"
    elif asked in DEVICE_TRANSPORTS:
        choice = asked
    else:
        raise InvalidRequest("transport", f"{asked!r} is not one of {[*DEVICE_TRANSPORTS, 'auto']}")
    if choice not in accepted:
        raise InvalidRequest("transport", f"{choice!r} is not served here (serves {list(accepted)})")
    if choice == "cuda_ipc" and not same_host_cuda:
        raise InvalidRequest(
            "transport",
            f"cuda_ipc needs both KV caches on CUDA of one host; sender {sender.device_type} on "
            f"host {sender.host_id}, receiver {receiver.device_type} on host {receiver.host_id}",
        )
    if choice == "nccl" and sender.device_type != receiver.device_type:
        raise InvalidRequest(
            "transport",
            f"nccl needs both KV caches on one device type; sender {sender.device_type}, "
            f"receiver {receiver.device_type}",
        )
    return choice


class ReceiverChannel(ABC):
    """The decode side of one pair's data path."""

    @abstractmethod
    async def receive(
        self, receiver: DeviceKvReceiver, res: _Reservation, header: kv_pb2.KvTransferHeader
    ) -> None:
        """Bring a granted message's data into the reserved blocks (nothing to do when the peer writes it).

        Raises:
            TandemError: the data could not be received; the reservation is failed.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the channel's resources."""


class SenderChannel(ABC):
    """The prefill side of one pair's data path."""

    @abstractmethod
    async def push(
        self, header: kv_pb2.KvTransferHeader, src_block_ids: Sequence[int], kv_cache: torch.Tensor
    ) -> None:
        """Move a granted message's blocks (``header.destination.block_ids[i]`` ← ``src_block_ids[i]``,
        layers ``[header.layer_start, header.layer_end)``); returns once the data is sent, or (a
        channel whose copies run asynchronously) once launched, and in place when ``header.last``."""

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Return once every pushed copy has run (the source blocks may then be reused)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the channel's resources."""


async def open_receiver_channel(
    receiver: DeviceKvReceiver, transport: str, hello: kv_pb2.KvHello, export: kv_pb2.KvExport
) -> ReceiverChannel:
    """Fill ``export`` for ``transport`` and return the receiver's channel (see the backends)."""
    if transport == "cuda_ipc":
        from kvtransfer.cuda_ipc import open_ipc_receiver

        return await open_ipc_receiver(receiver, hello, export)
    from kvtransfer.nccl import open_nccl_receiver

    return await open_nccl_receiver(receiver, hello, export)


async def open_sender_channel(
    sender: DeviceKvSender, export: kv_pb2.KvExport, kv_cache: torch.Tensor, local_host: str
) -> SenderChannel:
    """The sender's channel for ``export.transport`` (see the backends)."""
    if export.transport == "cuda_ipc":
        from kvtransfer.cuda_ipc import open_ipc_sender

        return await open_ipc_sender(export, kv_cache)
    if export.transport == "nccl":
        from kvtransfer.nccl import open_nccl_sender

        return await open_nccl_sender(sender, export, kv_cache, local_host)
    raise TransferFailed(f"receiver chose unknown transport {export.transport!r}")


@dataclass(eq=False)
class _Connection:
    """One control connection of a sender, its channel, and the lock serializing its messages."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    channel: SenderChannel
    transport: str
    lock: asyncio.Lock
    #: Reservations granted on this connection whose ``last`` message is not sent yet.
    granted: set[str] = field(default_factory=set)


class DeviceKvSender(KvSender):
    """:class:`KvSender` of the device backends; asks the receiver for transport :attr:`name`."""

    name = "auto"

    def __init__(self, layout: KvLayout, worker_id: str) -> None:
        super().__init__(layout, worker_id)
        self._connections: dict[str, _Connection] = {}
        self._opening: dict[str, asyncio.Lock] = {}
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
        """See :meth:`KvSender.send`; the data moves device to device (module docstring).

        A later message of a granted reservation returns once its data is sent (``cuda_ipc``:
        its copy launched) and ``KvWriteDone`` written; errors of such messages surface at
        the ``last`` one (module docstring, step 3).
        """
        started = time.perf_counter()
        header = self._device_header(
            request_id, destination, src_block_ids, kv_cache, layer_start, layer_end, last
        )
        conn = await self._connection(destination.transfer_address, kv_cache, self._asked(destination))
        async with conn.lock:
            try:
                ack = await self._exchange(conn, header, src_block_ids, kv_cache)
            except (ConnectionError, asyncio.IncompleteReadError, DecodeError) as exc:
                await self._drop(destination.transfer_address)
                raise TransferFailed(
                    f"KV control connection to {destination.transfer_address} broke: {exc!r}"
                ) from exc
            except BaseException:
                await self._drop(destination.transfer_address)  # out of step with the receiver
                raise
        if not ack.ok:
            raise framing.error_from_ack(ack)
        return TransferStats(header.payload_bytes, len(src_block_ids), time.perf_counter() - started)

    async def abandon(self, request_id: str, destination: KvDestination) -> None:
        """Close the grant of ``destination``'s reservation, if one is open (module docstring, step 4).

        Returns once this connection's copies ran; never raises (a broken connection
        closes the grant on the receiver anyway).
        """
        rid = destination.reservation_id
        conn = self._connections.get(destination.transfer_address)
        if conn is None or rid not in conn.granted:
            return
        async with conn.lock:
            if self._connections.get(destination.transfer_address) is not conn or rid not in conn.granted:
                return
            conn.granted.discard(rid)
            try:
                await conn.channel.flush()
                header = kv_pb2.KvTransferHeader(
                    request_id=request_id,
                    destination=destination.to_pb(),
                    src_worker_id=self.worker_id,
                    last=True,
                )
                conn.writer.write(framing.pack_frame(header))
                await conn.writer.drain()
            except Exception as exc:
                logger.info("abandon of %s on %s failed: %r", rid, destination.transfer_address, exc)
                await self._drop(destination.transfer_address)

    def _asked(self, destination: KvDestination) -> str:
        """The transport asked for in the ``KvHello``: this sender's :attr:`name`."""
        return self.name

    def transport_to(self, address: str) -> str | None:
        """The transport chosen with the receiver at ``address`` (``None`` before the handshake)."""
        conn = self._connections.get(address)
        return None if conn is None else conn.transport

    async def close(self) -> None:
        """Close every connection and channel."""
        for address in list(self._connections):
            await self._drop(address)

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

    async def _exchange(
        self,
        conn: _Connection,
        header: kv_pb2.KvTransferHeader,
        src_block_ids: Sequence[int],
        kv_cache: torch.Tensor,
    ) -> kv_pb2.KvTransferAck:
        """[header → grant, the first message of a reservation only] → data → done → ack of the
        ``last`` message only (module docstring, steps 2 and 3); other messages return an ok ack
        once their done is written. A failed data movement raises (the caller drops the
        connection, which closes its grants)."""
        rid = header.destination.reservation_id
        if conn.reader.at_eof():  # e.g. cut by the receiver's fence: fail before moving data
            raise ConnectionResetError("the KV receiver closed the control connection")
        conn.writer.write(framing.pack_frame(header))
        if rid not in conn.granted:
            await conn.writer.drain()
            grant = kv_pb2.KvWriteGrant.FromString(await _read(conn.reader))
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
        conn.writer.write(framing.pack_frame(kv_pb2.KvWriteDone(ok=True)))
        await conn.writer.drain()
        if not header.last:
            return framing.ack_ok()
        return kv_pb2.KvTransferAck.FromString(await _read(conn.reader))

    async def _connection(self, address: str, kv_cache: torch.Tensor, asked: str) -> _Connection:
        """The handshaken connection to ``address``, opened on first use (once per pair)."""
        conn = self._connections.get(address)
        if conn is not None:
            return conn
        async with self._opening.setdefault(address, asyncio.Lock()):
            conn = self._connections.get(address)
            if conn is None:
                conn = await self._handshake(address, kv_cache, asked)
                self._connections[address] = conn
            return conn

    async def _handshake(self, address: str, kv_cache: torch.Tensor, asked: str) -> _Connection:
        """Connect, exchange ``KvHello``/``KvExport`` and open the channel.

        Raises:
            LayoutMismatch: the receiver's layout differs (either side's check).
            InvalidRequest: the transport is impossible for this pair.
            TransferFailed: unreachable receiver, broken or timed-out handshake.
        """
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise TransferFailed(f"bad KV control address {address!r}; expected host:port")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), HANDSHAKE_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            raise TransferFailed(f"cannot connect to KV receiver at {address}: {exc!r}") from exc
        try:
            hello = kv_pb2.KvHello(peer=peer_info(self.worker_id, self.layout, kv_cache), transport=asked)
            writer.write(framing.pack_frame(hello))
            await writer.drain()
            export = kv_pb2.KvExport.FromString(await asyncio.wait_for(_read(reader), HANDSHAKE_TIMEOUT_S))
            if not export.ok:
                raise framing.error_from_ack(
                    kv_pb2.KvTransferAck(ok=False, error=export.error, code=export.code)
                )
            self.layout.check_compatible(KvLayout.from_pb(export.peer.layout))
            local_host = writer.get_extra_info("sockname")[0]
            channel = await open_sender_channel(self, export, kv_cache, local_host)
        except BaseException as exc:
            writer.close()
            if isinstance(exc, (ConnectionError, asyncio.IncompleteReadError, DecodeError, TimeoutError)):
                raise TransferFailed(f"KV handshake with {address} failed: {exc!r}") from exc
            raise
        logger.info(
            "KV transport %s to %s (worker %s) open", export.transport, address, export.peer.worker_id
        )
        return _Connection(reader, writer, channel, export.transport, asyncio.Lock())

    async def _drop(self, address: str) -> None:
        """Close the connection to ``address`` once its copies ran (module docstring, step 5)."""
        conn = self._connections.pop(address, None)
        if conn is None:
            return
        try:
            with contextlib.suppress(Exception):
                await conn.channel.flush()
        finally:
            conn.writer.close()
        with contextlib.suppress(Exception):
            await conn.channel.close()


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
        #: Open grants (module docstring, step 2): reservation id → (set when it closes, its connection).
        self._grants: dict[str, tuple[asyncio.Event, asyncio.StreamWriter]] = {}

    async def quiesce(self, reservation_id: str) -> None:
        """Return once no sender can write into ``reservation_id``'s blocks any more (module
        docstring, step 5): at once without an open grant, else when it closes, or after
        :data:`FENCE_TIMEOUT_S` seconds, cutting the grant's connection."""
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
            channel = await self._accept(reader, writer)
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

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> ReceiverChannel | None:
        """Answer the ``KvHello``; returns the open channel, or ``None`` after a refusal."""
        hello = kv_pb2.KvHello.FromString(await _read(reader))
        export = kv_pb2.KvExport(ok=True, peer=peer_info(self.worker_id, self.layout, self.kv_cache))
        try:
            theirs = KvLayout.from_pb(hello.peer.layout)
            diffs = self.layout.differences(theirs)
            if diffs:
                raise LayoutMismatch(
                    f"KV layout mismatch at handshake with {hello.peer.worker_id!r}: " + "; ".join(diffs)
                )
            export.transport = choose_transport(hello.transport, self.accepted, hello.peer, export.peer)
            channel = await open_receiver_channel(self, export.transport, hello, export)
        except TandemError as exc:
            logger.warning("refused KV handshake from %s: %s", hello.peer.worker_id, exc)
            ack = framing.ack_refused(exc)
            writer.write(framing.pack_frame(kv_pb2.KvExport(ok=False, error=ack.error, code=ack.code)))
            await writer.drain()
            return None
        writer.write(framing.pack_frame(export))
        await writer.drain()
        logger.info("KV transport %s from %s open", export.transport, hello.peer.worker_id)
        return channel

    async def _handle_message(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        channel: ReceiverChannel,
        granted: dict[str, _Reservation],
    ) -> bool:
        """Admit (and grant), receive, record one message and acknowledge a ``last`` one (module
        docstring, steps 2-4); ``granted``: this connection's open grants. Returns whether to go on."""
        raw = await framing.read_frame(reader, framing.MAX_HEADER_BYTES)
        if raw is None:
            return False
        header = kv_pb2.KvTransferHeader.FromString(raw)
        rid = header.destination.reservation_id
        res = granted.get(rid)
        refusal: kv_pb2.KvTransferAck | None = None
        if res is None:
            admitted = self._admit(header)
            if isinstance(admitted, kv_pb2.KvTransferAck):
                await _send(writer, kv_pb2.KvWriteGrant(granted=False, final=admitted))
                return True
            res = admitted
            granted[rid] = res
            self._grants[rid] = (asyncio.Event(), writer)
            await _send(writer, kv_pb2.KvWriteGrant(granted=True))
        elif not header.block_indices:  # abandoned by the sender (module docstring, step 4)
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
            await _send(writer, ack)
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
        done = kv_pb2.KvWriteDone.FromString(await _read(reader))
        try:
            await receiving
        except TandemError as exc:
            return exc
        if not done.ok:
            return TransferFailed(f"sender failed writing the KV: {done.error}")
        return None

    def _close_grant(self, granted: dict[str, _Reservation], rid: str, writer: asyncio.StreamWriter) -> None:
        """Close ``rid``'s grant on the connection of ``writer`` and wake :meth:`quiesce`."""
        granted.pop(rid, None)
        grant = self._grants.get(rid)
        if grant is not None and grant[1] is writer:
            del self._grants[rid]
            grant[0].set()


#: Seconds :func:`wait_cuda_event` polls on the event loop before it blocks a worker thread instead.
EVENT_SPIN_S = 0.005


async def wait_cuda_event(event: torch.cuda.Event) -> None:
    """Return once the GPU passed ``event``, without blocking the event loop.

    Polls ``event.query()`` between event-loop turns for up to :data:`EVENT_SPIN_S`
    (copies of KV take microseconds to a millisecond; a thread hop or a stream sync
    would cost as much), then waits in a worker thread.
    """
    deadline = time.perf_counter() + EVENT_SPIN_S
    while not event.query():
        if time.perf_counter() > deadline:
            await asyncio.to_thread(event.synchronize)
            return
        await asyncio.sleep(0)


async def _send(writer: asyncio.StreamWriter, message: Message) -> None:
    """Write one control frame."""
    writer.write(framing.pack_frame(message))
    await writer.drain()


async def _read(reader: asyncio.StreamReader) -> bytes:
    """One control frame.

    Raises:
        asyncio.IncompleteReadError: the peer closed the connection.
        TransferFailed: the frame is larger than :data:`kvtransfer.framing.MAX_HEADER_BYTES`.
    """
    raw = await framing.read_frame(reader, framing.MAX_HEADER_BYTES)
    if raw is None:
        raise asyncio.IncompleteReadError(b"", None)
    return raw
