"""Step 1 of the device control channel (:mod:`kvtransfer.device`): peer identity, transport
choice and the ``KvHello``/``KvExport`` exchange that opens a pair's channels."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from engine.errors import InvalidRequest, LayoutMismatch, TandemError, TransferFailed
from kvtransfer import framing
from kvtransfer.device import ReceiverChannel, SenderChannel, read_frame, send_frame
from kvtransfer.layout import KvLayout
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch

    from kvtransfer.device_receiver import DeviceKvReceiver
    from kvtransfer.device_sender import DeviceKvSender

logger = logging.getLogger(__name__)

#: Transports a device receiver can serve.
DEVICE_TRANSPORTS = ("cuda_ipc", "nccl")
#: Seconds to wait for a control connection or a handshake answer.
HANDSHAKE_TIMEOUT_S = 60.0


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


@dataclass(eq=False)
class SenderSide:
    """What a sender's handshake opened: the control connection and the pair's channel."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    channel: SenderChannel
    transport: str


async def connect(sender: DeviceKvSender, address: str, kv_cache: torch.Tensor, asked: str) -> SenderSide:
    """The sender's handshake with the receiver at ``address``: connect, exchange
    ``KvHello``/``KvExport``, open the channel.

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
        hello = kv_pb2.KvHello(peer=peer_info(sender.worker_id, sender.layout, kv_cache), transport=asked)
        await send_frame(writer, hello)
        export = kv_pb2.KvExport.FromString(await asyncio.wait_for(read_frame(reader), HANDSHAKE_TIMEOUT_S))
        if not export.ok:
            raise framing.error_from_ack(kv_pb2.KvTransferAck(ok=False, error=export.error, code=export.code))
        sender.layout.check_compatible(KvLayout.from_pb(export.peer.layout))
        local_host = writer.get_extra_info("sockname")[0]
        channel = await open_sender_channel(sender, export, kv_cache, local_host)
    except BaseException as exc:
        writer.close()
        if isinstance(exc, (ConnectionError, asyncio.IncompleteReadError, DecodeError, TimeoutError)):
            raise TransferFailed(f"KV handshake with {address} failed: {exc!r}") from exc
        raise
    logger.info("KV transport %s to %s (worker %s) open", export.transport, address, export.peer.worker_id)
    return SenderSide(reader, writer, channel, export.transport)


async def accept(
    receiver: DeviceKvReceiver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> ReceiverChannel | None:
    """The receiver's handshake: answer the ``KvHello``; returns the open channel, or ``None``
    after a refusal (answered with ``KvExport(ok=False)``)."""
    hello = kv_pb2.KvHello.FromString(await read_frame(reader))
    export = kv_pb2.KvExport(ok=True, peer=peer_info(receiver.worker_id, receiver.layout, receiver.kv_cache))
    try:
        diffs = receiver.layout.differences(KvLayout.from_pb(hello.peer.layout))
        if diffs:
            raise LayoutMismatch(
                f"KV layout mismatch at handshake with {hello.peer.worker_id!r}: " + "; ".join(diffs)
            )
        export.transport = choose_transport(hello.transport, receiver.accepted, hello.peer, export.peer)
        channel = await open_receiver_channel(receiver, export.transport, hello, export)
    except TandemError as exc:
        logger.warning("refused KV handshake from %s: %s", hello.peer.worker_id, exc)
        ack = framing.ack_refused(exc)
        await send_frame(writer, kv_pb2.KvExport(ok=False, error=ack.error, code=ack.code))
        return None
    await send_frame(writer, export)
    logger.info("KV transport %s from %s open", export.transport, hello.peer.worker_id)
    return channel


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
    """The sender's channel for ``export.transport`` (see the backends).

    Raises:
        TransferFailed: the receiver chose a transport this sender does not know.
    """
    if export.transport == "cuda_ipc":
        from kvtransfer.cuda_ipc import open_ipc_sender

        return await open_ipc_sender(export, kv_cache)
    if export.transport == "nccl":
        from kvtransfer.nccl import open_nccl_sender

        return await open_nccl_sender(sender, export, kv_cache, local_host)
    raise TransferFailed(f"receiver chose unknown transport {export.transport!r}")
