"""The KV transfer backend interface (torch-free at import).

Lifecycle of one request's transfer (push model, decode-first reservation):

1. The decode worker reserves blocks and registers them with its receiver:
   :meth:`KvReceiver.expect` (reservation id, request id, epoch, block ids). It hands
   the prefill worker a :class:`KvDestination`.
2. The prefill worker calls :meth:`KvSender.send` once for the whole request, or once
   per layer range (layer-wise streaming) with ``last=True`` on the final call. Each
   call gathers the source blocks, checksums them and ships one message.
3. The receiver admits a message only if the layout, worker id, epoch, reservation,
   request id, block ids, layer range and payload size all match, reads the payload,
   verifies every block's checksum, and only then scatters it into the reserved
   blocks. Every refusal is acknowledged with ``ok=False`` and a gRPC code name; the
   sender raises the matching :mod:`engine.errors` exception.
4. :meth:`KvReceiver.wait_complete` returns once every block of every layer has
   arrived verified; the decode worker commits the request.
5. :meth:`KvReceiver.forget` releases the reservation (finish, cancel, lease
   expiry); later messages for it are refused. The decode worker reuses its blocks
   once :meth:`KvReceiver.quiesce` returned. A prefill worker whose request stops
   mid-stream calls :meth:`KvSender.abandon`.

Backends implement :class:`KvSender` (``send``, ``close``) and :class:`KvReceiver`
(``start``, ``close``); the reservation bookkeeping and checks live here, so every
backend and the loopback fake enforce the same rules. Receivers run in the event
loop thread: call ``expect``/``forget``/``wait_complete`` from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from engine.errors import (
    DataCorruption,
    InvalidRequest,
    ReservationNotFound,
    TandemError,
    TransferFailed,
)
from kvtransfer import framing
from kvtransfer.checksum import CHECKSUM_ALGORITHM, block_checksums
from kvtransfer.layout import KvDestination, KvLayout
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: ``checksum_algorithm`` of messages whose data moves device to device (cuda_ipc, nccl).
NO_CHECKSUM = "none"

#: Payloads at least this large are checksummed in a worker thread, off the event loop.
THREAD_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class TransferStats:
    """What one :meth:`KvSender.send` moved: payload bytes, blocks, and wall seconds (gather to ack)."""

    num_bytes: int
    num_blocks: int
    seconds: float


@dataclass(frozen=True)
class ReceivedTransfer:
    """A completed reservation: every block of every layer arrived and verified.

    Attributes:
        reservation_id: the reservation.
        request_id: its request.
        block_ids: the filled block ids, in prompt order.
        num_bytes: payload bytes written (duplicates included).
        num_messages: messages written.
        seconds: wall seconds from the first accepted message to completion.
    """

    reservation_id: str
    request_id: str
    block_ids: tuple[int, ...]
    num_bytes: int
    num_messages: int
    seconds: float


class KvSender(ABC):
    """Pushes gathered KV blocks to a receiver; one instance per prefill worker, reused across requests."""

    #: Backend name (``KvDestination.transport``).
    name: ClassVar[str]

    def __init__(self, layout: KvLayout, worker_id: str) -> None:
        """``layout``: this worker's cache layout; ``worker_id``: sent as ``src_worker_id``."""
        self.layout = layout
        self.worker_id = worker_id

    @abstractmethod
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
        """Copy blocks ``src_block_ids[i]`` → ``destination.block_ids[i]`` for layers ``[layer_start, layer_end)``.

        Args:
            request_id: the request (must match the reservation's).
            destination: where to write.
            src_block_ids: this worker's block ids, one per destination block, in prompt order.
            kv_cache: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` of ``self.layout``.
            layer_start: first layer carried (inclusive).
            layer_end: last layer carried (exclusive); ``None`` = all layers.
            last: whether this is the request's final message.

        Returns:
            Bytes and blocks sent and the seconds it took, once the receiver acknowledged.

        Raises:
            LayoutMismatch: ``destination.layout`` or the receiver's layout differs from ours.
            DataCorruption: the receiver's checksum check failed.
            ReservationNotFound: unknown, released or completed reservation, wrong epoch or request.
            InvalidRequest: block ids, layer range or message fields are inconsistent.
            TransferFailed: the receiver is unreachable or the connection broke.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the sender cannot be used afterwards."""

    async def abandon(self, request_id: str, destination: KvDestination) -> None:
        """``request_id`` sends nothing more to ``destination`` (a stream cut short before its
        ``last`` message). Backends whose receivers grant a whole reservation ahead (the device
        backends) wait for their copies and close the grant; others have nothing to do. Never raises."""
        return None

    def _check_send(
        self, destination: KvDestination, src_block_ids: Sequence[int], kv_cache: torch.Tensor
    ) -> None:
        """The local checks of every :meth:`send`: layouts, cache shape, one source block per destination block.

        Raises:
            LayoutMismatch: ``destination.layout`` or ``kv_cache`` does not match ours.
            InvalidRequest: the block counts differ.
        """
        self.layout.check_compatible(destination.layout)
        self.layout.check_cache(kv_cache)
        if len(src_block_ids) != len(destination.block_ids):
            raise InvalidRequest(
                "src_block_ids",
                f"{len(src_block_ids)} source blocks for {len(destination.block_ids)} destination blocks",
            )

    async def _encode(
        self,
        request_id: str,
        destination: KvDestination,
        src_block_ids: Sequence[int],
        kv_cache: torch.Tensor,
        layer_start: int,
        layer_end: int | None,
        last: bool,
    ) -> tuple[kv_pb2.KvTransferHeader, memoryview]:
        """Check the request locally, then gather and checksum off the event loop (see :meth:`send`)."""
        self._check_send(destination, src_block_ids, kv_cache)
        return await asyncio.to_thread(
            framing.encode_message,
            request_id=request_id,
            destination=destination,
            layout=self.layout,
            src_worker_id=self.worker_id,
            kv_cache=kv_cache,
            src_block_ids=src_block_ids,
            layer_start=layer_start,
            layer_end=self.layout.num_layers if layer_end is None else layer_end,
            last=last,
        )


@dataclass(eq=False)
class _Reservation:
    """Receiver-side state of one reservation: which (block, layer) cells arrived verified."""

    reservation_id: str
    request_id: str
    block_ids: tuple[int, ...]
    covered: np.ndarray  # bool [num_blocks, num_layers]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    checksums: dict[tuple[int, int, int], int] = field(default_factory=dict)
    num_bytes: int = 0
    num_messages: int = 0
    first_at: float | None = None
    error: TandemError | None = None
    result: ReceivedTransfer | None = None

    def record(self, header: kv_pb2.KvTransferHeader) -> None:
        """Mark the header's blocks × layers as written; completes the reservation when all are."""
        ls, le = header.layer_start, header.layer_end
        self.covered[list(header.block_indices), ls:le] = True
        for index, crc in zip(header.block_indices, header.block_checksums, strict=False):
            self.checksums[(ls, le, index)] = crc
        self.num_bytes += header.payload_bytes
        self.num_messages += 1
        now = time.perf_counter()
        self.first_at = now if self.first_at is None else self.first_at
        if self.covered.all():
            self.result = ReceivedTransfer(
                self.reservation_id,
                self.request_id,
                self.block_ids,
                self.num_bytes,
                self.num_messages,
                now - self.first_at,
            )
            self.done.set()

    def is_duplicate(self, header: kv_pb2.KvTransferHeader) -> bool:
        """Whether an already-written message carried exactly these blocks, layers and checksums
        (without checksums, as on the device backends: these blocks and layers)."""
        ls, le = header.layer_start, header.layer_end
        if header.checksum_algorithm == NO_CHECKSUM:
            return bool(self.covered[list(header.block_indices), ls:le].all())
        return all(
            self.checksums.get((ls, le, index)) == crc
            for index, crc in zip(header.block_indices, header.block_checksums, strict=True)
        )

    def fail(self, exc: TandemError) -> None:
        """End the reservation with ``exc`` (first error wins) and wake its waiter."""
        if self.error is None and self.result is None:
            self.error = exc
        self.done.set()


class KvReceiver(ABC):
    """Receives KV blocks into reserved blocks of this worker's cache; one per decode worker.

    Args:
        kv_cache: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` of ``layout``.
        layout: this worker's cache layout.
        worker_id: this worker's id; messages for another worker are refused.
        epoch: this worker's incarnation; messages for another epoch are refused.
        host: address to bind (backends without sockets ignore it).
        port: port to bind; 0 picks a free one.

    Raises:
        LayoutMismatch: ``kv_cache`` does not match ``layout``.
    """

    #: Backend name (``KvDestination.transport``).
    name: ClassVar[str]
    #: Checksum messages must carry: :data:`CHECKSUM_ALGORITHM` when the payload crosses a
    #: socket, :data:`NO_CHECKSUM` when the data moves device to device (no checksums then).
    checksum_algorithm: ClassVar[str] = CHECKSUM_ALGORITHM

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
        layout.check_cache(kv_cache)
        self.kv_cache = kv_cache
        self.layout = layout
        self.worker_id = worker_id
        self.epoch = epoch
        self.host = host
        self.port = port
        self.max_payload_bytes = kv_cache.shape[2] * layout.bytes_per_block
        self._reservations: dict[str, _Reservation] = {}

    @abstractmethod
    async def start(self) -> str:
        """Start receiving; returns the transfer address (``"host:port"``) senders must use."""

    @abstractmethod
    async def close(self) -> None:
        """Stop receiving; pending waits raise TransferFailed."""

    def expect(self, reservation_id: str, request_id: str, epoch: int, block_ids: Sequence[int]) -> None:
        """Register a reservation whose blocks ``block_ids`` (prompt order) may now be written.

        Raises:
            ValueError: ``epoch`` is not this receiver's, ``block_ids`` is empty or the id is in use.
        """
        if epoch != self.epoch:
            raise ValueError(f"reservation {reservation_id!r} has epoch {epoch}, receiver has {self.epoch}")
        if not block_ids:
            raise ValueError(f"reservation {reservation_id!r} has no blocks")
        if reservation_id in self._reservations:
            raise ValueError(f"reservation {reservation_id!r} is already expected")
        covered = np.zeros((len(block_ids), self.layout.num_layers), dtype=bool)
        self._reservations[reservation_id] = _Reservation(
            reservation_id, request_id, tuple(block_ids), covered
        )

    def forget(self, reservation_id: str) -> bool:
        """Drop a reservation (finished, released or expired); returns whether it was known.

        Later messages for it are refused; a pending :meth:`wait_complete` raises ReservationNotFound.
        """
        res = self._reservations.pop(reservation_id, None)
        if res is None:
            return False
        res.fail(ReservationNotFound(f"reservation {reservation_id!r} was released"))
        return True

    async def quiesce(self, reservation_id: str) -> None:
        """Return once no sender can still write into a :meth:`forget`-ten reservation's blocks,
        so they may be reused; immediate here, where every write is checked on arrival (the
        device backends grant writes ahead, see :mod:`kvtransfer.device`)."""
        return None

    async def wait_complete(self, reservation_id: str, timeout_s: float) -> ReceivedTransfer:
        """Wait until every block of every layer of the reservation arrived verified.

        Raises:
            ReservationNotFound: unknown reservation, or released while waiting.
            TransferFailed: no completion within ``timeout_s`` seconds, or the receiver closed.
            LayoutMismatch: a message for it had another layout.
            DataCorruption: a message for it failed its checksum.
            InvalidRequest: a message for it had inconsistent block ids or fields.
        """
        res = self._reservations.get(reservation_id)
        if res is None:
            raise ReservationNotFound(f"reservation {reservation_id!r} is unknown or released")
        try:
            await asyncio.wait_for(res.done.wait(), timeout_s)
        except TimeoutError:
            raise TransferFailed(
                f"reservation {reservation_id!r}: KV transfer not complete after {timeout_s:g} s "
                f"({int(res.covered.sum())} of {res.covered.size} block-layers arrived)"
            ) from None
        if res.result is not None:
            return res.result
        assert res.error is not None
        raise res.error

    def _fail_all(self, reason: str) -> None:
        """Fail every pending reservation with TransferFailed(``reason``) (used by ``close``)."""
        for res in self._reservations.values():
            res.fail(TransferFailed(reason))

    def _admit(self, header: kv_pb2.KvTransferHeader) -> kv_pb2.KvTransferAck | _Reservation:
        """Check a message's header before its payload is read.

        Returns the reservation to write into, or the ack to answer with when the
        message is refused (or is a repeat of a message already written).
        """
        dest = header.destination
        try:
            if dest.worker_id != self.worker_id or dest.epoch != self.epoch:
                raise ReservationNotFound(
                    f"message for worker {dest.worker_id!r} epoch {dest.epoch}, "
                    f"this is worker {self.worker_id!r} epoch {self.epoch}"
                )
            res = self._reservations.get(dest.reservation_id)
            if res is None:
                raise ReservationNotFound(f"reservation {dest.reservation_id!r} is unknown or released")
            if header.request_id != res.request_id:
                raise ReservationNotFound(
                    f"reservation {res.reservation_id!r} belongs to request {res.request_id!r}, not {header.request_id!r}"
                )
        except ReservationNotFound as exc:
            logger.warning("refused KV message from %s: %s", header.src_worker_id, exc)
            return framing.ack_refused(exc)
        if res.error is not None:
            return framing.ack_refused(res.error)
        try:
            self._check_message(res, header)
        except TandemError as exc:
            logger.warning("refused KV message for %s: %s", res.reservation_id, exc)
            res.fail(exc)
            return framing.ack_refused(exc)
        if res.result is not None:
            return _completed_ack(res, header)
        return res

    def _check_message(self, res: _Reservation, header: kv_pb2.KvTransferHeader) -> None:
        """Raise LayoutMismatch or InvalidRequest unless the message fits the reservation exactly."""
        self.layout.check_compatible(KvLayout.from_pb(header.layout))
        if tuple(header.destination.block_ids) != res.block_ids:
            raise InvalidRequest(
                "destination.block_ids",
                f"{list(header.destination.block_ids)} are not the reserved blocks {list(res.block_ids)}",
            )
        indices = list(header.block_indices)
        if not indices or len(set(indices)) != len(indices) or max(indices) >= len(res.block_ids):
            raise InvalidRequest(
                "block_indices", f"{indices} are not distinct indices into {len(res.block_ids)} blocks"
            )
        ls, le = header.layer_start, header.layer_end
        if not 0 <= ls < le <= self.layout.num_layers:
            raise InvalidRequest(
                "layer_start", f"layers [{ls}, {le}) are not inside [0, {self.layout.num_layers})"
            )
        if header.checksum_algorithm != self.checksum_algorithm:
            raise InvalidRequest(
                "checksum_algorithm", f"{header.checksum_algorithm!r} is not {self.checksum_algorithm!r}"
            )
        n_sums = 0 if self.checksum_algorithm == NO_CHECKSUM else len(indices)
        if len(header.block_checksums) != n_sums:
            raise InvalidRequest(
                "block_checksums", f"{len(header.block_checksums)} checksums for {len(indices)} blocks"
            )
        expected = self.layout.payload_bytes(len(indices), ls, le)
        if header.payload_bytes != expected:
            raise InvalidRequest("payload_bytes", f"{header.payload_bytes} != {expected} for the layout")

    async def _commit(
        self, res: _Reservation, header: kv_pb2.KvTransferHeader, payload: bytearray | memoryview
    ) -> kv_pb2.KvTransferAck:
        """Verify an admitted message's payload, then scatter it into the reserved blocks.

        Nothing is written unless every checksum matches and the reservation is still
        live and incomplete.
        """
        rows, num_blocks = 2 * (header.layer_end - header.layer_start), len(header.block_indices)
        if len(payload) >= THREAD_MIN_BYTES:
            sums = await asyncio.to_thread(block_checksums, payload, rows, num_blocks)
        else:
            sums = block_checksums(payload, rows, num_blocks)
        bad = [
            i for i, (got, want) in enumerate(zip(sums, header.block_checksums, strict=True)) if got != want
        ]
        if bad:
            exc = DataCorruption(
                f"reservation {res.reservation_id!r}: {CHECKSUM_ALGORITHM} mismatch in block indices "
                f"{[header.block_indices[i] for i in bad]} (layers [{header.layer_start}, {header.layer_end}))"
            )
            logger.warning("refused KV message: %s", exc)
            res.fail(exc)
            return framing.ack_refused(exc)
        return self._finish(res, header, lambda: self._write(res, header, payload))

    def _finish(
        self, res: _Reservation, header: kv_pb2.KvTransferHeader, write: Callable[[], None] | None
    ) -> kv_pb2.KvTransferAck:
        """Apply an admitted, verified message: ``write`` it (``None``: the peer already wrote the
        blocks, e.g. over CUDA IPC), record its blocks × layers, and answer.

        Nothing is written or recorded unless the reservation is still live and incomplete; a
        ``last`` message that leaves block-layers missing fails the reservation.
        """
        if self._reservations.get(res.reservation_id) is not res or res.error is not None:
            return framing.ack_refused(
                res.error or ReservationNotFound(f"reservation {res.reservation_id!r} was released")
            )
        if res.result is not None:
            return _completed_ack(res, header)
        if write is not None:
            write()
        else:
            res.record(header)
        if res.result is None and header.last:
            incomplete = TransferFailed(
                f"reservation {res.reservation_id!r}: last message arrived with "
                f"{int((~res.covered).sum())} of {res.covered.size} block-layers missing"
            )
            res.fail(incomplete)
            return framing.ack_refused(incomplete)
        return framing.ack_ok()

    def _write(
        self, res: _Reservation, header: kv_pb2.KvTransferHeader, payload: bytearray | memoryview
    ) -> None:
        """Scatter a verified payload into the reserved blocks and record it."""
        from kvtransfer.blocks import from_bytes, scatter_blocks

        ls, le = header.layer_start, header.layer_end
        indices = list(header.block_indices)
        shape = [le - ls, 2, len(indices), *self.kv_cache.shape[3:]]
        data = from_bytes(payload, self.layout.dtype, shape)
        scatter_blocks(self.kv_cache, [res.block_ids[i] for i in indices], data, ls, le)
        res.record(header)


def _completed_ack(res: _Reservation, header: kv_pb2.KvTransferHeader) -> kv_pb2.KvTransferAck:
    """Ack for a message to a completed reservation: ok for a repeat (e.g. a resend after a lost ack), else refused."""
    if res.is_duplicate(header):
        return framing.ack_ok()
    return framing.ack_refused(ReservationNotFound(f"reservation {res.reservation_id!r} is already complete"))
