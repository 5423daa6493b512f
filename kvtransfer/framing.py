"""Wire format of one KV transfer message, shared by every backend (torch-free at import).

A message is a ``tandem.v1.KvTransferHeader`` plus ``header.payload_bytes`` raw
bytes: the gathered tensor ``[n_layers, 2, n_blocks, block_size, num_kv_heads,
head_dim]`` as laid out in memory (little-endian). The receiver answers each
message with a ``tandem.v1.KvTransferAck``. On a byte stream (the ``tcp`` backend)
each protobuf travels as a frame: a 4-byte big-endian length, then the serialized
message; the payload follows its header frame unframed. Nothing is pickled.

A refusal's ack carries ``code`` = the gRPC status name of the error and
``error`` = ``"<ErrorClass>: <message>"``; :func:`error_from_ack` turns it back into
the matching :mod:`engine.errors` exception on the sender.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.errors import (
    DataCorruption,
    InvalidRequest,
    LayoutMismatch,
    ReservationNotFound,
    TandemError,
    TransferFailed,
)
from kvtransfer.checksum import CHECKSUM_ALGORITHM, block_checksums
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch
    from google.protobuf.message import Message

    from kvtransfer.layout import KvDestination, KvLayout

#: Largest header frame a receiver reads (bytes); a longer one closes the connection.
MAX_HEADER_BYTES = 1 << 20
#: Largest ack frame a sender reads (bytes).
MAX_ACK_BYTES = 64 << 10
#: Bytes read at a time when a payload is received or discarded.
READ_CHUNK_BYTES = 4 << 20

_LENGTH = struct.Struct(">I")

#: Errors a refusal may name; anything else comes back as TransferFailed.
_REFUSALS: dict[str, type[TandemError]] = {
    cls.__name__: cls for cls in (TransferFailed, LayoutMismatch, DataCorruption, ReservationNotFound)
}


def encode_message(
    *,
    request_id: str,
    destination: KvDestination,
    layout: KvLayout,
    src_worker_id: str,
    kv_cache: torch.Tensor,
    src_block_ids: Sequence[int],
    layer_start: int,
    layer_end: int,
    last: bool,
) -> tuple[kv_pb2.KvTransferHeader, memoryview]:
    """Gather ``src_block_ids`` of layers ``[layer_start, layer_end)`` and build the message carrying them.

    Block ``src_block_ids[i]`` goes to ``destination.block_ids[i]`` (the message
    carries every destination block, ``block_indices = 0..n-1``).

    Returns:
        The header (with one CRC-32 per block) and the payload bytes (a writable view).

    Raises:
        ValueError: bad block ids or layer range (from :func:`kvtransfer.blocks.gather_blocks`).
    """
    from kvtransfer.blocks import gather_blocks, to_cpu_bytes

    data = gather_blocks(kv_cache, src_block_ids, layer_start, layer_end)
    payload = to_cpu_bytes(data)
    header = kv_pb2.KvTransferHeader(
        request_id=request_id,
        destination=destination.to_pb(),
        layout=layout.to_pb(),
        src_worker_id=src_worker_id,
        block_indices=range(len(src_block_ids)),
        layer_start=layer_start,
        layer_end=layer_end,
        block_checksums=block_checksums(payload, 2 * (layer_end - layer_start), len(src_block_ids)),
        checksum_algorithm=CHECKSUM_ALGORITHM,
        payload_bytes=len(payload),
        last=last,
    )
    return header, payload


def pack_frame(message: Message) -> bytes:
    """``message`` serialized behind its 4-byte big-endian length."""
    data = message.SerializeToString()
    return _LENGTH.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes | None:
    """Read one length-prefixed frame; ``None`` on a clean end of stream before it.

    Raises:
        TransferFailed: the frame announces more than ``max_bytes`` bytes.
        asyncio.IncompleteReadError: the stream ended inside the frame.
    """
    try:
        prefix = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    (length,) = _LENGTH.unpack(prefix)
    if length > max_bytes:
        raise TransferFailed(f"frame of {length} bytes exceeds the limit of {max_bytes} bytes")
    return await reader.readexactly(length)


async def read_payload(reader: asyncio.StreamReader, num_bytes: int) -> bytearray:
    """Read exactly ``num_bytes`` into one preallocated ``bytearray`` (chunks of :data:`READ_CHUNK_BYTES`).

    Raises:
        asyncio.IncompleteReadError: the stream ended first.
    """
    payload = bytearray(num_bytes)
    view = memoryview(payload)
    offset = 0
    while offset < num_bytes:
        chunk = await reader.readexactly(min(READ_CHUNK_BYTES, num_bytes - offset))
        view[offset : offset + len(chunk)] = chunk
        offset += len(chunk)
    return payload


async def discard_payload(reader: asyncio.StreamReader, num_bytes: int) -> None:
    """Read and drop ``num_bytes`` (a refused message's payload) in bounded chunks."""
    remaining = num_bytes
    while remaining:
        remaining -= len(await reader.readexactly(min(READ_CHUNK_BYTES, remaining)))


def ack_ok() -> kv_pb2.KvTransferAck:
    """The ack of an accepted message."""
    return kv_pb2.KvTransferAck(ok=True)


def ack_refused(exc: TandemError) -> kv_pb2.KvTransferAck:
    """The ack refusing a message because of ``exc`` (code = its gRPC status name)."""
    return kv_pb2.KvTransferAck(ok=False, error=f"{type(exc).__name__}: {exc}", code=exc.grpc_code)


def error_from_ack(ack: kv_pb2.KvTransferAck) -> TandemError:
    """The :mod:`engine.errors` exception a refusal names (inverse of :func:`ack_refused`)."""
    name, _, message = ack.error.partition(": ")
    if name == InvalidRequest.__name__:
        field, _, detail = message.partition(": ")
        return InvalidRequest(field, detail)
    cls = _REFUSALS.get(name)
    if cls is not None:
        return cls(message)
    return TransferFailed(f"KV transfer refused ({ack.code or 'UNKNOWN'}): {ack.error}")
