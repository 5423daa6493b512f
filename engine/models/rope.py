"""Rotary position embedding (RoPE) in the Llama "rotate half" convention.

RoPE (Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position
Embedding", arXiv:2104.09864) rotates each query and key by an angle
proportional to its position. Llama checkpoints pair dimension ``i`` with
``i + head_dim / 2`` (rotate half), not adjacent dimensions.

Supported ``rope_scaling`` types: ``None`` (plain), ``"linear"`` (positions
divided by ``factor``), ``"dynamic"`` (dynamic NTK: it changes the base only
for sequences longer than ``max_position_embeddings``, which Tandem never
runs, so it equals plain RoPE here, as in transformers' ``dynamic_rope_update``),
``"yarn"`` (Peng et al., 2023, "YaRN: Efficient Context Window Extension of
Large Language Models", arXiv:2309.00071: per-dimension blend of interpolated
and extrapolated frequencies by a linear ramp over the rotation counts
``beta_fast``..``beta_slow``, and cos/sin scaled by the attention factor
``0.1 * ln(factor) + 1``) and ``"llama3"``, the frequency-dependent scaling
published with Llama 3.1 (Meta, 2024, "The Llama 3 Herd of Models",
arXiv:2407.21783; reference code ``apply_scaling`` in meta-llama/llama-models):
wavelengths longer than ``original_max_position_embeddings / low_freq_factor``
are stretched by ``factor``, those shorter than ``... / high_freq_factor`` are
kept, and those in between are interpolated smoothly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.nn as nn

#: ``rope_type`` values of ``rope_scaling`` (``rope_parameters``) that Tandem implements.
SUPPORTED_ROPE_TYPES = ("default", "dynamic", "linear", "llama3", "yarn")


def rope_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies of the rotary pairs.

    Returns:
        float32 CPU tensor ``[head_dim // 2]``, radians per position.

    Raises:
        ValueError: unsupported ``rope_type`` or odd ``head_dim``.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling rope_type {rope_type!r} in config.json; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type in ("default", "dynamic"):
        return inv_freq
    assert rope_scaling is not None
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, rope_theta, rope_scaling)
    return _llama3_inv_freq(inv_freq, rope_scaling)


def rope_attention_factor(rope_scaling: dict[str, Any] | None) -> float:
    """Factor applied to cos and sin: YaRN's attention temperature, 1.0 otherwise.

    YaRN uses ``attention_factor`` when given, else ``mscale(factor, mscale) /
    mscale(factor, mscale_all_dim)`` when both are set (DeepSeek's variant),
    else ``mscale(factor)``, with ``mscale(s, m=1) = 0.1 * m * ln(s) + 1`` (1 for ``s <= 1``).
    """
    if (rope_scaling or {}).get("rope_type") != "yarn":
        return 1.0
    assert rope_scaling is not None
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    factor = float(rope_scaling["factor"])
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
    return _yarn_mscale(factor, 1.0)


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    inv_freq: torch.Tensor, head_dim: int, rope_theta: float, scaling: dict[str, Any]
) -> torch.Tensor:
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        # The rotary pair index whose wavelength fits `num_rotations` times in the original context.
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 divides it by `factor`
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`; short ones are kept.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (split in two halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to queries and keys at given positions.

    The cos/sin table (float32, ``[max_position, head_dim]``) is built on the
    positions' device at first use, so the module can be created on the meta
    device and materialised later.

    Args:
        head_dim: per-head size (even).
        max_position: positions covered by the table (tokens).
        rope_theta: rotary base.
        rope_scaling: scaling parameters (see module docstring) or ``None``.
    """

    def __init__(
        self, head_dim: int, max_position: int, rope_theta: float, rope_scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self._inv_freq = rope_inv_freq(head_dim, rope_theta, rope_scaling)
        self._attention_factor = rope_attention_factor(rope_scaling)
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def cos_sin_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` tables ``[max_position, head_dim]`` on ``device`` (halves equal),
        times the attention factor (YaRN; 1.0 otherwise)."""
        if self._cos_sin is None or self._cos_sin[0].device != device:
            inv_freq = self._inv_freq.to(device)
            positions = torch.arange(self.max_position, device=device, dtype=torch.float32)
            freqs = torch.outer(positions, inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            self._cos_sin = (angles.cos() * self._attention_factor, angles.sin() * self._attention_factor)
        return self._cos_sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k``.

        Args:
            positions: int64 ``[T]``, each ``< max_position``.
            q: ``[T, num_heads, head_dim]``.
            k: ``[T, num_kv_heads, head_dim]``.

        Returns:
            ``(q, k)`` rotated, same shapes and dtypes (computed in float32).
        """
        cos_table, sin_table = self.cos_sin_table(positions.device)
        cos = cos_table[positions].unsqueeze(1)
        sin = sin_table[positions].unsqueeze(1)
        q32, k32 = q.float(), k.float()
        q_out = q32 * cos + rotate_half(q32) * sin
        k_out = k32 * cos + rotate_half(k32) * sin
        return q_out.to(q.dtype), k_out.to(k.dtype)


_SHARED: dict[tuple[int, int, float, str], RotaryEmbedding] = {}


def shared_rotary_embedding(
    head_dim: int, max_position: int, rope_theta: float, rope_scaling: dict[str, Any] | None
) -> RotaryEmbedding:
    """One :class:`RotaryEmbedding` per distinct configuration, shared by every layer.

    The cos/sin table is ``2 * max_position * head_dim * 4`` bytes (134 MB for
    Llama-3's 131,072 positions at head_dim 128); sharing keeps one per model
    instead of one per layer.
    """
    key = (head_dim, max_position, float(rope_theta), json.dumps(rope_scaling, sort_keys=True))
    if key not in _SHARED:
        _SHARED[key] = RotaryEmbedding(head_dim, max_position, rope_theta, rope_scaling)
    return _SHARED[key]
