"""kernels.rms_norm against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.rms_norm import rms_norm, rms_norm_reference
from tests.kernels.conftest import tolerance


@pytest.mark.parametrize(("rows", "hidden"), [(1, 8), (5, 256), (3, 100)])
@pytest.mark.parametrize("low_precision", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(
    device: str, rows: int, hidden: int, low_precision: bool, half_dtype: torch.dtype, with_residual: bool
) -> None:
    dtype = half_dtype if low_precision else torch.float32
    gen = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=gen).to(dtype).to(device)
    weight = torch.randn(hidden, generator=gen).to(dtype).to(device)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype).to(device) if with_residual else None
    expected_residual = residual.clone() if residual is not None else None
    out = rms_norm(x, weight, 1e-5, residual)
    expected = rms_norm_reference(x, weight, 1e-5, expected_residual)
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    if residual is not None:
        assert expected_residual is not None
        assert torch.equal(residual, expected_residual)


def test_rms_norm_rejects_mismatched_weight(device: str) -> None:
    x = torch.zeros(2, 8, device=device)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(4, device=device), 1e-5)
    with pytest.raises(ValueError, match="must share a dtype"):
        rms_norm(x, torch.ones(8, device=device, dtype=torch.bfloat16), 1e-5)
