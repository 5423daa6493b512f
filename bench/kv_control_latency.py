"""Control-path latency of the device KV channel: ``nccl`` over gloo on CPU, tiny payloads.

``python -m bench.kv_control_latency [--transfers 300] [--messages 1]``

A decode receiver (:class:`kvtransfer.nccl.NcclKvReceiver`) runs in a child process on
a CPU cache; this process sends one reservation at a time with
:class:`kvtransfer.nccl.NcclKvSender`: ``--messages`` messages per reservation
(1: a single un-streamed transfer, header → grant and done → ack; more: layer
groups, one-way after the first). A tiny layout (3 layers, 2 KV heads,
head_dim 4, 4-token blocks, float32: 3 blocks are 2.25 KiB) keeps data movement
negligible. Per transfer it reports, as medians over ``--transfers`` after a
warm-up (the handshake):

- ``send_ms``: wall time of all ``send`` calls of the reservation;
- ``push_ms``: the part spent moving data (:meth:`SenderChannel.push`);
- ``control_ms``: ``send_ms - push_ms``, the control socket's share.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import torch

from kvtransfer import get_backend
from kvtransfer.layout import KvDestination, KvLayout

WARMUP = 20
EPOCH = 1
SRC_BLOCKS, DST_BLOCKS = [5, 2, 7], [1, 3, 0]
#: 3 layers, 2 KV heads, head_dim 4, 4-token blocks, float32: 768 bytes per block.
LAYOUT = KvLayout(model_id="tiny", dtype="float32", num_layers=3, num_kv_heads=2, head_dim=4, block_size=4)


def cache(num_blocks: int, *, seed: int | None = None) -> torch.Tensor:
    """``[L, 2, num_blocks, B, H, D]`` of :data:`LAYOUT`: zeros, or seeded random values."""
    shape = (LAYOUT.num_layers, 2, num_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    if seed is None:
        return torch.zeros(shape)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


async def receive(transfers: int) -> None:
    """The child: expect ``transfers`` reservations, print the address, free each once complete."""
    _, receiver_cls = get_backend("nccl")
    receiver = receiver_cls(cache(8), LAYOUT, "decode-0", EPOCH)
    print(await receiver.start(), flush=True)
    for i in range(transfers):
        receiver.expect(f"res-{i}", f"req-{i}", EPOCH, DST_BLOCKS)
    for i in range(transfers):
        await receiver.wait_complete(f"res-{i}", timeout_s=60)
        receiver.forget(f"res-{i}")
    print("done", flush=True)
    await asyncio.sleep(0.2)  # let the last ack leave
    await receiver.close()


async def send(address: str, transfers: int, messages: int) -> dict[str, float]:
    """Send every reservation; the medians (ms) after the warm-up."""
    src = cache(8, seed=0)
    sender_cls, _ = get_backend("nccl")
    sender = sender_cls(LAYOUT, "prefill-0")
    pushed = [0.0]
    bounds = _groups(LAYOUT.num_layers, messages)
    sends, pushes = [], []
    try:
        for i in range(transfers):
            dest = KvDestination("decode-0", EPOCH, f"res-{i}", tuple(DST_BLOCKS), "nccl", address, LAYOUT)
            pushed[0] = 0.0
            started = time.perf_counter()
            for start, end in bounds:
                await sender.send(
                    f"req-{i}",
                    dest,
                    SRC_BLOCKS,
                    src,
                    layer_start=start,
                    layer_end=end,
                    last=end == bounds[-1][1],
                )
            if i >= WARMUP:
                sends.append(time.perf_counter() - started)
                pushes.append(pushed[0])
            if i == 0:  # time the channel's push once it exists (after the handshake)
                channel = sender._connections[address].channel  # type: ignore[attr-defined]
                channel.push = functools.partial(_timed, channel.push, pushed)  # type: ignore[method-assign]
    finally:
        await sender.close()
    send_ms, push_ms = statistics.median(sends) * 1e3, statistics.median(pushes) * 1e3
    control = [(s - p) * 1e3 for s, p in zip(sends, pushes, strict=True)]
    return {"send_ms": send_ms, "push_ms": push_ms, "control_ms": statistics.median(control)}


async def _timed(push: Callable[..., Awaitable[None]], pushed: list[float], *args: object) -> None:
    """``push(*args)``, adding its wall seconds to ``pushed[0]``."""
    started = time.perf_counter()
    try:
        await push(*args)
    finally:
        pushed[0] += time.perf_counter() - started


def _groups(num_layers: int, messages: int) -> list[tuple[int, int]]:
    """``messages`` contiguous layer ranges covering ``[0, num_layers)``."""
    cuts = [round(num_layers * k / messages) for k in range(messages + 1)]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfers", type=int, default=300)
    parser.add_argument("--messages", type=int, default=1, help="messages per reservation (1-3)")
    parser.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    total = args.transfers + WARMUP
    if args.receive:
        asyncio.run(receive(total))
        return
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.kv_control_latency", "--receive", "--transfers", str(args.transfers)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        address = child.stdout.readline().strip()
        result = asyncio.run(send(address, total, args.messages))
        assert child.stdout.readline().strip() == "done"
    finally:
        child.wait(30)
    print(
        f"nccl/gloo, {args.messages} message(s) per transfer, median of {args.transfers}: "
        f"send {result['send_ms']:.3f} ms, push {result['push_ms']:.3f} ms, "
        f"control {result['control_ms']:.3f} ms"
    )


if __name__ == "__main__":
    main()
