"""Random paged-cache batches shared by the attention kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    """One layer's cache plus the per-sequence layout of a batch."""

    cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B]
    max_seq_len: int


def random_paged_batch(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
    extra_table_blocks: int = 0,
) -> PagedBatch:
    """A cache with random contents and shuffled, non-contiguous block tables."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(seq_lens) // block_size) + extra_table_blocks
    num_blocks = len(seq_lens) * max_blocks + 3
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = perm[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).to(torch.int32)
    return PagedBatch(
        cache=cache.to(device),
        block_tables=tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_seq_len=max(seq_lens),
    )
