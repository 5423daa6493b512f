"""Concurrent reservations of one prefill/decode pair on the device control channel (``nccl``
over gloo on CPU caches): one request's cancel, abandon or failure stays its own.

Every reservation of a pair shares one control connection and one two-rank group. These
tests pin the cases that used to leak across requests (issue 4): a cancel during the
pair's handshake stalled the next request's rendezvous for ``P2P_TIMEOUT_S`` (60 s, past
the decode worker's 30 s lease: "reservation ... is unknown or released"), and a cancel or
failure mid-message cut the shared connection under the messages waiting for their turn.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import torch

from engine.errors import TransferFailed
from kvtransfer import device, device_handshake, nccl
from kvtransfer.device_sender import DeviceKvSender
from tandem.v1 import kv_pb2
from tests.kvtransfer import (
    DST_BLOCKS,
    EPOCH,
    SRC_BLOCKS,
    destination,
    make_layout,
    random_cache,
    started_pair,
    zero_cache,
)

OTHER_DST = [4, 5, 6]
#: Far below nccl.P2P_TIMEOUT_S (60 s): a stalled rendezvous fails the test instead of passing late.
PROMPT_S = 10.0


@pytest.fixture
def handshakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The transports of the handshakes the receivers answered."""
    seen: list[str] = []
    original = device_handshake.open_receiver_channel

    async def counting(receiver, transport, hello, export):  # type: ignore[no-untyped-def]
        seen.append(transport)
        return await original(receiver, transport, hello, export)

    monkeypatch.setattr(device_handshake, "open_receiver_channel", counting)
    yield seen


class Gate:
    """Holds the sender's data movement of one reservation's messages until :meth:`open`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, reservation_id: str, *, fail: bool = False) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        original = nccl._NcclSenderChannel._send

        def send(channel, header, src_block_ids, kv_cache):  # type: ignore[no-untyped-def]
            if header.destination.reservation_id != reservation_id or header.layer_start == 0:
                return original(channel, header, src_block_ids, kv_cache)
            self.entered.set()
            self.opened.wait(PROMPT_S)
            original(channel, header, src_block_ids, kv_cache)
            if fail:  # after the data: a peer left waiting for it would hold a thread for 60 s
                raise RuntimeError("injected data movement failure")

        monkeypatch.setattr(nccl._NcclSenderChannel, "_send", send)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, PROMPT_S)

    def open(self) -> None:
        self.opened.set()


async def queued_behind(sender: DeviceKvSender, address: str) -> None:
    """Return once a second message waits for its turn on the pair's connection."""
    lock = sender._connections[address].lock
    while not lock._waiters:  # type: ignore[attr-defined]
        await asyncio.sleep(0.001)


def test_a_request_cancelled_during_the_handshake_leaves_it_to_the_next_request(
    monkeypatch: pytest.MonkeyPatch, handshakes: list[str]
) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 8)
    original = device_handshake.open_sender_channel
    reached = asyncio.Event()

    async def slow_join(*args, **kwargs):  # type: ignore[no-untyped-def]
        reached.set()  # the receiver already waits in the pair's rendezvous
        await asyncio.sleep(0.3)
        return await original(*args, **kwargs)

    monkeypatch.setattr(device_handshake, "open_sender_channel", slow_join)

    async def scenario() -> None:
        async with started_pair("nccl", dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            receiver.expect("res-2", "req-2", EPOCH, OTHER_DST)
            first = asyncio.ensure_future(
                sender.send("req-1", destination(address, layout, transport="nccl"), SRC_BLOCKS, src)
            )
            await reached.wait()
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            dest2 = destination(
                address, layout, transport="nccl", reservation_id="res-2", block_ids=OTHER_DST
            )
            await asyncio.wait_for(sender.send("req-2", dest2, SRC_BLOCKS, src), PROMPT_S)
            assert (await receiver.wait_complete("res-2", timeout_s=1)).num_messages == 1
            assert receiver._reservations["res-1"].num_messages == 0  # cancelled before it began

    asyncio.run(scenario())
    assert handshakes == ["nccl"]  # the cancelled request's handshake served the next one
    assert torch.equal(dst[:, :, OTHER_DST], src[:, :, SRC_BLOCKS])
    assert not dst[:, :, DST_BLOCKS].any()


def test_a_peer_gone_mid_handshake_does_not_stall_the_next_pair() -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 8)

    async def scenario() -> None:
        async with started_pair("nccl", dst, layout, layout) as (sender, receiver, address):
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            hello = kv_pb2.KvHello(
                peer=device_handshake.peer_info("prefill-gone", layout, src), transport="nccl"
            )
            await device.send_frame(writer, hello)
            export = kv_pb2.KvExport.FromString(await device.read_frame(reader))
            assert export.ok and export.nccl.prefix.startswith("prefill-gone/")
            writer.close()  # gone before joining the pair's group: its rendezvous waits in vain
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            dest = destination(address, layout, transport="nccl")
            await asyncio.wait_for(sender.send("req-1", dest, SRC_BLOCKS, src), PROMPT_S)
            assert (await receiver.wait_complete("res-1", timeout_s=1)).num_messages == 1

    asyncio.run(scenario())
    assert torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])


def test_a_cancel_mid_message_finishes_it_and_spares_the_reservation_waiting_behind(
    monkeypatch: pytest.MonkeyPatch, handshakes: list[str]
) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 8)
    gate = Gate(monkeypatch, "res-1")

    async def scenario() -> None:
        async with started_pair("nccl", dst, layout, layout) as (sender, receiver, address):
            assert isinstance(sender, DeviceKvSender)
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            receiver.expect("res-2", "req-2", EPOCH, OTHER_DST)
            dest1 = destination(address, layout, transport="nccl")
            dest2 = destination(
                address, layout, transport="nccl", reservation_id="res-2", block_ids=OTHER_DST
            )
            await sender.send("req-1", dest1, SRC_BLOCKS, src, layer_end=1, last=False)
            await sender.send("req-2", dest2, SRC_BLOCKS, src, layer_end=1, last=False)
            conn = sender._connections[address]
            one = asyncio.ensure_future(
                sender.send("req-1", dest1, SRC_BLOCKS, src, layer_start=1, layer_end=2, last=False)
            )
            await gate.wait_entered()  # res-1's data is moving
            two = asyncio.ensure_future(
                sender.send("req-2", dest2, SRC_BLOCKS, src, layer_start=1, layer_end=2, last=False)
            )
            await queued_behind(sender, address)
            one.cancel()  # as the prefill worker's stream of a cancelled request
            await asyncio.sleep(0.05)
            assert not one.done()  # its message is finished first
            gate.open()
            with pytest.raises(asyncio.CancelledError):
                await one
            waiting = asyncio.ensure_future(receiver.wait_complete("res-1", timeout_s=PROMPT_S))
            await sender.abandon("req-1", dest1)
            with pytest.raises(TransferFailed, match="'res-1': the sender abandoned the transfer"):
                await waiting
            receiver.forget("res-1")
            await asyncio.wait_for(receiver.quiesce("res-1"), 0.5)  # no fence timeout: the grant closed
            await asyncio.wait_for(two, PROMPT_S)
            await sender.send("req-2", dest2, SRC_BLOCKS, src, layer_start=2, last=True)
            assert (await receiver.wait_complete("res-2", timeout_s=1)).num_messages == 3
            assert sender._connections[address] is conn and conn.granted == set()

    asyncio.run(scenario())
    assert handshakes == ["nccl"]
    assert torch.equal(dst[:, :, OTHER_DST], src[:, :, SRC_BLOCKS])
    assert torch.equal(dst[:2, :, DST_BLOCKS], src[:2, :, SRC_BLOCKS])  # res-1's layers 0 and 1
    assert not dst[2:, :, DST_BLOCKS].any()  # and nothing after its abandon


def test_a_failed_message_drops_its_connection_and_the_next_reservation_moves_on(
    monkeypatch: pytest.MonkeyPatch, handshakes: list[str]
) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 8)
    gate = Gate(monkeypatch, "res-1", fail=True)

    async def scenario() -> None:
        async with started_pair("nccl", dst, layout, layout) as (sender, receiver, address):
            assert isinstance(sender, DeviceKvSender)
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            receiver.expect("res-2", "req-2", EPOCH, OTHER_DST)
            dest1 = destination(address, layout, transport="nccl")
            dest2 = destination(
                address, layout, transport="nccl", reservation_id="res-2", block_ids=OTHER_DST
            )
            await sender.send("req-1", dest1, SRC_BLOCKS, src, layer_end=1, last=False)
            await sender.send("req-2", dest2, SRC_BLOCKS, src, layer_end=1, last=False)
            one = asyncio.ensure_future(sender.send("req-1", dest1, SRC_BLOCKS, src, layer_start=1))
            await gate.wait_entered()
            two = asyncio.ensure_future(sender.send("req-2", dest2, SRC_BLOCKS, src, layer_start=1))
            await queued_behind(sender, address)
            gate.open()
            with pytest.raises(TransferFailed, match="injected data movement failure"):
                await one
            await asyncio.wait_for(two, PROMPT_S)  # re-granted on a new connection
            assert (await receiver.wait_complete("res-2", timeout_s=1)).num_messages == 2
            with pytest.raises(TransferFailed, match="sender failed writing the KV"):
                await receiver.wait_complete("res-1", timeout_s=1)

    asyncio.run(scenario())
    assert handshakes == ["nccl", "nccl"]
    assert torch.equal(dst[:, :, OTHER_DST], src[:, :, SRC_BLOCKS])


def test_a_stray_abandon_gets_no_answer_that_a_later_request_could_read() -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 8)

    async def scenario() -> None:
        async with started_pair("nccl", dst, layout, layout) as (_sender, receiver, address):
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            hello = kv_pb2.KvHello(
                peer=device_handshake.peer_info("prefill-raw", layout, src), transport="nccl"
            )
            await device.send_frame(writer, hello)
            assert kv_pb2.KvExport.FromString(await device.read_frame(reader)).ok
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            stray = destination(address, layout, transport="nccl", reservation_id="res-gone")
            abandon = kv_pb2.KvTransferHeader(
                request_id="req-gone", destination=stray.to_pb(), src_worker_id="prefill-raw", last=True
            )
            await device.send_frame(writer, abandon)  # one-way: its sender reads nothing back
            wrong_epoch = destination(address, layout, transport="nccl", epoch=EPOCH + 1)
            first = kv_pb2.KvTransferHeader(
                request_id="req-1",
                destination=wrong_epoch.to_pb(),
                layout=layout.to_pb(),
                src_worker_id="prefill-raw",
                block_indices=range(len(SRC_BLOCKS)),
                layer_end=layout.num_layers,
                checksum_algorithm="none",
                payload_bytes=layout.payload_bytes(len(SRC_BLOCKS), 0, layout.num_layers),
                last=True,
            )
            await device.send_frame(writer, first)
            grant = kv_pb2.KvWriteGrant.FromString(
                await asyncio.wait_for(device.read_frame(reader), PROMPT_S)
            )
            assert not grant.granted  # the answer to this message, not to the abandon
            assert grant.final.code == "FAILED_PRECONDITION"
            assert f"epoch {EPOCH + 1}" in grant.final.error and "res-gone" not in grant.final.error
            writer.close()
            assert not receiver._reservations["res-1"].done.is_set()  # nothing else touched

    asyncio.run(scenario())
