"""Layer-wise KV streaming in one process: a real prefill engine (``PrefillService``
on the tiny checkpoint) pushes to a real ``tcp`` receiver on 127.0.0.1, and the
receiver records every message it admits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine.errors import TransferFailed
from engine.worker_config import WorkerConfig
from engine.worker_runtime import WorkerRuntime, build_runtime
from kvtransfer import get_backend
from kvtransfer.base import KvReceiver, KvSender, TransferStats
from kvtransfer.layout import KvDestination
from prefill_service.layer_stream import group_bounds
from prefill_service.service import PrefillService
from tandem.v1 import generation_pb2, kv_pb2, worker_pb2
from tests.helpers.checkpoints import make_tiny_llama

NUM_LAYERS = 5
EPOCH = 3
DECODE_BLOCKS = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("stream") / "model", seed=4, num_hidden_layers=NUM_LAYERS)


class Recorder:
    """Wraps a receiver's ``_finish`` (every backend applies a message there) and a sender's
    ``send``: records ``(layer_start, layer_end, last, block_indices)`` of every message the
    receiver applies and the source block ids sent; with ``hold_after`` set, the sender waits
    at that message until ``gate`` is set (so a test can cancel a request mid-stream)."""

    def __init__(self, sender: KvSender, receiver: KvReceiver, hold_after: int | None) -> None:
        self.seen: list[tuple[int, int, bool, list[int]]] = []
        self.src_blocks: list[list[int]] = []
        self.hold_after = hold_after
        self.held = asyncio.Event()
        self.gate = asyncio.Event()
        finish, send = receiver._finish, sender.send

        def recording_finish(res, header: kv_pb2.KvTransferHeader, write):  # type: ignore[no-untyped-def]
            self.seen.append((header.layer_start, header.layer_end, header.last, list(header.block_indices)))
            return finish(res, header, write)

        async def gated_send(
            request_id: str, destination: KvDestination, src_block_ids: Sequence[int], *args, **kwargs
        ) -> TransferStats:
            if self.hold_after is not None and len(self.src_blocks) == self.hold_after:
                self.held.set()
                await self.gate.wait()
            self.src_blocks.append(list(src_block_ids))
            return await send(request_id, destination, src_block_ids, *args, **kwargs)

        receiver._finish = recording_finish  # type: ignore[method-assign]
        sender.send = gated_send  # type: ignore[method-assign]


@dataclass
class Pair:
    runtime: WorkerRuntime
    service: PrefillService
    receiver: KvReceiver
    rec: Recorder
    address: str
    transport: str


@contextlib.asynccontextmanager
async def pair(
    model_dir: Path,
    layers_per_message: int,
    hold_after: int | None = None,
    max_batched: int = 2048,
    transport: str = "tcp",
) -> AsyncIterator[Pair]:
    """A prefill runtime and a receiver of ``transport`` (``nccl``: gloo on CPU) in this process."""
    config = WorkerConfig(
        role="prefill",
        model=model_dir,
        device="cpu",
        dtype="float32",
        num_kv_blocks=64,
        kv_transfer_layers_per_message=layers_per_message,
        max_num_batched_tokens=max_batched,
    )
    runtime = build_runtime(config)
    dst = torch.zeros_like(runtime.runner.kv_cache[:, :, :DECODE_BLOCKS])
    sender_cls, receiver_cls = get_backend(transport)
    receiver = receiver_cls(dst, runtime.layout, "decode-0", EPOCH)
    address = await receiver.start()
    sender = sender_cls(runtime.layout, "prefill-0")
    rec = Recorder(sender, receiver, hold_after)
    try:
        yield Pair(runtime, PrefillService(runtime, sender), receiver, rec, address, transport)
    finally:
        await sender.close()
        await receiver.close()
        runtime.loop.stop()


def reserve(p: Pair, reservation_id: str, block_ids: Sequence[int]) -> KvDestination:
    p.receiver.expect(reservation_id, reservation_id, EPOCH, block_ids)
    return KvDestination(
        worker_id="decode-0",
        epoch=EPOCH,
        reservation_id=reservation_id,
        block_ids=tuple(block_ids),
        transport=p.transport,
        transfer_address=p.address,
        layout=p.runtime.layout,
    )


def prefill_request(reservation_id: str, prompt: list[int], dest: KvDestination) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(
        request_id=reservation_id,
        prompt_token_ids=prompt,
        sampling=generation_pb2.SamplingParams(max_tokens=8),
        destination=dest.to_pb(),
    )


async def used_blocks(runtime: WorkerRuntime) -> int:
    await asyncio.sleep(0.05)  # the service frees its blocks in a background task
    return await runtime.loop.call(lambda c: c.scheduler.kv_cache_manager.num_used_blocks)


PROMPT = [(7 * i + 3) % 500 + 3 for i in range(45)]  # 3 blocks of 16, the last partial
DST = [9, 2, 30]


async def first_token_without_streaming(model_dir: Path) -> tuple[int, torch.Tensor]:
    async with pair(model_dir, 0) as p:
        reply = await p.service._prefill(prefill_request("plain", PROMPT, reserve(p, "plain", DST)))
        await p.receiver.wait_complete("plain", 10)
        assert [s[:3] for s in p.rec.seen] == [(0, NUM_LAYERS, True)]
        return reply.first_token_id, p.receiver.kv_cache[:, :, DST].clone()


@pytest.mark.parametrize(
    ("transport", "per_message"),
    [("tcp", 1), ("tcp", 2), ("tcp", 3), ("tcp", NUM_LAYERS), ("tcp", 8), ("nccl", 1), ("nccl", 2)],
)
def test_one_message_per_layer_group_and_the_same_kv(
    model_dir: Path, transport: str, per_message: int
) -> None:
    async def run() -> None:
        plain_token, plain_kv = await first_token_without_streaming(model_dir)
        async with pair(model_dir, per_message, transport=transport) as p:
            reply = await p.service._prefill(prefill_request("r1", PROMPT, reserve(p, "r1", DST)))
            received = await p.receiver.wait_complete("r1", 10)
            groups = group_bounds(NUM_LAYERS, per_message)
            assert len(groups) == -(-NUM_LAYERS // per_message)
            assert p.rec.seen == [(s, e, e == NUM_LAYERS, [0, 1, 2]) for s, e in groups]
            assert received.num_messages == len(groups)
            assert reply.kv_blocks_sent == 3
            assert reply.kv_bytes_sent == p.runtime.layout.payload_bytes(3, 0, NUM_LAYERS)
            assert reply.first_token_id == plain_token
            src = p.rec.src_blocks[0]
            assert all(blocks == src for blocks in p.rec.src_blocks)
            assert torch.equal(p.receiver.kv_cache[:, :, DST], p.runtime.runner.kv_cache[:, :, src])
            assert torch.equal(p.receiver.kv_cache[:, :, DST], plain_kv)
            assert await used_blocks(p.runtime) == 0

    asyncio.run(run())


def test_chunked_prompt_and_prefix_hit_still_send_each_group_once(model_dir: Path) -> None:
    """A prompt computed in 16-token chunks streams its final chunk's groups only (each carrying
    every block); a prompt whose first two blocks are cached streams the same way."""

    async def run() -> None:
        async with pair(model_dir, 2, max_batched=16) as p:
            groups = [(s, e, e == NUM_LAYERS, [0, 1, 2]) for s, e in group_bounds(NUM_LAYERS, 2)]
            await p.service._prefill(prefill_request("c1", PROMPT, reserve(p, "c1", DST)))
            assert p.rec.seen == groups
            src = p.rec.src_blocks[0]
            assert torch.equal(p.receiver.kv_cache[:, :, DST], p.runtime.runner.kv_cache[:, :, src])
            p.rec.seen.clear()
            other = [*PROMPT[:32], 11, 12, 13]  # shares two full blocks with PROMPT
            reply = await p.service._prefill(prefill_request("c2", other, reserve(p, "c2", [4, 5, 6])))
            assert reply.num_cached_tokens == 32
            assert p.rec.seen == groups
            assert (await p.receiver.wait_complete("c2", 10)).num_messages == 3
            assert await used_blocks(p.runtime) == 0

    asyncio.run(run())


@pytest.mark.parametrize("transport", ["tcp", "nccl"])
def test_cancel_mid_stream_frees_the_prefill_blocks(model_dir: Path, transport: str) -> None:
    """Cancelled after its first layer group went out: the request's blocks are released, the
    reservation stays incomplete (on a device backend the sender abandons it, closing its write
    grant, so the decode side may reuse the blocks at once), and the next request streams normally."""

    async def run() -> None:
        async with pair(model_dir, 2, hold_after=1, transport=transport) as p:
            call = asyncio.ensure_future(
                p.service._prefill(prefill_request("x1", PROMPT, reserve(p, "x1", DST)))
            )
            await asyncio.wait_for(p.rec.held.wait(), 10)
            while not p.rec.seen:  # device backends: the first group is one-way, applied a moment later
                await asyncio.sleep(0.01)
            assert [s[:2] for s in p.rec.seen] == [(0, 2)]
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await used_blocks(p.runtime) == 0
            if transport == "nccl":
                with pytest.raises(TransferFailed, match="abandoned"):
                    await p.receiver.wait_complete("x1", 5)
            p.rec.hold_after = None
            p.rec.gate.set()
            assert p.receiver.forget("x1")  # the decode side releases it (router Release / lease)
            await asyncio.wait_for(p.receiver.quiesce("x1"), 0.5)
            reply = await p.service._prefill(prefill_request("x2", PROMPT, reserve(p, "x2", DST)))
            assert (await p.receiver.wait_complete("x2", 10)).num_messages == 3
            assert reply.num_cached_tokens == 32
            assert await used_blocks(p.runtime) == 0

    asyncio.run(run())
