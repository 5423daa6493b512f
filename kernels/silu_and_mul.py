"""SiLU-and-multiply, the gate of a SwiGLU MLP (Shazeer, 2020, arXiv:2002.05202).

``x = [gate | up]`` (each ``intermediate`` wide) -> ``silu(gate) * up``, with
SiLU (Elfwing et al., 2017, arXiv:1702.03118) ``g * sigmoid(g)`` computed in
float32 and rounded to the dtype before the product, as the unfused
``F.silu(gate) * up`` does. Grid: (row, column block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_tensor

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` ``[N, 2 * I]``.

    Args:
        x: ``[N, 2 * I]`` float32/bfloat16/float16, unit stride on the last axis.

    Returns:
        A new ``[N, I]`` tensor in ``x``'s dtype.

    Raises:
        ValueError: ``x`` has the wrong rank, dtype, stride or an odd width.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] % 2:
        raise ValueError(f"x must have an even last axis [N, 2 * intermediate], got shape {tuple(x.shape)}")
    n_cols = x.shape[1] // 2
    out = torch.empty((x.shape[0], n_cols), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or n_cols == 0:
        return out
    block = min(_BLOCK, 1 << (n_cols - 1).bit_length())
    grid = (x.shape[0], triton.cdiv(n_cols, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), n_cols, BLOCK=block)
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`silu_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
