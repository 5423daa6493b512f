"""RMSNorm, optionally fused with the residual add before it.

RMSNorm (Zhang & Sennrich, 2019, arXiv:1910.07467) as Llama computes it:
normalise in float32, cast to the input dtype, then scale by ``weight``. The
fused form first adds the residual stream (``residual = x + residual``, rounded
to the dtype as an unfused add would be) and normalises that sum, saving one
read and one write of the hidden states per norm. One program per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_same_dtype, check_shape, check_tensor, next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    out_ptr,
    weight_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape("weight", weight, (x.shape[1],))
    check_same_dtype(("x", "weight"), (x, weight))
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("residual", residual, tuple(x.shape))
        check_same_dtype(("x", "residual"), (x, residual))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight * rmsnorm(x + residual)``; with ``residual`` given, it is updated in place to ``x + residual``.

    Args:
        x: ``[N, hidden]`` float32/bfloat16/float16, unit stride on the last axis.
        weight: ``[hidden]``, same dtype.
        eps: added to the mean square.
        residual: optional ``[N, hidden]``, same dtype; overwritten with the sum.

    Returns:
        A new ``[N, hidden]`` tensor in ``x``'s dtype.

    Raises:
        ValueError: shapes, dtypes, devices or strides do not match.
    """
    _check(x, weight, residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    _rms_norm_kernel[(x.shape[0],)](
        x,
        residual if residual is not None else x,
        out,
        weight,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        x.shape[1],
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=next_power_of_2(x.shape[1]),
    )
    return out


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of :func:`rms_norm` (same arguments and in-place residual update)."""
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
