"""Gather and scatter paged KV blocks: the torch reference (Triton kernels later, behind this seam).

The cache is one tensor ``kv_cache: [num_layers, 2, num_blocks, block_size,
num_kv_heads, head_dim]`` ("LKBTHD"). A transfer carries a contiguous tensor
``[n_layers, 2, n_blocks, block_size, num_kv_heads, head_dim]`` holding the blocks
``block_ids`` (in that order) of layers ``[layer_start, layer_end)``, and crosses a
process boundary as its raw little-endian bytes (:func:`to_cpu_bytes`,
:func:`from_bytes`); nothing is pickled.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch


def gather_blocks(
    kv_cache: torch.Tensor,
    block_ids: Sequence[int],
    layer_start: int = 0,
    layer_end: int | None = None,
) -> torch.Tensor:
    """Copy blocks ``block_ids`` of layers ``[layer_start, layer_end)`` out of ``kv_cache``.

    Args:
        kv_cache: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``, any dtype/device.
        block_ids: block ids to copy, in order (repeats allowed).
        layer_start: first layer (inclusive).
        layer_end: last layer (exclusive); ``None`` means ``num_layers``.

    Returns:
        A new contiguous tensor ``[layer_end - layer_start, 2, len(block_ids), block_size,
        num_kv_heads, head_dim]`` on ``kv_cache``'s device and dtype.

    Raises:
        ValueError: bad cache rank, layer range or block id.
    """
    layer_end = _check_range(kv_cache, block_ids, layer_start, layer_end)
    index = torch.as_tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
    return kv_cache[layer_start:layer_end].index_select(2, index).contiguous()


def scatter_blocks(
    kv_cache: torch.Tensor,
    block_ids: Sequence[int],
    data: torch.Tensor,
    layer_start: int = 0,
    layer_end: int | None = None,
) -> None:
    """Write ``data`` into blocks ``block_ids`` of layers ``[layer_start, layer_end)`` of ``kv_cache``, in place.

    Args:
        kv_cache: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.
        block_ids: destination block ids, distinct, in the order of ``data``'s block dim.
        data: ``[layer_end - layer_start, 2, len(block_ids), block_size, num_kv_heads, head_dim]``
            of ``kv_cache``'s dtype, on any device (copied to ``kv_cache``'s device).
        layer_start: first layer (inclusive).
        layer_end: last layer (exclusive); ``None`` means ``num_layers``.

    Raises:
        ValueError: bad cache rank, layer range, block id (out of range or repeated),
            ``data`` shape or dtype.
    """
    layer_end = _check_range(kv_cache, block_ids, layer_start, layer_end)
    if len(set(block_ids)) != len(block_ids):
        raise ValueError(f"scatter_blocks: repeated destination block ids {list(block_ids)}")
    expected = [layer_end - layer_start, 2, len(block_ids), *kv_cache.shape[3:]]
    if list(data.shape) != expected:
        raise ValueError(f"scatter_blocks: data shape {list(data.shape)} != expected {expected}")
    if data.dtype != kv_cache.dtype:
        raise ValueError(f"scatter_blocks: data dtype {data.dtype} != kv_cache dtype {kv_cache.dtype}")
    index = torch.as_tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
    kv_cache[layer_start:layer_end].index_copy_(2, index, data.to(kv_cache.device))


def to_cpu_bytes(data: torch.Tensor) -> memoryview:
    """The raw bytes of ``data`` (made contiguous and copied to CPU if needed) as a writable byte view.

    Works for every dtype, bfloat16 included (viewed as uint8 before leaving torch).
    The view shares memory with the CPU tensor; byte order is the host's (little-endian).
    """
    _check_little_endian()
    flat = data.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")


def from_bytes(payload: memoryview | bytearray, dtype_name: str, shape: Sequence[int]) -> torch.Tensor:
    """A CPU tensor of ``shape`` and dtype ``dtype_name`` over ``payload`` without copying.

    ``payload`` must be writable (e.g. a ``bytearray``) and hold exactly the tensor's bytes.

    Raises:
        ValueError: the byte count does not match ``shape`` and dtype.
    """
    _check_little_endian()
    dtype = getattr(torch, dtype_name)
    raw = torch.frombuffer(payload, dtype=torch.uint8)
    expected = torch.Size(shape).numel() * dtype.itemsize
    if raw.numel() != expected:
        raise ValueError(
            f"from_bytes: {raw.numel()} bytes cannot hold {list(shape)} {dtype_name} ({expected} bytes)"
        )
    return raw.view(dtype).reshape(*shape)


def _check_range(
    kv_cache: torch.Tensor, block_ids: Sequence[int], layer_start: int, layer_end: int | None
) -> int:
    """Validate the cache rank, layer range and block ids; returns the resolved ``layer_end``."""
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError(
            "kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {list(kv_cache.shape)}"
        )
    num_layers, num_blocks = kv_cache.shape[0], kv_cache.shape[2]
    end = num_layers if layer_end is None else layer_end
    if not 0 <= layer_start < end <= num_layers:
        raise ValueError(f"layer range [{layer_start}, {end}) is not inside [0, {num_layers})")
    if not block_ids:
        raise ValueError("block_ids is empty")
    bad = [b for b in block_ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"block ids {bad} are outside [0, {num_blocks})")
    return end


def _check_little_endian() -> None:
    """The wire format is little-endian, the in-memory order of every supported host."""
    if sys.byteorder != "little":
        raise RuntimeError("kvtransfer needs a little-endian host")
