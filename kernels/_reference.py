"""Shared piece of the kernels' torch references: one sequence's keys and values read back
from the paged cache."""

from __future__ import annotations

import torch


def gather_sequence_kv(
    layer_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the first ``seq_len`` tokens of one sequence, float32.

    Args:
        layer_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``.
        block_table: the sequence's block ids (at least ``ceil(seq_len / block_size)``).
        seq_len: tokens to read.
        group: query heads per KV head; each KV head is repeated ``group`` times.

    Returns:
        ``(k, v)``, each ``[num_kv_heads * group, seq_len, head_dim]``.
    """
    _, _, block_size, num_kv_heads, head_dim = layer_cache.shape
    blocks = block_table[: -(-seq_len // block_size)].long()
    k = layer_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
    v = layer_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
    return k.repeat_interleave(group, dim=1).transpose(0, 1), v.repeat_interleave(group, dim=1).transpose(
        0, 1
    )
