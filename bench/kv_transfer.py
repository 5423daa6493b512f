"""KV transfer bandwidth: ``cuda_ipc`` and ``nccl`` next to a raw copy and raw NCCL send/recv.

``python -m bench.kv_transfer [--out bench/results/kv_transfer.json]`` on a CUDA host.

Layout: Llama-3-8B (32 layers, 8 KV heads, head_dim 128, bfloat16, 16-token
blocks: 2 MiB per block over all layers). Sizes 2 MiB (one block) to 1 GiB (512
blocks), always all 32 layers (what a request moves); source and destination block
ids random (non-contiguous). Rows, each the median of ``--iters`` timed runs after
a warm-up:

- ``raw_copy``: ``dst.copy_(src)`` of the same bytes, contiguous: device to device
  on one GPU, peer to peer (cuda:0 → cuda:1) with two.
- ``kernel_copy``: :func:`kernels.kv_copy.copy_blocks` between two caches in one
  process (the gather/scatter kernel alone).
- ``cuda_ipc``: a decode receiver in a child process (on the last GPU), this process
  sending with :class:`kvtransfer.cuda_ipc.CudaIpcKvSender`; wall time of one
  ``send`` of the whole size, one transfer at a time (latency-bound: grant round
  trip, kernel, CUDA event, ack round trip).
- ``cuda_ipc_layerwise``: the same bytes as one message per layer (32 messages)
  sent back to back: one grant, 31 one-way messages whose copies queue on the
  transfer stream, the last one waits for its event and ack (``kvtransfer.device``).
- ``cuda_ipc_groups8``: one message per 8 layers (4 messages), the default
  ``--kv-transfer-layers-per-message``.
- ``cuda_ipc_pipelined``: :data:`IN_FLIGHT` transfers of the size in flight at
  once (each in 4 groups of 8 layers, the groups of all transfers interleaved);
  total bytes over the wall time of the whole batch.
- ``nccl`` and ``raw_nccl``: need two GPUs (NCCL refuses two ranks on one GPU);
  reported as ``not run: one GPU`` otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
NUM_BLOCKS = 544
#: (label, blocks): 2 MiB .. 1 GiB, all layers.
SIZES = [("2MiB", 1), ("4MiB", 2), ("16MiB", 8), ("64MiB", 32), ("256MiB", 128), ("1GiB", 512)]
EPOCH = 1
#: Transfers in flight in the ``cuda_ipc_pipelined`` row.
IN_FLIGHT = 8


def layout() -> Any:
    from kvtransfer.layout import KvLayout

    return KvLayout(
        model_id="llama-3-8b-shape",
        dtype="bfloat16",
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE,
    )


def block_ids(seed: int, n: int) -> list[int]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(NUM_BLOCKS, generator=gen)[:n].tolist()


#: Layers per message of each ``cuda_ipc`` row (``LAYERS``: one message for the whole size).
MODES = {"one": LAYERS, "lw": 1, "g8": 8, "pipe": 8}
ROWS = {"one": "cuda_ipc", "lw": "cuda_ipc_layerwise", "g8": "cuda_ipc_groups8", "pipe": "cuda_ipc_pipelined"}


def batches(iters: int) -> list[tuple[list[str], str, int, str]]:
    """``(reservation ids, label, blocks, mode)`` of every timed or warm-up batch, in order (one
    reservation per batch, :data:`IN_FLIGHT` in the pipelined mode)."""
    out = []
    for label, n in SIZES:
        for mode in MODES:
            width = IN_FLIGHT if mode == "pipe" else 1
            for i in range(iters + 1):
                out.append(([f"{label}-{mode}-{i}-{j}" for j in range(width)], label, n, mode))
    return out


def receiver_main(device: str, iters: int) -> None:
    """Child process: a cuda_ipc receiver expecting every reservation of :func:`messages`."""
    import torch

    from kvtransfer.cuda_ipc import CudaIpcKvReceiver

    async def run() -> None:
        cache = torch.zeros(
            (LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM), dtype=torch.bfloat16, device=device
        )
        receiver = CudaIpcKvReceiver(cache, layout(), "decode-bench", EPOCH)
        print(await receiver.start(), flush=True)
        rids = [(rid, n) for batch, _label, n, _mode in batches(iters) for rid in batch]
        for rid, n in rids:
            receiver.expect(rid, rid, EPOCH, block_ids(hash_seed(rid) + 1, n))
        for rid, _n in rids:
            await receiver.wait_complete(rid, timeout_s=600)
        print("done", flush=True)
        await receiver.close()

    asyncio.run(run())


def hash_seed(rid: str) -> int:
    import zlib

    return zlib.crc32(rid.encode())


def timed(fn: Any, iters: int) -> float:
    """Median seconds of ``fn()`` (which must synchronize) over ``iters`` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_local(iters: int, src_dev: str, dst_dev: str) -> dict[str, dict[str, float]]:
    """``raw_copy`` and ``kernel_copy`` seconds per size label."""
    import torch

    from kernels.kv_copy import copy_blocks

    shape = (LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
    src = torch.randn(shape, device=src_dev).to(torch.bfloat16)
    dst = torch.zeros(shape, dtype=torch.bfloat16, device=dst_dev)
    flat_src, flat_dst = src.view(-1), dst.view(-1)
    per_block_layer = 2 * BLOCK_SIZE * HEADS * HEAD_DIM
    rows: dict[str, dict[str, float]] = {"raw_copy": {}, "kernel_copy": {}}
    for label, n in SIZES:
        numel = n * LAYERS * per_block_layer

        def raw(numel: int = numel) -> None:
            flat_dst[:numel].copy_(flat_src[:numel])
            torch.cuda.synchronize(dst_dev)
            torch.cuda.synchronize(src_dev)

        sids, dids = block_ids(1, n), block_ids(2, n)

        def kernel(sids: list[int] = sids, dids: list[int] = dids) -> None:
            copy_blocks(src, sids, dst, dids)
            torch.cuda.synchronize(src_dev)

        rows["raw_copy"][label] = timed(raw, iters)
        rows["kernel_copy"][label] = timed(kernel, iters)
    return rows


def bench_cuda_ipc(iters: int, src_dev: str, dst_dev: str) -> dict[str, dict[str, float]]:
    """``cuda_ipc`` and ``cuda_ipc_layerwise`` seconds per size label (receiver in a child process)."""
    import torch

    from kvtransfer.cuda_ipc import CudaIpcKvSender
    from kvtransfer.layout import KvDestination

    child = subprocess.Popen(
        [sys.executable, "-m", "bench.kv_transfer", "--receiver", dst_dev, "--iters", str(iters)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    address = child.stdout.readline().strip()
    lay = layout()
    src = torch.randn((LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM), device=src_dev).to(torch.bfloat16)
    samples: dict[str, dict[str, list[float]]] = {row: {} for row in ROWS.values()}

    async def run() -> None:
        sender = CudaIpcKvSender(lay, "prefill-bench")
        for batch, label, n, mode in batches(iters):
            plans = []
            for rid in batch:
                dst_ids = tuple(block_ids(hash_seed(rid) + 1, n))
                dest = KvDestination("decode-bench", EPOCH, rid, dst_ids, "cuda_ipc", address, lay)
                plans.append((rid, dest, block_ids(hash_seed(rid) + 2, n)))
            k = MODES[mode]
            start = time.perf_counter()
            for ls in range(0, LAYERS, k):  # group by group, every transfer of the batch in turn
                le = min(ls + k, LAYERS)
                for rid, dest, src_ids in plans:
                    await sender.send(
                        rid, dest, src_ids, src, layer_start=ls, layer_end=le, last=le == LAYERS
                    )
            elapsed = (time.perf_counter() - start) / len(plans)  # per transfer
            if not batch[0].endswith("-0-0"):  # the first batch of each series is a warm-up
                samples[ROWS[mode]].setdefault(label, []).append(elapsed)
        await sender.close()

    asyncio.run(run())
    assert child.stdout.readline().strip() == "done"
    child.wait(timeout=60)
    return {row: {label: statistics.median(v) for label, v in by.items()} for row, by in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/kv_transfer.json"))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--receiver", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver:
        receiver_main(args.receiver, args.iters)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench.kv_transfer needs a CUDA GPU", file=sys.stderr)
        return 2
    n_gpu = torch.cuda.device_count()
    src_dev, dst_dev = "cuda:0", f"cuda:{n_gpu - 1}"
    seconds = {**bench_local(args.iters, src_dev, dst_dev), **bench_cuda_ipc(args.iters, src_dev, dst_dev)}
    per_block_layer = 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 2
    sizes = {label: n * LAYERS * per_block_layer for label, n in SIZES}
    gbps = {row: {label: sizes[label] / s / 1e9 for label, s in by.items()} for row, by in seconds.items()}
    not_run = {} if n_gpu > 1 else {"nccl": "not run: one GPU", "raw_nccl": "not run: one GPU"}
    result = {
        "device": torch.cuda.get_device_name(0),
        "num_gpus": n_gpu,
        "torch": torch.__version__,
        "layout": {
            "layers": LAYERS,
            "kv_heads": HEADS,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE,
            "dtype": "bfloat16",
        },
        "bytes": sizes,
        "seconds": seconds,
        "gbps": gbps,
        "cuda_ipc_vs_raw_copy": {label: gbps["cuda_ipc"][label] / gbps["raw_copy"][label] for label in sizes},
        "in_flight": {"cuda_ipc_pipelined": IN_FLIGHT},
        "not_run": not_run,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| row | " + " | ".join(sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for row, by in gbps.items():
        print(f"| {row} GB/s | " + " | ".join(f"{by[label]:.1f}" for label in sizes) + " |")
    for row, why in not_run.items():
        print(f"| {row} | {why} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
