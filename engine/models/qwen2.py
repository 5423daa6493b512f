"""Qwen2 decoder (Qwen Team, 2024, "Qwen2 Technical Report", arXiv:2407.10671).

A Llama with a bias on the query, key and value projections (not on the output
projection), always, whatever ``attention_bias`` says. Sliding-window layers
(``use_sliding_window``) are handled by capping ``max_model_len`` at the window
(see :func:`engine.config.resolve_max_model_len`).
"""

from __future__ import annotations

from engine.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.models.registry import register_model


@register_model("Qwen2ForCausalLM")
class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 causal LM over a paged KV cache (see :class:`LlamaForCausalLM`)."""

    @classmethod
    def attention_biases(cls, config: ModelConfig) -> tuple[bool, bool]:
        """``(qkv_bias, o_bias)`` = ``(True, False)``."""
        return True, False
