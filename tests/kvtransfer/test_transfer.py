"""End-to-end transfer rules, identical for every backend (tcp on 127.0.0.1 sockets, and loopback)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from engine.errors import (
    DataCorruption,
    InvalidRequest,
    LayoutMismatch,
    ReservationNotFound,
    TransferFailed,
)
from kvtransfer import framing
from tests.kvtransfer import (
    DST_BLOCKS,
    EPOCH,
    NUM_LAYERS,
    SRC_BLOCKS,
    destination,
    make_layout,
    random_cache,
    started_pair,
    zero_cache,
)

BACKENDS = ["tcp", "loopback", "nccl"]  # nccl runs its gloo flavour on CPU caches
CHECKSUM_BACKENDS = ["tcp", "loopback"]  # payloads that cross a socket carry per-block checksums
UNTOUCHED = [2, 4, 5]  # destination blocks outside DST_BLOCKS


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_send_copies_blocks_exactly(backend: str, dtype: str) -> None:
    layout = make_layout(dtype)
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair(backend, dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            stats = await sender.send(
                "req-1", destination(address, layout, transport=backend), SRC_BLOCKS, src
            )
            received = await receiver.wait_complete("res-1", timeout_s=5)
            assert (stats.num_bytes, stats.num_blocks) == (3 * layout.bytes_per_block, 3)
            assert stats.seconds > 0
            assert received.block_ids == (1, 3, 0)
            assert (received.request_id, received.num_messages) == ("req-1", 1)
            assert received.num_bytes == 3 * layout.bytes_per_block

    run(scenario())
    for src_block, dst_block in zip(SRC_BLOCKS, DST_BLOCKS, strict=True):
        assert torch.equal(dst[:, :, dst_block], src[:, :, src_block])
    assert not dst[:, :, UNTOUCHED].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_range_sends_complete_only_after_the_last(backend: str) -> None:
    layout = make_layout("bfloat16")
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair(backend, dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            dest = destination(address, layout, transport=backend)
            stats = await sender.send("req-1", dest, SRC_BLOCKS, src, layer_start=0, layer_end=1, last=False)
            assert stats.num_bytes == 3 * layout.bytes_per_block_layer
            with pytest.raises(TransferFailed, match=r"not complete .* \(3 of 9 block-layers arrived\)"):
                await receiver.wait_complete("res-1", timeout_s=0.05)
            assert torch.equal(dst[0][:, DST_BLOCKS], src[0][:, SRC_BLOCKS])
            assert not dst[1:].any()
            await sender.send("req-1", dest, SRC_BLOCKS, src, layer_start=1, last=True)
            received = await receiver.wait_complete("res-1", timeout_s=5)
            assert received.num_messages == 2

    run(scenario())
    assert torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])
    assert not dst[:, :, UNTOUCHED].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_message_with_missing_layers_fails_the_reservation(backend: str) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair(backend, dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            dest = destination(address, layout, transport=backend)
            with pytest.raises(TransferFailed, match="6 of 9 block-layers missing"):
                await sender.send("req-1", dest, SRC_BLOCKS, src, layer_end=1, last=True)
            with pytest.raises(TransferFailed, match="6 of 9 block-layers missing"):
                await receiver.wait_complete("res-1", timeout_s=5)

    run(scenario())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_refuses_a_destination_of_another_layout(backend: str) -> None:
    ours, theirs = make_layout(), make_layout(model_id="other", block_size=8)
    src, dst = random_cache(ours, 8), zero_cache(theirs, 6)

    async def scenario() -> None:
        async with started_pair(backend, dst, theirs, ours) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            with pytest.raises(LayoutMismatch) as info:
                await sender.send("req-1", destination(address, theirs, transport=backend), SRC_BLOCKS, src)
            assert str(info.value) == (
                "KV layout mismatch: model_id: ours='tiny' theirs='other'; block_size: ours=4 theirs=8"
            )

    run(scenario())
    assert not dst.any()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model_id": "other"}, "model_id: ours='other' theirs='tiny'"),
        ({"num_layers": 2}, "num_layers: ours=2 theirs=3"),
        ({"dtype": "float16"}, "dtype: ours='float16' theirs='float32'"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_refuses_a_message_of_another_layout(
    backend: str, changes: dict[str, Any], expected: str
) -> None:
    sender_layout, receiver_layout = make_layout(), make_layout(**changes)
    src, dst = random_cache(sender_layout, 8), zero_cache(receiver_layout, 6)

    async def scenario() -> None:
        async with started_pair(backend, dst, receiver_layout, sender_layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            stale = destination(address, sender_layout, transport=backend)  # advertises the wrong layout
            with pytest.raises(LayoutMismatch, match=expected):
                await sender.send("req-1", stale, SRC_BLOCKS, src)
            if backend == "nccl":  # refused at the handshake, before any message names the reservation
                with pytest.raises(TransferFailed, match=r"\(0 of \d+ block-layers arrived\)"):
                    await receiver.wait_complete("res-1", timeout_s=0.05)
                return
            with pytest.raises(LayoutMismatch, match=expected):
                await receiver.wait_complete("res-1", timeout_s=5)

    run(scenario())
    assert not dst.any()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"epoch": EPOCH + 1}, "epoch 8, this is worker 'decode-0' epoch 7"),
        ({"reservation_id": "res-unknown"}, "reservation 'res-unknown' is unknown or released"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_epoch_or_unknown_reservation_is_refused_and_the_connection_survives(
    backend: str, kwargs: dict[str, Any], expected: str
) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair(backend, dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            bad = destination(address, layout, transport=backend, **kwargs)
            with pytest.raises(ReservationNotFound, match=expected):
                await sender.send("req-1", bad, SRC_BLOCKS, src)
            assert not dst.any()
            # The reservation itself is unharmed: a correct message still completes it.
            await sender.send("req-1", destination(address, layout, transport=backend), SRC_BLOCKS, src)
            await receiver.wait_complete("res-1", timeout_s=5)
            assert getattr(receiver, "num_connections", 1) == 1

    run(scenario())
    assert torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])


@pytest.mark.parametrize("backend", BACKENDS)
def test_forgotten_reservation_is_refused(backend: str) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair(backend, dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            waiter = asyncio.create_task(receiver.wait_complete("res-1", timeout_s=5))
            await asyncio.sleep(0)
            assert receiver.forget("res-1") is True
            assert receiver.forget("res-1") is False
            with pytest.raises(ReservationNotFound, match="'res-1' was released"):
                await waiter
            with pytest.raises(ReservationNotFound, match="'res-1' is unknown or released"):
                await sender.send("req-1", destination(address, layout, transport=backend), SRC_BLOCKS, src)
            with pytest.raises(ReservationNotFound, match="'res-1' is unknown or released"):
                await receiver.wait_complete("res-1", timeout_s=5)

    run(scenario())
    assert not dst.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_ids_other_than_the_reserved_ones_are_refused(backend: str) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair(backend, dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            bad = destination(address, layout, transport=backend, block_ids=[1, 3, 4])
            with pytest.raises(
                InvalidRequest, match=r"\[1, 3, 4\] are not the reserved blocks \[1, 3, 0\]"
            ) as info:
                await sender.send("req-1", bad, SRC_BLOCKS, src)
            assert info.value.field == "destination.block_ids"
            with pytest.raises(InvalidRequest):
                await receiver.wait_complete("res-1", timeout_s=5)

    run(scenario())
    assert not dst.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_message_for_another_request_is_refused(backend: str) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)

    async def scenario() -> None:
        async with started_pair(backend, dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            with pytest.raises(ReservationNotFound, match="belongs to request 'req-1', not 'req-2'"):
                await sender.send("req-2", destination(address, layout, transport=backend), SRC_BLOCKS, src)

    run(scenario())
    assert not dst.any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", CHECKSUM_BACKENDS)
def test_corrupted_payload_is_detected_before_anything_is_written(
    backend: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = make_layout(dtype)
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)
    encode = framing.encode_message

    def encode_then_flip(**kwargs: Any) -> Any:
        header, payload = encode(**kwargs)
        block_row = len(payload) // (2 * NUM_LAYERS * len(SRC_BLOCKS))  # one block of one K or V row
        payload[(4 * len(SRC_BLOCKS) + 1) * block_row + 1] ^= 0x01  # layer 2 K, block index 1
        return header, payload

    monkeypatch.setattr(framing, "encode_message", encode_then_flip)

    async def scenario() -> None:
        async with started_pair(backend, dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            with pytest.raises(DataCorruption, match=r"crc32 mismatch in block indices \[1\]"):
                await sender.send("req-1", destination(address, layout, transport=backend), SRC_BLOCKS, src)
            with pytest.raises(DataCorruption, match=r"block indices \[1\]"):
                await receiver.wait_complete("res-1", timeout_s=5)

    run(scenario())
    assert not dst.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wait_times_out_with_transfer_failed(backend: str) -> None:
    layout = make_layout()

    async def scenario() -> None:
        async with started_pair(backend, zero_cache(layout, 6), layout, layout) as (_, receiver, _address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            with pytest.raises(
                TransferFailed, match=r"not complete after 0.05 s \(0 of 9 block-layers arrived\)"
            ):
                await receiver.wait_complete("res-1", timeout_s=0.05)
            with pytest.raises(ReservationNotFound):
                await receiver.wait_complete("res-other", timeout_s=0.05)

    run(scenario())


@pytest.mark.parametrize("backend", BACKENDS)
def test_completed_reservation_accepts_an_exact_repeat_but_refuses_new_data(backend: str) -> None:
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)
    other = random_cache(layout, 8, seed=1)

    async def scenario() -> None:
        async with started_pair(backend, dst, layout, layout) as (sender, receiver, address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            dest = destination(address, layout, transport=backend)
            await sender.send("req-1", dest, SRC_BLOCKS, src)
            await sender.send("req-1", dest, SRC_BLOCKS, src)  # e.g. a resend after a lost ack
            if backend in CHECKSUM_BACKENDS:
                with pytest.raises(ReservationNotFound, match="'res-1' is already complete"):
                    await sender.send("req-1", dest, SRC_BLOCKS, other)
            else:  # no checksums: same blocks and layers count as a repeat, answered without a write
                await sender.send("req-1", dest, SRC_BLOCKS, other)
            received = await receiver.wait_complete("res-1", timeout_s=5)
            assert received.num_messages == 1

    run(scenario())
    assert torch.equal(dst[:, :, DST_BLOCKS], src[:, :, SRC_BLOCKS])


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_fails_pending_waits(backend: str) -> None:
    layout = make_layout()

    async def scenario() -> None:
        async with started_pair(backend, zero_cache(layout, 6), layout, layout) as (_, receiver, _address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            waiter = asyncio.create_task(receiver.wait_complete("res-1", timeout_s=5))
            await asyncio.sleep(0)
            await receiver.close()
            with pytest.raises(TransferFailed, match="KV receiver closed"):
                await waiter

    run(scenario())


@pytest.mark.parametrize("backend", BACKENDS)
def test_expect_rejects_bad_reservations(backend: str) -> None:
    layout = make_layout()

    async def scenario() -> None:
        async with started_pair(backend, zero_cache(layout, 6), layout, layout) as (_, receiver, _address):
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            with pytest.raises(ValueError, match="already expected"):
                receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            with pytest.raises(ValueError, match="has epoch 8, receiver has 7"):
                receiver.expect("res-2", "req-2", EPOCH + 1, DST_BLOCKS)

    run(scenario())
