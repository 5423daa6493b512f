"""Mistral decoder (Jiang et al., 2023, "Mistral 7B", arXiv:2310.06825).

Architecturally a Llama: grouped-query attention, RoPE, SwiGLU, RMSNorm, with
the same checkpoint tensor names. Mistral 7B v0.1 adds sliding-window
attention; Tandem does not implement it and instead caps ``max_model_len`` at
the window (see :func:`engine.config.resolve_max_model_len`), within which the
two are identical.
"""

from __future__ import annotations

from engine.models.llama import LlamaForCausalLM
from engine.models.registry import register_model


@register_model("MistralForCausalLM")
class MistralForCausalLM(LlamaForCausalLM):
    """Mistral causal LM over a paged KV cache (see :class:`LlamaForCausalLM`)."""
