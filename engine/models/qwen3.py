"""Qwen3 decoder (Qwen Team, 2025, "Qwen3 Technical Report", arXiv:2505.09388).

A Llama whose queries and keys go through an RMSNorm over each head's
``head_dim`` features (weights ``q_norm``/``k_norm``, shared by all heads of a
layer) after the projection and before RoPE. ``head_dim`` comes from the config
(it need not be ``hidden_size / num_attention_heads``) and ``attention_bias``
covers all four projections, as in Llama.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionBackend
from engine.config import ModelConfig
from engine.models.llama import LlamaAttention, LlamaForCausalLM, RMSNorm
from engine.models.registry import register_model


class Qwen3Attention(LlamaAttention):
    """Llama attention plus per-head q/k RMSNorm (checkpoint names ``q_norm``, ``k_norm``)."""

    def __init__(
        self, config: ModelConfig, attn_backend: AttentionBackend, qkv_bias: bool, o_bias: bool
    ) -> None:
        super().__init__(config, attn_backend, qkv_bias, o_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise ``q`` ``[T, H, D]`` and ``k`` ``[T, KVH, D]`` over ``D``; same shapes and dtypes."""
        return self.q_norm(q), self.k_norm(k)


@register_model("Qwen3ForCausalLM")
class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 causal LM over a paged KV cache (see :class:`LlamaForCausalLM`)."""

    attention_cls = Qwen3Attention
