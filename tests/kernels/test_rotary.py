"""kernels.rotary against its torch reference and the model's RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from engine.models.rope import RotaryEmbedding
from kernels.rotary import rotary_embedding, rotary_embedding_reference
from tests.kernels.conftest import tolerance

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "num_kv_heads", "head_dim", "scaling"),
    [
        (1, 1, 1, 8, None),
        (5, 4, 2, 32, LLAMA3_SCALING),
        (9, 6, 3, 24, {"rope_type": "linear", "factor": 2.0}),
    ],
)
@pytest.mark.parametrize("low_precision", [False, True])
def test_rotary_matches_model_rope(
    device: str,
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scaling: dict[str, object] | None,
    low_precision: bool,
    half_dtype: torch.dtype,
) -> None:
    dtype = half_dtype if low_precision else torch.float32
    gen = torch.Generator().manual_seed(num_tokens)
    rope = RotaryEmbedding(head_dim, 512, 10000.0, scaling)
    cos, sin = rope.cos_sin_table(torch.device(device))
    positions = torch.randint(0, 512, (num_tokens,), generator=gen).to(device)
    # q and k as strided views of one fused projection, rotated in place
    qkv = (
        torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype).to(device)
    )
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    q_model, k_model = rope(positions, q.clone(), k.clone())
    q_ref, k_ref = q.clone(), k.clone()
    rotary_embedding_reference(positions, q_ref, k_ref, cos, sin)
    rotary_embedding(positions, q, k, cos, sin)
    torch.testing.assert_close(q, q_ref, **tolerance(dtype))
    torch.testing.assert_close(k, k_ref, **tolerance(dtype))
    torch.testing.assert_close(q, q_model, **tolerance(dtype))
    torch.testing.assert_close(k, k_model, **tolerance(dtype))


def test_rotary_rejects_odd_head_dim_and_bad_table(device: str) -> None:
    q = torch.zeros(2, 2, 7, device=device)
    table = torch.zeros(16, 7, device=device)
    pos = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="even head_dim"):
        rotary_embedding(pos, q, q, table, table)
    q = torch.zeros(2, 2, 8, device=device)
    with pytest.raises(ValueError, match="cos must have shape"):
        rotary_embedding(pos, q, q, table, table)
