"""Rotary embedding frequencies and rotation against transformers' Llama implementation."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from engine.models.rope import RotaryEmbedding, rope_inv_freq

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_llama3_inv_freq_follows_the_reference_formula() -> None:
    base = rope_inv_freq(64, 500000.0, None)
    scaled = rope_inv_freq(64, 500000.0, LLAMA3)
    wavelen = 2 * torch.pi / base
    high = wavelen < 64 / 4.0  # kept
    low = wavelen > 64 / 1.0  # divided by factor
    assert high.any() and low.any() and (~high & ~low).any()
    torch.testing.assert_close(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8.0)
    mid = ~high & ~low
    smooth = (64 / wavelen[mid] - 1.0) / (4.0 - 1.0)
    torch.testing.assert_close(scaled[mid], (1 - smooth) * base[mid] / 8.0 + smooth * base[mid])


def test_linear_scaling_divides_frequencies() -> None:
    torch.testing.assert_close(
        rope_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4.0}),
        rope_inv_freq(16, 10000.0, None) / 4.0,
    )


def test_unsupported_rope_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported rope_scaling rope_type 'longrope'"):
        rope_inv_freq(16, 10000.0, {"rope_type": "longrope", "factor": 4.0})


def test_rotation_matches_transformers_apply_rotary_pos_emb() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, 16, generator=gen)
    k = torch.randn(6, 2, 16, generator=gen)
    positions = torch.tensor([0, 1, 2, 17, 40, 99])
    rope = RotaryEmbedding(16, 128, 10000.0, None)
    q_out, k_out = rope(positions, q, k)
    angles = torch.outer(positions.float(), rope_inv_freq(16, 10000.0, None))
    angles = torch.cat([angles, angles], dim=-1)
    # transformers takes [batch, heads, seq, dim] and cos/sin [batch, seq, dim]
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], angles.cos()[None], angles.sin()[None]
    )
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1))
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1))
