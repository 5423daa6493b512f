"""Paged KV writes and the torch attention backend against dense causal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import (
    AttentionMetadata,
    KvCacheSpec,
    get_attention_backend,
    write_kv,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 12


def test_metadata_slots_follow_block_tables() -> None:
    meta = AttentionMetadata.build([0, 6], [5, 1], [[7, 2], [3, 9, 11]], BLOCK_SIZE, "cpu")
    # seq 0 positions 0..4 -> blocks 7 (0..3) and 2 (4); seq 1 position 6 -> block 9, offset 2
    assert meta.slot_mapping.tolist() == [28, 29, 30, 31, 8, 38]
    assert meta.query_start_loc.tolist() == [0, 5, 6]
    assert meta.seq_lens.tolist() == [5, 7]
    assert meta.num_computed_tokens.tolist() == [0, 6]
    assert meta.block_tables.tolist() == [[7, 2], [3, 9]]
    assert meta.block_tables.dtype == torch.int32
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs) == (5, 7, 2)


def test_metadata_rejects_short_block_table() -> None:
    with pytest.raises(ValueError, match="needs 2 blocks"):
        AttentionMetadata.build([3], [2], [[1]], BLOCK_SIZE, "cpu")


def test_write_kv_fills_exact_slots() -> None:
    cache = KvCacheSpec(1, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, "float32").allocate("cpu")[0]
    k = torch.arange(3 * NUM_KV_HEADS * HEAD_DIM, dtype=torch.float32).view(3, NUM_KV_HEADS, HEAD_DIM)
    write_kv(cache, k, -k, torch.tensor([5, 40, 47]))
    assert torch.equal(cache[0, 1, 1], k[0])  # slot 5 = block 1, offset 1
    assert torch.equal(cache[1, 10, 0], -k[1])  # slot 40 = block 10, offset 0
    assert torch.equal(cache[0, 11, 3], k[2])
    assert int((cache != 0).sum()) == 2 * (3 * NUM_KV_HEADS * HEAD_DIM - 1)  # k[0] has one zero


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA of the last q.shape[0] positions; q [Q, H, D], k/v [S, KVH, D]."""
    group = NUM_HEADS // NUM_KV_HEADS
    seq_len, num_queries = k.shape[0], q.shape[0]
    mask = torch.ones(num_queries, seq_len, dtype=torch.bool).tril(diagonal=seq_len - num_queries)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(group, dim=1).transpose(0, 1),
        v.repeat_interleave(group, dim=1).transpose(0, 1),
        attn_mask=mask,
    )
    return out.transpose(0, 1)


def test_torch_backend_matches_dense_attention_on_mixed_batch() -> None:
    """A fresh prefill, a prefill after a 5-token cached prefix, and a decode, in one batch."""
    gen = torch.Generator().manual_seed(0)
    computed, query_lens = [0, 5, 9], [7, 4, 1]
    tables = [[11, 0], [4, 8, 1], [2, 10, 6]]
    seq_lens = [c + n for c, n in zip(computed, query_lens, strict=True)]
    keys = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) for n in seq_lens]
    values = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) for n in seq_lens]
    queries = [torch.randn(n, NUM_HEADS, HEAD_DIM, generator=gen) for n in query_lens]
    cache = KvCacheSpec(1, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, "float32").allocate("cpu")[0]
    prefix = AttentionMetadata.build([0, 0], [5, 9], [tables[1], tables[2]], BLOCK_SIZE, "cpu")
    write_kv(
        cache,
        torch.cat([keys[1][:5], keys[2][:9]]),
        torch.cat([values[1][:5], values[2][:9]]),
        prefix.slot_mapping,
    )

    meta = AttentionMetadata.build(computed, query_lens, tables, BLOCK_SIZE, "cpu")
    backend = get_attention_backend("torch")
    new_k = torch.cat([k[c:] for k, c in zip(keys, computed, strict=True)])
    new_v = torch.cat([v[c:] for v, c in zip(values, computed, strict=True)])
    backend.write_kv(cache, new_k, new_v, meta)
    out = backend.forward(torch.cat(queries), cache, meta, scale=HEAD_DIM**-0.5)

    expected = torch.cat([dense_reference(q, k, v) for q, k, v in zip(queries, keys, values, strict=True)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_unknown_backend_lists_registered_ones() -> None:
    with pytest.raises(ValueError, match="registered: torch"):
        get_attention_backend("flash")


def test_kv_cache_spec_geometry() -> None:
    spec = KvCacheSpec(3, 10, 16, 2, 64, "bfloat16")
    assert spec.shape == (3, 2, 10, 16, 2, 64)
    assert spec.bytes_per_block == 3 * 2 * 16 * 2 * 64 * 2
    assert spec.layout == "LKBTHD"
