"""Frames on a byte stream and the mapping between refusals and engine errors."""

from __future__ import annotations

import asyncio
import struct

import pytest

from engine.errors import (
    DataCorruption,
    InvalidRequest,
    LayoutMismatch,
    ReservationNotFound,
    TandemError,
    TransferFailed,
)
from kvtransfer import framing
from tandem.v1 import kv_pb2


@pytest.mark.parametrize(
    "exc",
    [
        LayoutMismatch("KV layout mismatch: dtype: ours='float32' theirs='bfloat16'"),
        DataCorruption("crc32 mismatch in block indices [1]"),
        ReservationNotFound("reservation 'r' is unknown or released"),
        TransferFailed("last message arrived: 3 missing"),
    ],
)
def test_refusal_round_trips_to_the_same_error(exc: TandemError) -> None:
    ack = framing.ack_refused(exc)
    assert not ack.ok
    assert ack.code == exc.grpc_code
    back = framing.error_from_ack(kv_pb2.KvTransferAck.FromString(ack.SerializeToString()))
    assert type(back) is type(exc)
    assert str(back) == str(exc)


def test_invalid_request_keeps_its_field() -> None:
    back = framing.error_from_ack(framing.ack_refused(InvalidRequest("block_indices", "[3] out of range")))
    assert isinstance(back, InvalidRequest)
    assert (back.field, str(back)) == ("block_indices", "block_indices: [3] out of range")


def test_unknown_refusal_becomes_transfer_failed_with_its_code() -> None:
    back = framing.error_from_ack(kv_pb2.KvTransferAck(ok=False, error="Boom: no", code="INTERNAL"))
    assert type(back) is TransferFailed
    assert str(back) == "KV transfer refused (INTERNAL): Boom: no"


def test_frames_payloads_and_limits() -> None:
    async def scenario() -> None:
        reader = asyncio.StreamReader()
        ack = kv_pb2.KvTransferAck(ok=True)
        reader.feed_data(framing.pack_frame(ack) + b"xyz" + bytes(10) + struct.pack(">I", 9))
        reader.feed_eof()
        assert await framing.read_frame(reader, 64) == ack.SerializeToString()
        assert await framing.read_payload(reader, 3) == bytearray(b"xyz")
        await framing.discard_payload(reader, 10)
        with pytest.raises(TransferFailed, match="frame of 9 bytes exceeds the limit of 8 bytes"):
            await framing.read_frame(reader, 8)
        empty = asyncio.StreamReader()
        empty.feed_eof()
        assert await framing.read_frame(empty, 8) is None
        partial = asyncio.StreamReader()
        partial.feed_data(b"\x00\x00")
        partial.feed_eof()
        with pytest.raises(asyncio.IncompleteReadError):
            await framing.read_frame(partial, 8)

    asyncio.run(scenario())
