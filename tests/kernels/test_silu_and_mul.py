"""kernels.silu_and_mul against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.silu_and_mul import silu_and_mul, silu_and_mul_reference
from tests.kernels.conftest import tolerance


@pytest.mark.parametrize(("rows", "width"), [(1, 2), (4, 2 * 704), (3, 2 * 1500)])
@pytest.mark.parametrize("low_precision", [False, True])
def test_silu_and_mul_matches_reference(
    device: str, rows: int, width: int, low_precision: bool, half_dtype: torch.dtype
) -> None:
    dtype = half_dtype if low_precision else torch.float32
    gen = torch.Generator().manual_seed(rows + width)
    x = (3 * torch.randn(rows, width, generator=gen)).to(dtype).to(device)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x), **tolerance(dtype))


def test_silu_and_mul_rejects_odd_width(device: str) -> None:
    with pytest.raises(ValueError, match="even last axis"):
        silu_and_mul(torch.zeros(2, 5, device=device))
