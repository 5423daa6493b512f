"""The tcp sender's test-only fault hook (``TANDEM_FAULT_INJECT``): one corrupted or
cut message, caught by the receiver's checks, then normal transfers again."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from engine.errors import DataCorruption, TransferFailed
from kvtransfer.tcp import FAULT_INJECT_ENV, TcpKvReceiver, TcpKvSender, faults_from_env
from tests.kvtransfer import DST_BLOCKS, EPOCH, SRC_BLOCKS, destination, make_layout, random_cache, zero_cache


def test_the_hook_is_off_by_default_and_rejects_unknown_faults() -> None:
    assert faults_from_env({}) == []
    assert faults_from_env({FAULT_INJECT_ENV: ""}) == []
    listed = {FAULT_INJECT_ENV: "stall_kv_once, drop_kv_once,corrupt_kv_once"}
    assert faults_from_env(listed) == ["stall_kv_once", "drop_kv_once", "corrupt_kv_once"]
    with pytest.raises(ValueError, match=r"unknown faults \['explode'\]"):
        faults_from_env({FAULT_INJECT_ENV: "drop_kv_once,explode"})


@pytest.mark.parametrize(
    ("fault", "error", "message"),
    [
        ("corrupt_kv_once", DataCorruption, "crc32 mismatch in block indices [0] (layers [0, 3))"),
        ("drop_kv_once", TransferFailed, "connection cut mid-transfer"),
    ],
)
def test_one_faulty_message_is_refused_then_transfers_work(
    monkeypatch: pytest.MonkeyPatch, fault: str, error: type[Exception], message: str
) -> None:
    monkeypatch.setenv(FAULT_INJECT_ENV, fault)
    layout = make_layout()
    src, dst = random_cache(layout, 8), zero_cache(layout, 6)
    second = [2, 4, 5]

    async def scenario() -> None:
        receiver = TcpKvReceiver(dst, layout, "decode-0", EPOCH)
        address = await receiver.start()
        sender = TcpKvSender(layout, "prefill-0")
        receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
        receiver.expect("res-2", "req-2", EPOCH, second)
        with pytest.raises(error, match=re.escape(message)):
            await sender.send("req-1", destination(address, layout), SRC_BLOCKS, src)
        assert not dst.any()  # nothing of the faulty message was written
        await sender.send(
            "req-2", destination(address, layout, reservation_id="res-2", block_ids=second), SRC_BLOCKS, src
        )
        await receiver.wait_complete("res-2", timeout_s=5)
        await sender.close()
        await receiver.close()

    asyncio.run(scenario())
    assert torch.equal(dst[:, :, second], src[:, :, SRC_BLOCKS])
    assert not dst[:, :, [0, 1, 3]].any()
