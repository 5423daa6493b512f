"""Argument checks shared by the kernel launchers.

Every launcher validates what the kernel assumes (device, dtype, rank, sizes,
unit stride of the last axis) and raises :class:`ValueError` naming the
argument, so a bad call fails in Python instead of reading out of bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Floating dtypes every kernel accepts for activations and the KV cache.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype],
    device: torch.device | None = None,
    last_contiguous: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``t`` has rank ``ndim``, a dtype in ``dtypes``,
    lives on ``device`` (when given) and has unit stride on its last axis."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {allowed}, got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if last_contiguous and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride on its last axis, got strides {t.stride()}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``t.shape == expected``."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every tensor has the first one's dtype."""
    first = tensors[0].dtype
    for name, t in zip(names, tensors, strict=True):
        if t.dtype != first:
            raise ValueError(f"{names[0]} and {name} must share a dtype, got {first} and {t.dtype}")


def check_paged_cache(layer_cache: torch.Tensor, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``layer_cache`` is one layer of an ``"LKBTHD"`` cache:
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` with contiguous inner three axes."""
    check_tensor("layer_cache", layer_cache, ndim=5, dtypes=FLOAT_DTYPES, device=device)
    if layer_cache.shape[0] != 2:
        raise ValueError(f"layer_cache axis 0 must be 2 (keys, values), got {layer_cache.shape[0]}")
    _, _, _, num_kv_heads, head_dim = layer_cache.shape
    if layer_cache.stride(3) != head_dim or layer_cache.stride(2) != num_kv_heads * head_dim:
        raise ValueError(f"layer_cache must be contiguous within a block, got strides {layer_cache.stride()}")


def check_query_for_cache(q: torch.Tensor, layer_cache: torch.Tensor, rows: str) -> None:
    """Raise ``ValueError`` unless ``layer_cache`` is a paged cache layer (see
    :func:`check_paged_cache`) and ``q`` is ``[rows, k * num_kv_heads, head_dim]`` on its
    device, in a float dtype (grouped-query attention: ``k`` query heads per KV head).
    ``rows`` names the first axis in the message (``"B"`` or ``"T"``)."""
    check_paged_cache(layer_cache, q.device)
    _, _, _, num_kv_heads, head_dim = layer_cache.shape
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=layer_cache.device)
    if q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(
            f"q must be [{rows}, k * {num_kv_heads}, {head_dim}] for this cache, got shape {tuple(q.shape)}"
        )


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << max(0, (n - 1).bit_length())
