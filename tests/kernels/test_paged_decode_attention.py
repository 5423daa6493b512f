"""kernels.paged_decode_attention against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_decode_attention import (
    decode_num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from tests.kernels.conftest import tolerance
from tests.kernels.paged import random_paged_batch

CASES = [
    # seq_lens, num_heads, num_kv_heads, head_dim, block_size
    ([1], 1, 1, 8, 4),  # single-token context, MHA
    ([5, 17, 3], 4, 2, 32, 4),  # partially filled last blocks, GQA 2
    ([300, 1, 129], 8, 2, 16, 16),  # several splits (5: one per 64-token tile) and a one-token row
    ([70, 45], 12, 3, 24, 8),  # GQA 4, head_dim not a power of two
    ([33], 8, 1, 16, 16),  # multi-query (GQA 8)
]


@pytest.mark.parametrize(("seq_lens", "num_heads", "num_kv_heads", "head_dim", "block_size"), CASES)
@pytest.mark.parametrize("low_precision", [False, True])
def test_decode_matches_reference(
    device: str,
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    low_precision: bool,
    half_dtype: torch.dtype,
) -> None:
    dtype = half_dtype if low_precision else torch.float32
    batch = random_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device, seed=sum(seq_lens)
    )
    gen = torch.Generator().manual_seed(len(seq_lens))
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype).to(device)
    scale = head_dim**-0.5
    out = paged_decode_attention(q, batch.cache, batch.block_tables, batch.seq_lens, scale, batch.max_seq_len)
    expected = paged_decode_attention_reference(q, batch.cache, batch.block_tables, batch.seq_lens, scale)
    torch.testing.assert_close(out, expected, **tolerance(dtype))


def test_decode_with_loose_bound_and_padding_rows(device: str) -> None:
    """A CUDA graph passes max_model_len as the bound and pads with seq_len 0 rows."""
    seq_lens = [9, 0, 200]
    batch = random_paged_batch(seq_lens, 2, 16, 8, torch.float32, device, seed=3, extra_table_blocks=40)
    bound = batch.block_tables.shape[1] * 8
    assert decode_num_splits(3, 2, bound) == 9  # one per tile of the bound: short rows leave most empty
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0)).to(device)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, batch.cache, batch.block_tables, batch.seq_lens, 0.25, bound, out=out)
    expected = paged_decode_attention_reference(q, batch.cache, batch.block_tables, batch.seq_lens, 0.25)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_partitions_follow_seq_lens(device: str, num_splits: int) -> None:
    """Each context is cut into num_splits partitions of ceil(len / splits) tokens rounded
    up to 64: 200 tokens in 8 splits leave 4 empty; 64 and 65 tokens hit tile edges."""
    seq_lens = [200, 64, 65, 1, 0]
    batch = random_paged_batch(seq_lens, 2, 16, 16, torch.float32, device, seed=num_splits)
    q = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(num_splits)).to(device)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(
        q,
        batch.cache,
        batch.block_tables,
        batch.seq_lens,
        0.25,
        batch.max_seq_len,
        out=out,
        num_splits=num_splits,
    )
    expected = paged_decode_attention_reference(q, batch.cache, batch.block_tables, batch.seq_lens, 0.25)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))
    assert torch.equal(out[4], torch.zeros_like(out[4]))


def test_decode_num_splits_policy() -> None:
    assert decode_num_splits(64, 8, 8192) == 2  # 1024 programs
    assert decode_num_splits(1, 8, 100) == 2  # one split per 64-token tile of the bound
    assert decode_num_splits(1, 8, 8192) == 32  # capped at MAX_SPLITS
    assert decode_num_splits(128, 8, 8192) == 1


def test_decode_rejects_bad_arguments(device: str) -> None:
    batch = random_paged_batch([4, 4], 2, 8, 4, torch.float32, device, seed=0)
    q = torch.zeros(2, 3, 8, device=device)
    with pytest.raises(ValueError, match="q must be"):
        paged_decode_attention(q, batch.cache, batch.block_tables, batch.seq_lens, 1.0, 4)
    q = torch.zeros(2, 4, 8, device=device)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_decode_attention(q, batch.cache, batch.block_tables.long(), batch.seq_lens, 1.0, 4)
    with pytest.raises(ValueError, match="exceeds block_tables capacity"):
        paged_decode_attention(q, batch.cache, batch.block_tables, batch.seq_lens, 1.0, 5)
    with pytest.raises(ValueError, match="layer_cache must be contiguous within a block"):
        paged_decode_attention(q, batch.cache[:, :, :, :1], batch.block_tables, batch.seq_lens, 1.0, 4)
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        paged_decode_attention(q, batch.cache, batch.block_tables, batch.seq_lens, 1.0, 4, num_splits=0)
