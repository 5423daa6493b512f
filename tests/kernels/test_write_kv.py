"""kernels.write_kv against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.write_kv import write_kv, write_kv_reference


@pytest.mark.parametrize(
    ("num_tokens", "num_kv_heads", "head_dim", "block_size", "dtype"),
    [(1, 1, 8, 4, torch.float32), (7, 2, 32, 16, torch.float32), (13, 3, 24, 8, torch.float16)],
)
def test_write_kv_matches_reference(
    device: str, num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    num_blocks = 9
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    expected = cache.clone()
    # k, v as strided views into one fused projection, like the model's qkv output
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen).to(device)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(device)
    slots[0] = -1  # padding row: skipped
    write_kv(cache, k, v, slots)
    write_kv_reference(expected, k, v, slots)
    assert torch.equal(cache, expected)


def test_write_kv_rejects_bad_shapes(device: str) -> None:
    cache = torch.zeros(2, 4, 4, 2, 8, device=device)
    k = torch.zeros(3, 2, 8, device=device)
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        write_kv(cache, k, k, torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="v must have shape"):
        write_kv(
            cache, k, torch.zeros(3, 1, 8, device=device), torch.zeros(3, dtype=torch.int64, device=device)
        )
    with pytest.raises(ValueError, match="layer_cache axis 0 must be 2"):
        write_kv(cache[:1], k, k, torch.zeros(3, dtype=torch.int64, device=device))
