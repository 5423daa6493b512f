"""The tcp backend's connection handling and its limits against a bad peer (127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
import torch

from engine.errors import TransferFailed
from kvtransfer import framing
from kvtransfer.tcp import TcpKvReceiver, TcpKvSender
from tandem.v1 import kv_pb2
from tests.helpers.net import free_port
from tests.kvtransfer import DST_BLOCKS, EPOCH, SRC_BLOCKS, destination, make_layout, random_cache, zero_cache


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_sender_reuses_one_connection_for_sequential_and_concurrent_sends() -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 12)
    reservations = {f"res-{i}": [i, i + 6] for i in range(6)}

    async def scenario() -> None:
        receiver = TcpKvReceiver(dst, layout, "decode-0", EPOCH)
        address = await receiver.start()
        sender = TcpKvSender(layout, "prefill-0")
        for rid, block_ids in reservations.items():
            receiver.expect(rid, f"req-{rid}", EPOCH, block_ids)
        sends = [
            sender.send(
                f"req-{rid}", destination(address, layout, reservation_id=rid, block_ids=ids), [5, 2], src
            )
            for rid, ids in reservations.items()
        ]
        for send in sends[:3]:
            await send
        await asyncio.gather(*sends[3:])
        for rid in reservations:
            await receiver.wait_complete(rid, timeout_s=5)
        assert receiver.num_connections == 1
        await sender.close()
        await receiver.close()

    run(scenario())
    for i in range(6):
        assert torch.equal(dst[:, :, [i, i + 6]], src[:, :, [5, 2]])


def test_sender_reconnects_once_when_its_connection_broke() -> None:
    layout = make_layout()
    src = random_cache(layout, 8)
    first, second = zero_cache(layout, 6), zero_cache(layout, 6)
    port = free_port()

    async def scenario() -> None:
        sender = TcpKvSender(layout, "prefill-0")
        old = TcpKvReceiver(first, layout, "decode-0", EPOCH, port=port)
        address = await old.start()
        assert address == f"127.0.0.1:{port}"
        old.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
        await sender.send("req-1", destination(address, layout), SRC_BLOCKS, src)
        await old.close()  # drops the sender's connection
        new = TcpKvReceiver(second, layout, "decode-0", EPOCH, port=port)
        await new.start()
        new.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
        await sender.send("req-1", destination(address, layout), SRC_BLOCKS, src)
        await new.wait_complete("res-1", timeout_s=5)
        assert new.num_connections == 1
        await sender.close()
        await new.close()

    run(scenario())
    assert torch.equal(second[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])


def test_unreachable_receiver_raises_transfer_failed() -> None:
    layout = make_layout()
    address = f"127.0.0.1:{free_port()}"

    async def scenario() -> None:
        sender = TcpKvSender(layout, "prefill-0")
        with pytest.raises(TransferFailed, match=f"cannot connect to KV receiver at {address}"):
            await sender.send("req-1", destination(address, layout), SRC_BLOCKS, random_cache(layout, 8))
        with pytest.raises(TransferFailed, match="bad tcp transfer address 'nowhere'"):
            await sender.send("req-1", destination("nowhere", layout), SRC_BLOCKS, random_cache(layout, 8))
        await sender.close()

    run(scenario())


async def _raw_exchange(address: str, data: bytes) -> tuple[kv_pb2.KvTransferAck, bytes]:
    """Write raw bytes to the receiver; return its ack and whatever follows it until EOF."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    raw = await framing.read_frame(reader, framing.MAX_ACK_BYTES)
    assert raw is not None
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return kv_pb2.KvTransferAck.FromString(raw), rest


def _valid_header(address: str, **fields: Any) -> kv_pb2.KvTransferHeader:
    layout = make_layout()
    header = kv_pb2.KvTransferHeader(
        request_id="req-1",
        destination=destination(address, layout).to_pb(),
        layout=layout.to_pb(),
        block_indices=[0, 1, 2],
        layer_start=0,
        layer_end=layout.num_layers,
        block_checksums=[0, 0, 0],
        checksum_algorithm="crc32",
        payload_bytes=3 * layout.bytes_per_block,
        last=True,
    )
    for name, value in fields.items():
        setattr(header, name, value)
    return header


@pytest.mark.parametrize(
    ("make_data", "code", "error"),
    [
        (
            lambda a: struct.pack(">I", framing.MAX_HEADER_BYTES + 1),
            "UNAVAILABLE",
            "TransferFailed: frame of 1048577",
        ),
        (
            lambda a: struct.pack(">I", 3) + b"\xff\xff\xff",
            "INVALID_ARGUMENT",
            "InvalidRequest: header: not a",
        ),
        (
            lambda a: framing.pack_frame(_valid_header(a, payload_bytes=1 << 40)),
            "INVALID_ARGUMENT",
            "InvalidRequest: payload_bytes: 1099511627776 bytes exceed the whole cache (4608 bytes)",
        ),
    ],
)
def test_receiver_answers_and_closes_on_headers_it_cannot_trust(
    make_data: Any, code: str, error: str
) -> None:
    layout = make_layout()
    dst = zero_cache(layout, 6)

    async def scenario() -> None:
        receiver = TcpKvReceiver(dst, layout, "decode-0", EPOCH)
        address = await receiver.start()
        receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
        ack, rest = await _raw_exchange(address, make_data(address))
        assert (ack.ok, ack.code) == (False, code)
        assert ack.error.startswith(error)
        assert rest == b""  # the receiver closed the connection
        await receiver.close()

    run(scenario())
    assert not dst.any()


def test_refused_payload_is_drained_and_the_connection_kept() -> None:
    layout = make_layout()
    dst = zero_cache(layout, 6)

    async def scenario() -> None:
        receiver = TcpKvReceiver(dst, layout, "decode-0", EPOCH)
        address = await receiver.start()
        receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
        header = _valid_header(address, payload_bytes=100)  # wrong for the layout, within the cache bound
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        for _ in range(2):
            writer.write(framing.pack_frame(header) + b"\x07" * 100)
            raw = await framing.read_frame(reader, framing.MAX_ACK_BYTES)
            assert raw is not None
            ack = kv_pb2.KvTransferAck.FromString(raw)
            assert (ack.ok, ack.code) == (False, "INVALID_ARGUMENT")
        assert ack.error == "InvalidRequest: payload_bytes: 100 != 2304 for the layout"
        writer.close()
        await receiver.close()

    run(scenario())
    assert not dst.any()


def test_payload_over_several_read_chunks_and_the_checksum_thread() -> None:
    layout = make_layout(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)
    src, dst = random_cache(layout, 12), zero_cache(layout, 12)
    src_ids, dst_ids = list(range(10)), [11, *range(1, 10)]

    async def scenario() -> None:
        receiver = TcpKvReceiver(dst, layout, "decode-0", EPOCH)
        address = await receiver.start()
        receiver.expect("res-1", "req-1", EPOCH, dst_ids)
        sender = TcpKvSender(layout, "prefill-0")
        stats = await sender.send("req-1", destination(address, layout, block_ids=dst_ids), src_ids, src)
        assert stats.num_bytes == 10 * 512 * 1024 > framing.READ_CHUNK_BYTES
        await receiver.wait_complete("res-1", timeout_s=5)
        await sender.close()
        await receiver.close()

    run(scenario())
    assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
    assert not dst[:, :, [0, 10]].any()
