"""``kernels.kv_copy``: the Triton block copy against its torch reference (on CPU under
``TRITON_INTERPRET=1``, which tests/conftest.py sets when there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_copy import (
    BLOCK,
    copy_blocks,
    copy_blocks_reference,
    copy_blocks_triton,
)


def cache(
    layers: int, blocks: int, block_size: int, heads: int, dim: int, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((layers, 2, blocks, block_size, heads, dim), generator=gen) + 0.5).to(dtype)


def ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("block_size", "heads", "dim"),
    [
        (4, 2, 4),
        (16, 4, 160),
    ],  # 32 elements (one masked chunk); 10240 elements (three chunks, the last masked)
)
def test_triton_matches_reference_between_caches(
    dtype: torch.dtype, block_size: int, heads: int, dim: int, device: str
) -> None:
    assert block_size * heads * dim <= BLOCK or (block_size * heads * dim) % BLOCK != 0
    src = cache(4, 9, block_size, heads, dim, dtype, seed=1).to(device)
    dst_triton = cache(3, 6, block_size, heads, dim, dtype, seed=2).to(device)
    dst_ref = dst_triton.clone()
    src_ids, dst_ids = ids([7, 2, 2, 8]).to(device), ids([5, 0, 3, 1]).to(device)
    kwargs = {"src_layer_start": 1, "dst_layer_start": 0, "n_layers": 3}
    copy_blocks_triton(src, src_ids, dst_triton, dst_ids, **kwargs)
    copy_blocks_reference(src, src_ids, dst_ref, dst_ids, **kwargs)
    assert torch.equal(dst_triton, dst_ref)
    # exact placement: block 7 of layer 1 landed in block 5 of layer 0, block 4 untouched
    assert torch.equal(dst_triton[0, :, 5], src[1, :, 7])
    assert torch.equal(dst_triton[2, :, 1], src[3, :, 8])
    expected = cache(3, 6, block_size, heads, dim, dtype, seed=2)[:, :, 4].to(device)
    assert torch.equal(dst_triton[:, :, 4], expected)


def test_gather_into_staging_and_scatter_back_round_trips(device: str) -> None:
    src = cache(3, 8, 4, 2, 4, torch.bfloat16, seed=3).to(device)
    staging = torch.zeros((2, 2, 3, 4, 2, 4), dtype=torch.bfloat16, device=device)
    staged, placed = ids([6, 1, 4]).to(device), ids([0, 1, 2]).to(device)
    copy_blocks_triton(src, staged, staging, placed, src_layer_start=1, n_layers=2)
    assert torch.equal(staging, src[1:3][:, :, [6, 1, 4]])
    dst = torch.zeros_like(src)
    copy_blocks_triton(staging, placed, dst, ids([2, 0, 7]).to(device), dst_layer_start=1)
    assert torch.equal(dst[1:3][:, :, [2, 0, 7]], src[1:3][:, :, [6, 1, 4]])
    assert not dst[0].any() and not dst[1:3][:, :, [1, 3, 4, 5, 6]].any()


def test_copy_blocks_dispatches_to_the_reference_on_cpu() -> None:
    src, dst = cache(2, 4, 4, 1, 8, torch.float32, seed=4), torch.zeros((2, 2, 5, 4, 1, 8))
    copy_blocks(src, [3, 0], dst, [4, 2])
    assert torch.equal(dst[:, :, [4, 2]], src[:, :, [3, 0]])
    assert not dst[:, :, [0, 1, 3]].any()


@pytest.mark.parametrize(
    ("src_ids", "dst_ids", "kwargs", "match"),
    [
        ([0, 9], [0, 1], {}, r"src block ids \[9\] are outside \[0, 4\)"),
        ([0, 1], [1, 1], {}, r"repeated destination block ids"),
        ([0], [0, 1], {}, r"1 source block ids for 2 destination block ids"),
        ([0], [0], {"src_layer_start": 1, "n_layers": 2}, r"src layers \[1, 3\) are not inside \[0, 2\)"),
        ([0], [0], {"dst_layer_start": 2, "n_layers": 1}, r"dst layers \[2, 3\) are not inside \[0, 2\)"),
    ],
)
def test_bad_copies_are_refused(
    src_ids: list[int], dst_ids: list[int], kwargs: dict[str, int], match: str
) -> None:
    src, dst = cache(2, 4, 4, 1, 8, torch.float32, seed=5), torch.zeros((2, 2, 4, 4, 1, 8))
    with pytest.raises(ValueError, match=match):
        copy_blocks(src, src_ids, dst, dst_ids, **kwargs)
    assert not dst.any()


def test_mismatched_dtype_or_non_contiguous_is_refused() -> None:
    src = cache(2, 4, 4, 1, 8, torch.float32, seed=6)
    with pytest.raises(ValueError, match="differ in dtype or block shape"):
        copy_blocks(src, [0], torch.zeros((2, 2, 4, 4, 1, 8), dtype=torch.bfloat16), [0])
    strided = torch.zeros((2, 2, 8, 4, 1, 8))[:, :, ::2]
    with pytest.raises(ValueError, match="dst must be contiguous"):
        copy_blocks(src, [0], strided, [0])
