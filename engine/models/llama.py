"""Llama decoder (Touvron et al., 2023, arXiv:2302.13971) over the paged KV cache.

RMSNorm, grouped-query attention with rotary embeddings, SwiGLU MLP, and a tied
or separate LM head. The forward pass takes a flattened variable-length batch
(see :mod:`engine.attention`). Query/key/value and gate/up projections are
fused; :attr:`LlamaForCausalLM.stacked_params` tells the loader which
checkpoint tensors fill which slice.

Variants are small subclasses: :meth:`LlamaForCausalLM.attention_biases`
chooses which projections carry a bias (Qwen2: q/k/v only) and
:meth:`LlamaAttention.normalize_qk` is the hook for per-head q/k norms (Qwen3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn as nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.models import fused_ops
from engine.models.registry import register_model
from engine.models.rope import shared_rotary_embedding


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019, arXiv:1910.07467).

    Normalises in float32 and casts back before scaling, as the Llama reference does.
    :meth:`add_and_norm` fuses the residual add in front of it (one kernel on CUDA,
    see :mod:`engine.models.fused_ops`).
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.use_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., hidden_size]``; returns the same shape and dtype."""
        return fused_ops.rms_norm(x, self.weight, self.eps, None, self.use_kernels)[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)`` for ``[T, hidden_size]`` inputs
        (the kernel path overwrites ``residual`` with the sum)."""
        out, summed = fused_ops.rms_norm(x, self.weight, self.eps, residual, self.use_kernels)
        assert summed is not None
        return out, summed


class MergedLinear(nn.Linear):
    """A linear layer whose output stacks several checkpoint projections.

    Args:
        in_features: input size.
        output_sizes: output size of each stacked projection, in order.
        bias: the projections carry a bias.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        """Copy checkpoint projection number ``shard`` into ``weight`` or ``bias`` rows.

        Raises:
            ValueError: ``tensor``'s shape does not match the slice.
        """
        param: torch.Tensor = getattr(self, param_name)
        offset = sum(self.output_sizes[:shard])
        target = param.data[offset : offset + self.output_sizes[shard]]
        if target.shape != tensor.shape:
            raise ValueError(
                f"shard {shard} of {param_name}: expected {tuple(target.shape)}, got {tuple(tensor.shape)}"
            )
        target.copy_(tensor)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention of one layer over its slice of the paged cache."""

    def __init__(
        self, config: ModelConfig, attn_backend: AttentionBackend, qkv_bias: bool, o_bias: bool
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = MergedLinear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size], qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.rotary_emb = shared_rotary_embedding(
            self.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.attn_backend = attn_backend
        self.use_kernels = False

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook applied to ``q`` ``[T, H, D]`` and ``k`` ``[T, KVH, D]`` before RoPE; identity in Llama."""
        return q, k

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        layer_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """``hidden`` ``[T, hidden_size]`` -> ``[T, hidden_size]``; writes this step's KV."""
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.normalize_qk(q, k)
        if self.use_kernels:
            q, k = fused_ops.apply_rotary(positions, q, k, self.rotary_emb.cos_sin_table(positions.device))
        else:
            q, k = self.rotary_emb(positions, q, k)
        self.attn_backend.write_kv(layer_cache, k, v, attn_metadata)
        out = self.attn_backend.forward(q, layer_cache, attn_metadata, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020, arXiv:2002.05202): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], config.mlp_bias)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=config.mlp_bias)
        self.use_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, hidden_size]`` -> ``[T, hidden_size]``."""
        return self.down_proj(fused_ops.silu_and_mul(self.gate_up_proj(x), self.use_kernels))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP.

    The residual stream travels beside the hidden states (as in vLLM) so each
    residual add fuses into the following RMSNorm: layer ``i`` returns its MLP
    output and the stream *before* that output is added; the next norm adds it.
    """

    def __init__(self, config: ModelConfig, self_attn: LlamaAttention) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        layer_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, residual)`` ``[T, hidden_size]`` each -> the same; the layer's output
        stream is ``hidden + residual``. ``residual`` is ``None`` at the first layer."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, layer_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (checkpoint prefix ``model.``)."""

    def __init__(self, config: ModelConfig, layers: list[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@register_model("LlamaForCausalLM")
class LlamaForCausalLM(nn.Module):
    """Llama causal LM over a paged KV cache.

    Args:
        config: the checkpoint's configuration.
        attn_backend: attention implementation shared by every layer.
    """

    #: Checkpoint projection name -> (our fused parameter's module name, shard index).
    stacked_params: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    attention_cls: ClassVar[type[LlamaAttention]] = LlamaAttention

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        #: Called with each layer's index once its forward (and KV write) is enqueued; set per
        #: step by the engine thread (layer-wise KV streaming), ``None`` otherwise.
        self.on_layer_done: Callable[[int], None] | None = None
        qkv_bias, o_bias = self.attention_biases(config)
        layers = [
            LlamaDecoderLayer(config, self.attention_cls(config, attn_backend, qkv_bias, o_bias))
            for _ in range(config.num_hidden_layers)
        ]
        self.model = LlamaModel(config, layers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them.

        Called again after materialising from the meta device, which unties.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def attention_biases(cls, config: ModelConfig) -> tuple[bool, bool]:
        """``(qkv_bias, o_bias)``: Llama's ``attention_bias`` covers all four projections."""
        return config.attention_bias, config.attention_bias

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Run the decoder over a flattened batch.

        Args:
            input_ids: int64 ``[T]``.
            positions: int64 ``[T]``, each token's position in its sequence.
            kv_cache: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``;
                this step's keys and values are written into it.
            attn_metadata: the batch's layout (see :class:`AttentionMetadata`).

        Returns:
            Final-norm hidden states ``[T, hidden_size]`` in the model dtype.
        """
        hidden = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer_idx, layer in enumerate(self.model.layers):
            hidden, residual = layer(positions, hidden, residual, kv_cache[layer_idx], attn_metadata)
            if self.on_layer_done is not None:  # layer-wise KV streaming (prefill_service.layer_stream)
                self.on_layer_done(layer_idx)
        if residual is None:
            return self.model.norm(hidden)
        return self.model.norm.add_and_norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[N, hidden_size]`` -> float32 logits ``[N, vocab_size]``."""
        return self.lm_head(hidden).float()
