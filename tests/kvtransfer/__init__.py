"""Tests of ``kvtransfer``, plus the small fixtures they share (tiny layouts and caches)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from kvtransfer import KvDestination, KvLayout, KvReceiver, KvSender, get_backend

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 3, 2, 4, 4
EPOCH = 7
SRC_BLOCKS = [5, 2, 7]
DST_BLOCKS = [1, 3, 0]


def make_layout(dtype: str = "float32", **changes: Any) -> KvLayout:
    """The tiny layout of these tests, with ``changes`` applied."""
    layout = KvLayout(
        model_id="tiny",
        dtype=dtype,
        num_layers=NUM_LAYERS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE,
    )
    return replace(layout, **changes)


def zero_cache(layout: KvLayout, num_blocks: int) -> torch.Tensor:
    """``[L, 2, num_blocks, block_size, H, D]`` zeros of ``layout``."""
    shape = (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return torch.zeros(shape, dtype=getattr(torch, layout.dtype))


def random_cache(layout: KvLayout, num_blocks: int, seed: int = 0) -> torch.Tensor:
    """Seeded random contents (no zero elements) of ``layout``."""
    gen = torch.Generator().manual_seed(seed)
    cache = zero_cache(layout, num_blocks)
    return (torch.rand(cache.shape, generator=gen) + 0.5).to(cache.dtype)


def destination(
    address: str,
    layout: KvLayout,
    *,
    transport: str = "tcp",
    reservation_id: str = "res-1",
    block_ids: Sequence[int] = DST_BLOCKS,
    epoch: int = EPOCH,
) -> KvDestination:
    """A destination on worker ``decode-0``."""
    return KvDestination(
        worker_id="decode-0",
        epoch=epoch,
        reservation_id=reservation_id,
        block_ids=tuple(block_ids),
        transport=transport,
        transfer_address=address,
        layout=layout,
    )


@contextlib.asynccontextmanager
async def started_pair(
    backend: str, dst_cache: torch.Tensor, dst_layout: KvLayout, src_layout: KvLayout
) -> AsyncIterator[tuple[KvSender, KvReceiver, str]]:
    """A started receiver on ``dst_cache`` (worker ``decode-0``, :data:`EPOCH`) and a sender; closed on exit."""
    sender_cls, receiver_cls = get_backend(backend)
    receiver = receiver_cls(dst_cache, dst_layout, "decode-0", EPOCH)
    address = await receiver.start()
    sender = sender_cls(src_layout, "prefill-0")
    try:
        yield sender, receiver, address
    finally:
        await sender.close()
        await receiver.close()
