"""Reference gather/scatter of KV blocks and the byte views that cross processes."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.blocks import from_bytes, gather_blocks, scatter_blocks, to_cpu_bytes


def numbered_cache(
    num_layers: int = 2, num_blocks: int = 5, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[L, 2, N, 2, 1, 3]`` whose every element is distinct (its flat index)."""
    return (
        torch.arange(num_layers * 2 * num_blocks * 6, dtype=torch.float32)
        .reshape(num_layers, 2, num_blocks, 2, 1, 3)
        .to(dtype)
    )


def test_gather_copies_blocks_in_order_for_a_layer_range() -> None:
    cache = numbered_cache(num_layers=3)
    data = gather_blocks(cache, [4, 0, 4], layer_start=1, layer_end=3)
    assert data.shape == (2, 2, 3, 2, 1, 3)
    assert data.is_contiguous()
    assert torch.equal(data[:, :, 0], cache[1:3, :, 4])
    assert torch.equal(data[:, :, 1], cache[1:3, :, 0])
    assert torch.equal(data[:, :, 2], cache[1:3, :, 4])
    assert data[0, 1, 1, 0, 0, 0].item() == cache[1, 1, 0, 0, 0, 0].item() == 90.0
    data.zero_()
    assert cache.any()  # a copy, not a view


def test_scatter_writes_only_the_given_blocks_and_layers() -> None:
    src = numbered_cache(num_layers=3)
    dst = torch.zeros_like(src)
    scatter_blocks(dst, [3, 1], gather_blocks(src, [0, 2], layer_start=2), layer_start=2)
    assert torch.equal(dst[2, :, 3], src[2, :, 0])
    assert torch.equal(dst[2, :, 1], src[2, :, 2])
    assert not dst[:2].any()
    assert not dst[2][:, [0, 2, 4]].any()


def test_shape_dtype_and_id_errors_are_clear() -> None:
    cache = numbered_cache()
    with pytest.raises(ValueError, match=r"block ids \[5, -1\] are outside \[0, 5\)"):
        gather_blocks(cache, [0, 5, -1])
    with pytest.raises(ValueError, match=r"layer range \[1, 1\) is not inside \[0, 2\)"):
        gather_blocks(cache, [0], layer_start=1, layer_end=1)
    with pytest.raises(ValueError, match="block_ids is empty"):
        gather_blocks(cache, [])
    with pytest.raises(ValueError, match=r"kv_cache must be .* got \[2, 5, 2, 1, 3\]"):
        gather_blocks(cache[:, 0], [0])
    data = gather_blocks(cache, [0, 1])
    with pytest.raises(ValueError, match=r"repeated destination block ids \[2, 2\]"):
        scatter_blocks(cache, [2, 2], data)
    with pytest.raises(ValueError, match=r"data shape \[2, 2, 2, 2, 1, 3\] != expected \[2, 2, 3, 2, 1, 3\]"):
        scatter_blocks(cache, [2, 3, 4], data)
    with pytest.raises(ValueError, match=r"data dtype torch\.bfloat16 != kv_cache dtype torch\.float32"):
        scatter_blocks(cache, [2, 3], data.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_round_trip_is_exact(dtype: torch.dtype) -> None:
    data = gather_blocks(numbered_cache(dtype=dtype), [1, 3])
    payload = to_cpu_bytes(data)
    assert len(payload) == data.numel() * data.element_size()
    back = from_bytes(bytearray(payload), str(dtype).removeprefix("torch."), data.shape)
    assert back.dtype == dtype
    assert torch.equal(back, data)


def test_bfloat16_bytes_are_little_endian_as_in_memory() -> None:
    one = torch.tensor([1.0], dtype=torch.bfloat16)  # bfloat16 1.0 = 0x3F80
    assert bytes(to_cpu_bytes(one)) == b"\x80\x3f"


def test_from_bytes_refuses_a_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"6 bytes cannot hold \[2, 2\] float32 \(16 bytes\)"):
        from_bytes(bytearray(6), "float32", [2, 2])
