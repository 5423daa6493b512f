"""Write new keys and values into a paged KV cache by slot mapping.

Token ``t`` goes to slot ``slot_mapping[t]`` = ``block_id * block_size + offset``
of one layer of the ``"LKBTHD"`` cache (see :mod:`engine.attention`). A negative
slot skips the token: padded rows of a CUDA-graph batch write nothing.
One program copies one token's ``[num_kv_heads, head_dim]`` keys and values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_paged_cache, check_shape, check_tensor, next_power_of_2


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_kv,
    stride_cache_block,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        dst = cache_ptr + block * stride_cache_block + offset * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_cache_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Copy ``T`` tokens' keys and values into their cache slots (in place).

    Args:
        layer_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, float32,
            bfloat16 or float16, contiguous within a block.
        k, v: ``[T, num_kv_heads, head_dim]`` (any float dtype, cast to the cache
            dtype; unit stride on the last axis, e.g. views into a fused qkv output).
        slot_mapping: int64 (or int32) ``[T]``; ``-1`` skips the token.

    Raises:
        ValueError: shapes, dtypes, devices or strides do not match.
    """
    check_paged_cache(layer_cache, layer_cache.device)
    _, _, block_size, num_kv_heads, head_dim = layer_cache.shape
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, device=layer_cache.device)
    num_tokens = k.shape[0]
    check_shape("k", k, (num_tokens, num_kv_heads, head_dim))
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=layer_cache.device)
    check_shape("v", v, (num_tokens, num_kv_heads, head_dim))
    check_tensor(
        "slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64, torch.int32), device=layer_cache.device
    )
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        layer_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        layer_cache.stride(0),
        layer_cache.stride(1),
        BLOCK_SIZE=block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(num_kv_heads),
        BLOCK_D=next_power_of_2(head_dim),
    )


def write_kv_reference(
    layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Torch reference of :func:`write_kv` (same arguments; negative slots skipped)."""
    num_kv_heads, head_dim = layer_cache.shape[-2:]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    layer_cache[0].view(-1, num_kv_heads, head_dim)[slots] = k[keep].to(layer_cache.dtype)
    layer_cache[1].view(-1, num_kv_heads, head_dim)[slots] = v[keep].to(layer_cache.dtype)
