"""Write grants of the device control channel (``nccl``'s gloo flavour on CPU caches).

A reservation's first message is granted for the whole reservation; its later
messages are one-way (no frame read back) and only the ``last`` one is acknowledged;
a released reservation's blocks are reusable only once its grant closed
(:meth:`kvtransfer.device_receiver.DeviceKvReceiver.quiesce`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
from google.protobuf.message import Message

from engine.errors import ReservationNotFound, TransferFailed
from kvtransfer import device_receiver
from kvtransfer.device_receiver import DeviceKvReceiver
from kvtransfer.device_sender import DeviceKvSender
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


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the frames the receiver answers with after the handshake (grants and acks)."""
    count = [0]
    original = device_receiver.send_frame

    async def counting(writer: asyncio.StreamWriter, message: Message) -> None:
        count[0] += 1
        await original(writer, message)

    monkeypatch.setattr(device_receiver, "send_frame", counting)
    yield count


def test_one_grant_per_reservation_and_one_ack_for_its_last_message(answers: list[int]) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 8)
    other_dst = [4, 5, 6]

    async def scenario() -> None:
        async with started_pair("nccl", dst, layout, layout) as (sender, receiver, address):
            assert isinstance(sender, DeviceKvSender)
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            receiver.expect("res-2", "req-2", EPOCH, other_dst)
            dest1 = destination(address, layout, transport="nccl")
            dest2 = destination(
                address, layout, transport="nccl", reservation_id="res-2", block_ids=other_dst
            )
            await sender.send("req-1", dest1, SRC_BLOCKS, src, layer_end=1, last=False)
            assert answers[0] == 1  # res-1's grant
            assert sender._connections[address].granted == {"res-1"}
            await sender.send("req-2", dest2, SRC_BLOCKS, src)  # grant + ack
            assert answers[0] == 1 + 2
            await sender.send("req-1", dest1, SRC_BLOCKS, src, layer_start=1, layer_end=2, last=False)
            assert answers[0] == 1 + 2  # one-way
            await sender.send("req-1", dest1, SRC_BLOCKS, src, layer_start=2, last=True)
            assert answers[0] == 1 + 3  # the ack of the last message
            assert sender._connections[address].granted == set()
            one, two = await asyncio.gather(
                receiver.wait_complete("res-1", timeout_s=5), receiver.wait_complete("res-2", timeout_s=5)
            )
            assert (one.num_messages, two.num_messages) == (3, 1)
            assert isinstance(receiver, DeviceKvReceiver) and receiver._grants == {}

    asyncio.run(scenario())
    assert torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])
    assert torch.equal(dst[:, :, other_dst], src[:, :, SRC_BLOCKS])


def test_a_release_mid_stream_is_fenced_and_reaches_the_sender_at_its_last_message() -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair("nccl", dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            dest = destination(address, layout, transport="nccl")
            await sender.send("req-1", dest, SRC_BLOCKS, src, layer_end=1, last=False)
            while not receiver._reservations["res-1"].num_messages:  # one-way: applied a moment later
                await asyncio.sleep(0.01)
            assert receiver.forget("res-1") is True
            quiet = asyncio.ensure_future(receiver.quiesce("res-1"))
            await sender.send("req-1", dest, SRC_BLOCKS, src, layer_start=1, layer_end=2, last=False)
            await asyncio.sleep(0.05)
            assert not quiet.done()  # the sender may still write: the blocks are not reusable yet
            with pytest.raises(ReservationNotFound, match="'res-1' is unknown or released"):
                await sender.send("req-1", dest, SRC_BLOCKS, src, layer_start=2, last=True)
            await asyncio.wait_for(quiet, 5)

    asyncio.run(scenario())
    assert torch.equal(dst[0, :, DST_BLOCKS], src[0, :, SRC_BLOCKS])
    assert not dst[1:].any()  # drained, never written after the release


def test_abandon_closes_the_grant_and_fails_the_reservation() -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair("nccl", dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            dest = destination(address, layout, transport="nccl")
            await sender.send("req-1", dest, SRC_BLOCKS, src, layer_end=1, last=False)
            waiting = asyncio.ensure_future(receiver.wait_complete("res-1", timeout_s=5))
            await sender.abandon("req-1", dest)
            await sender.abandon("req-1", dest)  # nothing open any more: a no-op
            with pytest.raises(TransferFailed, match="the sender abandoned the transfer"):
                await waiting
            receiver.forget("res-1")
            await asyncio.wait_for(receiver.quiesce("res-1"), 1)
            # The connection stays in step: the next reservation is granted and completes.
            receiver.expect("res-2", "req-2", EPOCH, DST_BLOCKS)
            dest2 = destination(address, layout, transport="nccl", reservation_id="res-2")
            await sender.send("req-2", dest2, SRC_BLOCKS, src)
            assert (await receiver.wait_complete("res-2", timeout_s=5)).num_messages == 1

    asyncio.run(scenario())
    assert torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])


def test_a_grant_left_open_is_cut_after_the_fence_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_receiver, "FENCE_TIMEOUT_S", 0.2)
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair("nccl", dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            dest = destination(address, layout, transport="nccl")
            await sender.send("req-1", dest, SRC_BLOCKS, src, layer_end=1, last=False)
            assert isinstance(sender, DeviceKvSender)
            cut = sender._connections[address]
            receiver.forget("res-1")
            started = asyncio.get_running_loop().time()
            await receiver.quiesce("res-1")  # the sender stays silent: the connection is cut
            assert 0.2 <= asyncio.get_running_loop().time() - started < 1.0
            await asyncio.sleep(0.05)
            # Nothing was sent on the cut connection: the message goes over a new one, where
            # the released reservation refuses it (its own error, not a broken connection's).
            with pytest.raises(ReservationNotFound, match="'res-1' is unknown or released"):
                await sender.send("req-1", dest, SRC_BLOCKS, src, layer_start=1, last=True)
            assert sender._connections[address] is not cut

    asyncio.run(scenario())
