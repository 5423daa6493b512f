"""Element-wise model ops with a Triton path (CUDA) and a plain-torch path (CPU, reference).

Each op takes ``use_kernels``: ``True`` runs the fused kernel of :mod:`kernels`,
``False`` the torch code the kernel is tested against. Models hold the flag per
module (attribute ``use_kernels``) and :func:`set_fused_ops` sets it on a whole
model, so the runner chooses once at start-up (see
:func:`resolve_fused_ops`). Kernels are imported on first use: CPU-only
installs without triton never touch them.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Values of the runner's ``fused_ops`` option.
FUSED_OPS_CHOICES = ("auto", "triton", "torch")


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def resolve_fused_ops(choice: str, device: torch.device) -> bool:
    """Whether to run the Triton kernels: ``"auto"`` on CUDA with triton installed,
    ``"triton"`` always, ``"torch"`` never.

    Raises:
        ValueError: unknown ``choice``, or ``"triton"`` without triton installed.
    """
    if choice not in FUSED_OPS_CHOICES:
        raise ValueError(f"unknown fused_ops {choice!r}; choose from {', '.join(FUSED_OPS_CHOICES)}")
    if choice == "triton" and not triton_available():
        raise ValueError("fused_ops 'triton' needs the triton package")
    return choice == "triton" or (choice == "auto" and device.type == "cuda" and triton_available())


def set_fused_ops(model: nn.Module, enabled: bool) -> None:
    """Set ``use_kernels`` on every submodule of ``model`` that has it."""
    for module in model.modules():
        if hasattr(module, "use_kernels"):
            setattr(module, "use_kernels", enabled)  # noqa: B010


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    use_kernels: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight * rmsnorm(x + residual), x + residual)`` (``residual`` ``None``: no add).

    ``x``: ``[..., hidden]``; ``residual`` the same shape or ``None``. The Triton
    path updates ``residual`` in place and returns it.
    """
    if use_kernels:
        from kernels.rms_norm import rms_norm as rms_norm_kernel

        hidden = x.shape[-1]
        flat_residual = residual.view(-1, hidden) if residual is not None else None
        out = rms_norm_kernel(x.reshape(-1, hidden), weight, eps, flat_residual)
        return out.view(x.shape), residual
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), residual


def silu_and_mul(x: torch.Tensor, use_kernels: bool) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` ``[T, 2 * I]`` -> ``[T, I]``."""
    if use_kernels:
        from kernels.silu_and_mul import silu_and_mul as silu_and_mul_kernel

        return silu_and_mul_kernel(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, H, D]`` and ``k`` ``[T, KVH, D]`` in place with the Triton kernel.

    ``cos_sin``: the float32 ``[max_position, D]`` tables of
    :class:`engine.models.rope.RotaryEmbedding`. Returns ``(q, k)``.
    """
    from kernels.rotary import rotary_embedding

    rotary_embedding(positions, q, k, *cos_sin)
    return q, k
