"""Transport choice of the device backends (``auto``) and handshake refusals, on CPU caches."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.errors import InvalidRequest, LayoutMismatch
from kvtransfer.auto import AutoKvSender
from kvtransfer.device_handshake import choose_transport
from kvtransfer.device_receiver import DeviceKvReceiver
from kvtransfer.nccl import NcclKvSender
from tandem.v1 import kv_pb2
from tests.kvtransfer import DST_BLOCKS, EPOCH, SRC_BLOCKS, destination, make_layout, random_cache, zero_cache


def peer(host: str, device: str) -> kv_pb2.KvPeerInfo:
    return kv_pb2.KvPeerInfo(worker_id="w", host_id=host, device_type=device)


BOTH = ("cuda_ipc", "nccl")


@pytest.mark.parametrize(
    ("sender", "receiver", "expected"),
    [
        (peer("h1", "cuda"), peer("h1", "cuda"), "cuda_ipc"),  # one host, both on GPUs
        (peer("h1", "cuda"), peer("h2", "cuda"), "nccl"),  # across hosts
        (peer("h1", "cpu"), peer("h1", "cpu"), "nccl"),  # CPU caches: nccl's gloo flavour
    ],
)
def test_auto_picks_cuda_ipc_on_one_host_and_nccl_across(
    sender: kv_pb2.KvPeerInfo, receiver: kv_pb2.KvPeerInfo, expected: str
) -> None:
    assert choose_transport("auto", BOTH, sender, receiver) == expected


@pytest.mark.parametrize(
    ("asked", "accepted", "sender", "receiver", "match"),
    [
        (
            "cuda_ipc",
            BOTH,
            peer("h1", "cuda"),
            peer("h2", "cuda"),
            "cuda_ipc needs both KV caches on CUDA of one host",
        ),
        ("cuda_ipc", BOTH, peer("h1", "cpu"), peer("h1", "cuda"), "cuda_ipc needs both KV caches on CUDA"),
        ("nccl", BOTH, peer("h1", "cpu"), peer("h2", "cuda"), "nccl needs both KV caches on one device type"),
        ("auto", ("cuda_ipc",), peer("h1", "cuda"), peer("h2", "cuda"), "'nccl' is not served here"),
        ("rdma", BOTH, peer("h1", "cuda"), peer("h1", "cuda"), "'rdma' is not one of"),
    ],
)
def test_impossible_transports_are_refused(
    asked: str, accepted: tuple[str, ...], sender: kv_pb2.KvPeerInfo, receiver: kv_pb2.KvPeerInfo, match: str
) -> None:
    with pytest.raises(InvalidRequest, match=match):
        choose_transport(asked, accepted, sender, receiver)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"dtype": "bfloat16"}, "dtype: ours='bfloat16' theirs='float32'"),
        ({"block_size": 8}, "block_size: ours=8 theirs=4"),
        ({"num_layers": 2}, "num_layers: ours=2 theirs=3"),
        ({"num_kv_heads": 1}, "num_kv_heads: ours=1 theirs=2"),
        ({"head_dim": 8}, "head_dim: ours=8 theirs=4"),
        ({"cache_layout": "LBKTHD"}, "cache_layout: ours='LBKTHD' theirs='LKBTHD'"),
    ],
)
def test_handshake_refuses_a_layout_mismatch_with_a_clear_error(
    changes: dict[str, Any], expected: str
) -> None:
    """The decode worker's check at ``KvHello``: the sender's ``send`` raises before any data moves."""
    sender_layout, receiver_layout = make_layout(), make_layout(**changes)
    receiver_cache = zero_cache(receiver_layout, 6)

    async def scenario() -> None:
        receiver = DeviceKvReceiver(receiver_cache, receiver_layout, "decode-0", EPOCH)
        address = await receiver.start()
        sender = NcclKvSender(sender_layout, "prefill-0")
        try:
            receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
            # the destination advertises the sender's layout (stale), so only the handshake can catch it
            dest = destination(address, sender_layout, transport="nccl")
            with pytest.raises(LayoutMismatch, match=f"at handshake with 'prefill-0': {expected}"):
                await sender.send("req-1", dest, SRC_BLOCKS, random_cache(sender_layout, 8))
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(scenario())
    assert not receiver_cache.any()


def test_auto_sender_follows_each_destination_transport() -> None:
    """``auto`` on CPU caches: a tcp destination goes over tcp, an ``auto`` one over nccl (gloo)."""
    from kvtransfer.tcp import TcpKvReceiver

    layout = make_layout()
    src = random_cache(layout, 8)
    tcp_cache, dev_cache = zero_cache(layout, 6), zero_cache(layout, 6)

    async def scenario() -> None:
        tcp_rx = TcpKvReceiver(tcp_cache, layout, "decode-0", EPOCH)
        dev_rx = DeviceKvReceiver(dev_cache, layout, "decode-0", EPOCH)
        tcp_addr, dev_addr = await tcp_rx.start(), await dev_rx.start()
        sender = AutoKvSender(layout, "prefill-0")
        try:
            for rx, addr, transport in ((tcp_rx, tcp_addr, "tcp"), (dev_rx, dev_addr, "auto")):
                rx.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
                await sender.send("req-1", destination(addr, layout, transport=transport), SRC_BLOCKS, src)
                await rx.wait_complete("res-1", timeout_s=5)
            assert sender.transport_to(dev_addr) == "nccl"
            assert sender.transport_to(tcp_addr) is None
        finally:
            await sender.close()
            await tcp_rx.close()
            await dev_rx.close()

    asyncio.run(scenario())
    for cache in (tcp_cache, dev_cache):
        assert (cache[:, :, DST_BLOCKS] == src[:, :, SRC_BLOCKS]).all()
