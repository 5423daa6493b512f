"""The device control channel: the protocol shared by the ``cuda_ipc`` and ``nccl`` backends.

Block data of these backends moves device to device and never crosses the
control socket; the socket carries typed protobuf frames only (as on ``tcp``:
4-byte big-endian length + message, :mod:`kvtransfer.framing`). The roles live in
:mod:`kvtransfer.device_handshake` (step 1), :mod:`kvtransfer.device_sender` and
:mod:`kvtransfer.device_receiver`; this module holds the lifecycle, the data-path
interface each backend implements (:class:`SenderChannel`, :class:`ReceiverChannel`)
and the frame I/O. Lifecycle:

1. Handshake, once per (prefill worker, decode worker) pair: the sender connects
   to the decode worker's control address and sends ``KvHello`` (its host id,
   device, layout and the transport it asks for). The receiver checks the layout
   (a mismatch answers ``KvExport(ok=False)`` → :class:`LayoutMismatch`), picks the
   transport (:func:`kvtransfer.device_handshake.choose_transport`), and answers
   ``KvExport`` carrying what the transport needs: the CUDA IPC handle of its
   cache, or the TCPStore rendezvous of a two-rank torch.distributed group. Each
   side opens a *channel*; the sender keeps the connection and channel for every
   later message of every reservation. The handshake belongs to the pair, not to
   the request that triggered it: cancelling that request does not cut it.
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
   ``last`` one: the error still reaches the request's sender. Messages of all
   reservations of a pair share its connection one at a time; a message, once
   begun, is always finished (a cancelled ``send`` first completes it), so one
   request's cancel never leaves the connection out of step for the others.
4. Abandon: a sender whose request stops before its ``last`` message
   (:meth:`kvtransfer.device_sender.DeviceKvSender.abandon`) waits for its
   copies, then sends a header with no blocks; the receiver fails the
   reservation and closes the grant.
5. Fence: while a grant is open the sender may write into the reserved blocks
   at any time, so a decode worker that releases a reservation frees its blocks
   only once :meth:`kvtransfer.device_receiver.DeviceKvReceiver.quiesce`
   returned: the grant closed (the prefill side's cancel reaches its sender as an
   abandon within milliseconds), or
   :data:`kvtransfer.device_receiver.FENCE_TIMEOUT_S` passed, when the connection
   is cut (its sender's next message fails). A sender drops a connection only
   after its copies ran, and only for an I/O error of that connection; the
   reservations it carried continue on a new connection (their ``last`` message
   is acknowledged only if every block × layer arrived).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from kvtransfer import framing

if TYPE_CHECKING:
    import torch

    from kvtransfer.base import _Reservation
    from kvtransfer.device_receiver import DeviceKvReceiver
    from tandem.v1 import kv_pb2


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


async def send_frame(writer: asyncio.StreamWriter, message: Message) -> None:
    """Write one control frame."""
    writer.write(framing.pack_frame(message))
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One control frame.

    Raises:
        asyncio.IncompleteReadError: the peer closed the connection.
        TransferFailed: the frame is larger than :data:`kvtransfer.framing.MAX_HEADER_BYTES`.
    """
    raw = await framing.read_frame(reader, framing.MAX_HEADER_BYTES)
    if raw is None:
        raise asyncio.IncompleteReadError(b"", None)
    return raw
