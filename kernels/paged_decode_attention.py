"""Paged decode attention for grouped-query attention, split along the context.

One query token per sequence attends over that sequence's keys and values in
one layer of the ``"LKBTHD"`` paged cache (see :mod:`engine.attention`).

Pass 1, grid ``(num_seqs, num_kv_heads, num_splits)``: one program owns one KV
head of one sequence and one partition of its context. It loads the ``group = num_heads / num_kv_heads`` query heads that
share that KV head as one tile padded to at least 16 rows, so ``QK^T`` and
``PV`` run as ``tl.dot`` on tensor cores and each key/value is read once for
the whole group. Tiles of ``BLOCK_N`` tokens are gathered through the block
table and combined with the online softmax of FlashAttention (Dao et al.,
2022, arXiv:2205.14135), accumulating in float32 (scores in the base-2
domain, as in FlashAttention-2's Triton tutorial).

Pass 2, grid ``(num_seqs, num_heads)``: when there is more than one split, the
partial outputs are merged with their log-sum-exp weights (the split-K
"flash-decoding" scheme, Dao et al., 2023, "Flash-Decoding for long-context
inference"). With one split pass 1 writes the output directly.

Split policy: the number of splits ``S`` is fixed on the host from the batch
shape alone (enough programs to fill the GPU), and each sequence's context is
cut on the device into ``S`` partitions of ``ceil(seq_len / S)`` tokens rounded
up to :data:`BLOCK_N`. So the work follows the actual context lengths: a CUDA
graph captured once serves every context without empty programs over a
``max_model_len`` bound (which cost about 10 % of bandwidth at 1k context),
and the graph and eager paths use the same partitions. Partitions past the
end of a short context (fewer than ``S`` tiles) do nothing and store nothing;
pass 2 reads only the partitions that hold tokens. Sequences with
``seq_len == 0`` (padding rows) produce zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_query_for_cache, check_shape, check_tensor, next_power_of_2
from kernels._reference import gather_sequence_kv

_LOG2E = 1.4426950408889634
#: Context tokens per inner tile.
BLOCK_N = 64
_MIN_GROUP_ROWS = 16


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    qk_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cache_kv,
    stride_cache_block,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    partition = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * partition
    end = tl.minimum(start + partition, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = cache_ptr + kvh * HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block_ids = tl.load(block_tables_ptr + b * stride_bt + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        rows = block_ids.to(tl.int64) * stride_cache_block + (offs_n % BLOCK_SIZE) * (NUM_KV_HEADS * HEAD_DIM)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(k_base + stride_cache_kv + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        live = start < seq_len  # pass 2 never reads an empty partition
        row = (b * (NUM_KV_HEADS * GROUP) + heads) * num_splits + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask & live)
        tl.store(part_m_ptr + row, m_i, mask=g_mask & live)
        tl.store(part_l_ptr + row, l_i, mask=g_mask & live)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )


@triton.jit
def _reduce_splits_kernel(
    seq_lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    num_splits,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    partition = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    valid = tl.cdiv(seq_len, tl.maximum(partition, 1))
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < valid
    row = (b * NUM_HEADS + h) * num_splits + s
    m = tl.load(part_m_ptr + row, mask=s_mask, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    w = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    l_sum = tl.sum(tl.load(part_l_ptr + row, mask=s_mask, other=0.0) * w, axis=0)
    acc = tl.load(
        part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
        mask=s_mask[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(l_sum > 0, l_sum, 1.0)
    out = tl.where(valid > 0, out, 0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


#: Pass-1 programs (sequences x KV heads x splits) the split policy aims for: 1024
#: (2 splits at batch 64 with 8 KV heads) was best or tied at 1k and 8k context in
#: ``python -m bench.kernels --sweep`` on an H200.
TARGET_PROGRAMS = 1024
#: Most splits per sequence.
MAX_SPLITS = 32


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Context splits per sequence: the power of two giving about :data:`TARGET_PROGRAMS`
    programs, capped at :data:`MAX_SPLITS` and at the number of :data:`BLOCK_N`-token
    tiles in ``max_seq_len``.

    Depends on host values only, so a captured graph keeps its grid; the
    partitions themselves follow the device-side ``seq_lens``.
    """
    wanted = next_power_of_2(max(1, -(-TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads))))
    return max(1, min(wanted, MAX_SPLITS, -(-max_seq_len // BLOCK_N)))


def paged_decode_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged context.

    Args:
        q: ``[B, num_heads, head_dim]`` float32/bfloat16/float16, unit stride on the last axis.
        layer_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (one layer
            of the ``"LKBTHD"`` cache), contiguous within a block; ``num_heads`` must be
            a multiple of ``num_kv_heads``.
        block_tables: int32 ``[B, max_blocks]`` block ids, row stride free.
        seq_lens: int32 ``[B]`` context lengths in tokens (the new token included;
            ``0`` for padding rows, whose output is zero).
        scale: softmax scale (usually ``head_dim ** -0.5``).
        max_seq_len: host-side upper bound on ``seq_lens`` (tokens), at most the
            block tables' capacity; caps the number of splits (see
            :func:`decode_num_splits`). A CUDA graph passes ``max_model_len``.
        out: optional ``[B, num_heads, head_dim]`` output buffer in ``q``'s dtype.
        num_splits: context splits per sequence (default :func:`decode_num_splits`).

    Returns:
        ``out`` (or a new tensor) ``[B, num_heads, head_dim]`` in ``q``'s dtype.

    Raises:
        ValueError: shapes, dtypes, devices or strides do not match.
    """
    check_query_for_cache(q, layer_cache, rows="B")
    _, _, block_size, num_kv_heads, head_dim = layer_cache.shape
    num_seqs, num_heads, _ = q.shape
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=q.device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=q.device)
    check_shape("seq_lens", seq_lens, (num_seqs,))
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must have {num_seqs} rows, got shape {tuple(block_tables.shape)}")
    if max_seq_len > block_tables.shape[1] * block_size:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds block_tables capacity "
            f"{block_tables.shape[1]} blocks x {block_size} tokens"
        )
    if out is None:
        out = torch.empty_like(q)
    else:
        check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=q.device)
        check_shape("out", out, tuple(q.shape))
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_seq_len)
    elif num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16 on GPUs
    if num_splits > 1:
        part_acc = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_m = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        layer_cache,
        block_tables,
        seq_lens,
        out,
        part_acc,
        part_m,
        part_l,
        scale * _LOG2E,
        num_splits,
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
        GROUP=group,
        BLOCK_G=max(_MIN_GROUP_ROWS, next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=BLOCK_N,
        SPLIT=num_splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=2,
    )
    if num_splits > 1:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            seq_lens,
            out,
            part_acc,
            part_m,
            part_l,
            num_splits,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_S=next_power_of_2(num_splits),
            BLOCK_D=block_d,
            BLOCK_N=BLOCK_N,
            num_warps=4,
        )
    return out


def paged_decode_attention_reference(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch reference of :func:`paged_decode_attention` (float32 math, one sequence at a time)."""
    group = q.shape[1] // layer_cache.shape[3]
    out = torch.zeros_like(q)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k, v = gather_sequence_kv(layer_cache, block_tables[i], seq_len, group)  # [H, S, D]
        scores = torch.einsum("hd,hsd->hs", q[i].float(), k) * scale
        out[i] = torch.einsum("hs,hsd->hd", scores.softmax(-1), v).to(q.dtype)
    return out
