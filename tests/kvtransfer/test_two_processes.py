"""Device backends between two real processes: ``nccl`` (gloo on CPU caches, 127.0.0.1) and ``cuda_ipc`` (one GPU).

The receiver runs in a child process (:mod:`tests.kvtransfer.peer`); this process
sends. The child writes its whole cache back, so the test checks the exact bytes
of the exact destination blocks and that nothing else was touched.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.errors import LayoutMismatch
from kvtransfer import get_backend
from kvtransfer.blocks import from_bytes
from tests.kvtransfer import DST_BLOCKS, SRC_BLOCKS, destination, make_layout, random_cache

ROOT = Path(__file__).resolve().parents[2]
UNTOUCHED = [2, 4, 5]


def start_peer(
    transport: str, device: str, dtype: str, out: Path, staging: int | None = None
) -> tuple[subprocess.Popen[str], str]:
    args = [sys.executable, "-m", "tests.kvtransfer.peer", transport, device, dtype, str(out)]
    if staging is not None:
        args.append(str(staging))
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    assert address.startswith("127.0.0.1:"), address
    return proc, address


@pytest.fixture
def peers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def finish(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert proc.wait(timeout=30) == 0
    return line


def check_cache(out: Path, dtype: str, src: torch.Tensor) -> None:
    layout = make_layout(dtype)
    dst = from_bytes(
        bytearray(out.read_bytes()),
        dtype,
        (layout.num_layers, 2, 6, layout.block_size, layout.num_kv_heads, layout.head_dim),
    )
    for src_block, dst_block in zip(SRC_BLOCKS, DST_BLOCKS, strict=True):
        assert torch.equal(dst[:, :, dst_block], src[:, :, src_block].cpu())
    assert not dst[:, :, UNTOUCHED].any()


def send_layer_wise(transport: str, device: str, dtype: str, address: str) -> dict[str, int]:
    """Layer 0 alone, then layers 1..2 as the last message; returns the sender's memory stats."""
    layout = make_layout(dtype)
    sender_cls, _ = get_backend(transport)
    src = random_cache(layout, 8).to(device)

    async def scenario() -> dict[str, int]:
        sender = sender_cls(layout, "prefill-0")
        try:
            dest = destination(address, layout, transport=transport)
            first = await sender.send("req-1", dest, SRC_BLOCKS, src, layer_start=0, layer_end=1, last=False)
            rest = await sender.send("req-1", dest, SRC_BLOCKS, src, layer_start=1, last=True)
            assert (first.num_bytes, rest.num_bytes) == (
                3 * layout.bytes_per_block_layer,
                6 * layout.bytes_per_block_layer,
            )
            return dict(sender.memory)  # type: ignore[attr-defined]
        finally:
            await sender.close()

    return asyncio.run(scenario())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nccl_over_gloo_writes_exact_blocks_layer_by_layer(
    tmp_path: Path, peers: list[subprocess.Popen[str]], dtype: str
) -> None:
    layout = make_layout(dtype)
    out = tmp_path / "cache.bin"
    # a staging buffer of 2 block-layers: the 3-block messages go in 2 (layer 0) and 3 (layers 1-2) chunks
    proc, address = start_peer("nccl", "cpu", dtype, out, staging=2 * layout.bytes_per_block_layer)
    peers.append(proc)
    memory = send_layer_wise("nccl", "cpu", dtype, address)
    assert memory == {"decode-0/communicator": 0, "decode-0/staging": 0}  # CPU: no device memory
    assert finish(proc) == f"done 2 {3 * layout.bytes_per_block}"
    check_cache(out, dtype, random_cache(layout, 8))


def test_nccl_refuses_another_layout_at_the_handshake(
    tmp_path: Path, peers: list[subprocess.Popen[str]]
) -> None:
    proc, address = start_peer("nccl", "cpu", "float32", tmp_path / "cache.bin")
    peers.append(proc)
    layout = make_layout("float32", num_kv_heads=1)
    sender_cls, _ = get_backend("nccl")

    async def scenario() -> None:
        sender = sender_cls(layout, "prefill-0")
        try:
            dest = destination(address, layout, transport="nccl")
            with pytest.raises(LayoutMismatch, match="num_kv_heads: ours=2 theirs=1"):
                await sender.send("req-1", dest, SRC_BLOCKS, random_cache(layout, 8))
        finally:
            await sender.close()

    asyncio.run(scenario())
    proc.kill()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda_ipc needs a CUDA GPU")
@pytest.mark.parametrize("transport", ["cuda_ipc", "auto"])
def test_cuda_ipc_between_two_processes_on_one_gpu(
    tmp_path: Path, peers: list[subprocess.Popen[str]], transport: str
) -> None:
    """Prefill (this process) writes into the decode process's cache through CUDA IPC; ``auto`` picks it too."""
    out = tmp_path / "cache.bin"
    proc, address = start_peer(transport, "cuda", "bfloat16", out)
    peers.append(proc)
    layout = make_layout("bfloat16")
    send_layer_wise(transport, "cuda", "bfloat16", address)
    assert finish(proc) == f"done 2 {3 * layout.bytes_per_block}"
    check_cache(out, "bfloat16", random_cache(layout, 8))
