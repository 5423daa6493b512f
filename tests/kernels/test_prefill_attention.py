"""kernels.prefill_attention against its torch reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels.prefill_attention import prefill_attention, prefill_attention_reference
from tests.kernels.conftest import tolerance
from tests.kernels.paged import random_paged_batch

CASES = [
    # cached prefix per sequence, new tokens per sequence, num_heads, num_kv_heads, head_dim, block_size
    ([0], [1], 1, 1, 8, 4),  # single-token prompt
    ([0, 5, 0], [7, 3, 1], 4, 2, 32, 4),  # partial blocks, a prefix hit, a decode row mixed in
    ([40, 0], [70, 19], 8, 1, 16, 16),  # query tiles past 64 rows after a prefix, MQA
    ([13], [21], 6, 3, 24, 8),  # odd lengths, head_dim not a power of two
]


@pytest.mark.parametrize(
    ("context", "query_lens", "num_heads", "num_kv_heads", "head_dim", "block_size"), CASES
)
@pytest.mark.parametrize("low_precision", [False, True])
def test_prefill_matches_reference(
    device: str,
    context: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    low_precision: bool,
    half_dtype: torch.dtype,
) -> None:
    dtype = half_dtype if low_precision else torch.float32
    seq_lens = [c + q for c, q in zip(context, query_lens, strict=True)]
    batch = random_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device, seed=sum(seq_lens)
    )
    starts = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(len(seq_lens))
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype).to(device)
    scale = head_dim**-0.5
    out = prefill_attention(
        q, batch.cache, batch.block_tables, batch.seq_lens, starts, scale, max(query_lens)
    )
    expected = prefill_attention_reference(q, batch.cache, batch.block_tables, batch.seq_lens, starts, scale)
    torch.testing.assert_close(out, expected, **tolerance(dtype))


def test_prefill_rejects_bad_query_start_loc(device: str) -> None:
    batch = random_paged_batch([4, 4], 2, 8, 4, torch.float32, device, seed=0)
    q = torch.zeros(8, 4, 8, device=device)
    starts = torch.tensor([0, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="query_start_loc must have shape"):
        prefill_attention(q, batch.cache, batch.block_tables, batch.seq_lens, starts, 1.0, 4)
