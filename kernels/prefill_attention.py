"""Causal attention over a variable-length batch that reads its context from the paged cache.

The batch is flattened as in :mod:`engine.attention`: sequence ``i`` owns query
rows ``query_start_loc[i]:query_start_loc[i + 1]`` and has ``seq_lens[i]``
tokens of context after this step, of which the last ``q_len`` are its new
tokens (already written to the cache) and the first ``seq_lens[i] - q_len`` an
already cached prefix. Query ``j`` (absolute position ``seq_len - q_len + j``)
sees keys ``0 .. seq_len - q_len + j``. Keys and values of prefix and new
tokens are all read from one layer of the ``"LKBTHD"`` cache through the block
table, so a chunked prefill or a prefix-cache hit needs no extra copy; decode
rows (``q_len = 1``) may share the batch.

Grid ``(ceil(max_query_len / BLOCK_M), num_seqs, num_heads)``; each program
streams ``BLOCK_N``-token tiles of keys and values with the online softmax of
FlashAttention-2 (Dao, 2023, arXiv:2307.08691), accumulating in float32, and
stops at the causal diagonal of its last query row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_query_for_cache, check_shape, check_tensor, next_power_of_2
from kernels._reference import gather_sequence_kv

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_kv,
    stride_cache_block,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    context = seq_len - q_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(cache_ptr.dtype.element_ty)
    q_pos = context + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Past the last query of the batch tile nothing is visible; rows beyond q_len are discarded.
    end = tl.minimum(seq_len, context + (m_block + 1) * BLOCK_M)
    end = tl.where(m_block * BLOCK_M < q_len, end, 0)
    k_base = cache_ptr + kvh * HEAD_DIM
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        block_ids = tl.load(block_tables_ptr + b * stride_bt + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        slots = block_ids.to(tl.int64) * stride_cache_block + (offs_n % BLOCK_SIZE) * (
            NUM_KV_HEADS * HEAD_DIM
        )
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + slots[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(k_base + stride_cache_kv + slots[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def prefill_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a flattened variable-length batch over its paged context.

    Args:
        q: ``[T, num_heads, head_dim]`` float32/bfloat16/float16, unit stride on the last axis.
        layer_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, holding
            every sequence's cached prefix and this step's new keys/values.
        block_tables: int32 ``[B, max_blocks]``.
        seq_lens: int32 ``[B]``, context after this step (tokens).
        query_start_loc: int32 ``[B + 1]``, row offsets into ``q`` (``query_start_loc[B] == T``).
        scale: softmax scale.
        max_query_len: host-side longest ``q_len`` in the batch (tokens), at least the true one.
        out: optional ``[T, num_heads, head_dim]`` output buffer in ``q``'s dtype.

    Returns:
        ``out`` (or a new tensor) ``[T, num_heads, head_dim]`` in ``q``'s dtype.

    Raises:
        ValueError: shapes, dtypes, devices or strides do not match.
    """
    check_query_for_cache(q, layer_cache, rows="T")
    _, _, block_size, num_kv_heads, head_dim = layer_cache.shape
    num_tokens, num_heads, _ = q.shape
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=q.device)
    num_seqs = seq_lens.shape[0]
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=q.device)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must have {num_seqs} rows, got shape {tuple(block_tables.shape)}")
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=(torch.int32,), device=q.device)
    check_shape("query_start_loc", query_start_loc, (num_seqs + 1,))
    if out is None:
        out = torch.empty_like(q)
    else:
        check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=q.device)
        check_shape("out", out, tuple(q.shape))
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m = 64 if max_query_len > 16 else 16
    block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16 on GPUs
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        layer_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        layer_cache.stride(0),
        layer_cache.stride(1),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        GROUP=num_heads // num_kv_heads,
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if block_d <= 64 else 8,
        num_stages=2,
    )
    return out


def prefill_attention_reference(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch reference of :func:`prefill_attention` (float32 math, one sequence at a time)."""
    group = q.shape[1] // layer_cache.shape[3]
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        rows = slice(starts[i], starts[i + 1])
        q_len = starts[i + 1] - starts[i]
        k, v = gather_sequence_kv(layer_cache, block_tables[i], seq_len, group)  # [H, S, D]
        scores = torch.einsum("qhd,hsd->hqs", q[rows].float(), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(seq_len, device=q.device)[None, :] > q_pos, float("-inf"))
        out[rows] = torch.einsum("hqs,hsd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
