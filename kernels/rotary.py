"""Rotary position embedding applied to queries and keys in place.

RoPE (Su et al., 2021, arXiv:2104.09864) in the Llama "rotate half" convention:
dimension ``i`` pairs with ``i + head_dim / 2``; for angle ``a`` the pair
``(x1, x2)`` becomes ``(x1 cos a - x2 sin a, x2 cos a + x1 sin a)``. The angles
come from the float32 cos/sin tables of :class:`engine.models.rope.RotaryEmbedding`
(``[max_position, head_dim]``, the two halves equal), so every scaling it
supports (plain, linear, Llama 3) applies unchanged. Computed in float32 and
rounded to the input dtype. One program per token rotates all its heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_shape, check_tensor, next_power_of_2


@triton.jit
def _rotate(
    x_ptr,
    stride_t,
    stride_h,
    t,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (d < HALF)
    ptr1 = x_ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    tl.store(ptr1, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_table,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + pos * stride_table + d, mask=d < HALF, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_table + d, mask=d < HALF, other=0.0)
    _rotate(q_ptr, stride_qt, stride_qh, t, cos, sin, NUM_HEADS, HALF, BLOCK_H, BLOCK_HALF)
    _rotate(k_ptr, stride_kt, stride_kh, t, cos, sin, NUM_KV_HEADS, HALF, BLOCK_KV, BLOCK_HALF)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate ``q`` and ``k`` in place by their tokens' positions.

    Args:
        positions: int64 (or int32) ``[T]``, each ``< max_position``.
        q: ``[T, num_heads, head_dim]`` float32/bfloat16/float16, unit stride on
            the last axis (views into a fused qkv output are fine).
        k: ``[T, num_kv_heads, head_dim]``, same dtype.
        cos, sin: float32 ``[max_position, head_dim]`` tables, halves equal.

    Raises:
        ValueError: shapes, dtypes, devices or strides do not match, or ``head_dim`` is odd.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    num_tokens, num_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device)
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k must have shape ({num_tokens}, num_kv_heads, {head_dim}), got {tuple(k.shape)}")
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int64, torch.int32), device=q.device)
    check_shape("positions", positions, (num_tokens,))
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table, ndim=2, dtypes=(torch.float32,), device=q.device)
        if table.shape[1] != head_dim:
            raise ValueError(f"{name} must have shape (max_position, {head_dim}), got {tuple(table.shape)}")
    if cos.stride() != sin.stride():
        raise ValueError(f"cos and sin must share strides, got {cos.stride()} and {sin.stride()}")
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        positions,
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=k.shape[1],
        HALF=head_dim // 2,
        BLOCK_H=next_power_of_2(num_heads),
        BLOCK_KV=next_power_of_2(k.shape[1]),
        BLOCK_HALF=next_power_of_2(head_dim // 2),
    )


def rotary_embedding_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Torch reference of :func:`rotary_embedding` (same arguments, in place)."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    for x in (q, k):
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        x.copy_(x32 * c + torch.cat((-x2, x1), dim=-1) * s)
