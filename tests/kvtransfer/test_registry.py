"""Backend registry and the loopback backend's own addressing."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import TransferFailed
from kvtransfer import available_backends, get_backend
from kvtransfer.auto import AutoKvSender
from kvtransfer.cuda_ipc import CudaIpcKvReceiver, CudaIpcKvSender
from kvtransfer.device_receiver import DeviceKvReceiver
from kvtransfer.loopback import LoopbackKvReceiver, LoopbackKvSender
from kvtransfer.nccl import NcclKvReceiver, NcclKvSender
from kvtransfer.registry import receiver_backend
from kvtransfer.tcp import TcpKvReceiver, TcpKvSender
from tests.kvtransfer import EPOCH, SRC_BLOCKS, destination, make_layout, random_cache, zero_cache


def test_backends_by_name() -> None:
    assert available_backends() == ["auto", "cuda_ipc", "loopback", "nccl", "tcp"]
    assert get_backend("tcp") == (TcpKvSender, TcpKvReceiver)
    assert get_backend("loopback") == (LoopbackKvSender, LoopbackKvReceiver)
    assert get_backend("cuda_ipc") == (CudaIpcKvSender, CudaIpcKvReceiver)
    assert get_backend("nccl") == (NcclKvSender, NcclKvReceiver)
    assert get_backend("auto") == (AutoKvSender, DeviceKvReceiver)
    with pytest.raises(
        ValueError, match="unknown KV transfer backend 'rdma'; available: auto, cuda_ipc, loopback, nccl, tcp"
    ):
        get_backend("rdma")


def test_auto_on_a_cpu_cache_serves_tcp() -> None:
    cache = zero_cache(make_layout(), 2)
    assert receiver_backend("auto", cache) == "tcp"
    assert receiver_backend("nccl", cache) == "nccl"
    assert receiver_backend("tcp", cache) == "tcp"


def test_loopback_addresses_are_distinct_and_released_on_close() -> None:
    layout = make_layout()

    async def scenario() -> None:
        first = LoopbackKvReceiver(zero_cache(layout, 6), layout, "decode-0", EPOCH)
        second = LoopbackKvReceiver(zero_cache(layout, 6), layout, "decode-0", EPOCH)
        a, b = await first.start(), await second.start()
        assert a.startswith("loopback:") and b.startswith("loopback:") and a != b
        await first.close()
        sender = LoopbackKvSender(layout, "prefill-0")
        with pytest.raises(TransferFailed, match=f"no loopback KV receiver at '{a}'"):
            await sender.send(
                "req-1", destination(a, layout, transport="loopback"), SRC_BLOCKS, random_cache(layout, 8)
            )
        await second.close()

    asyncio.run(scenario())
