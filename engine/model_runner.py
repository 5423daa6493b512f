"""Runs one model step over the paged KV cache of a worker.

Lifecycle:

1. ``ModelRunner(...)`` loads the checkpoint (registry + safetensors loader,
   or seeded random weights with ``load_format="dummy"``) and allocates the KV
   cache, one zeroed tensor in layout ``"LKBTHD"`` sized by ``num_kv_blocks``
   or by the memory budget.
2. Each step the scheduler calls :meth:`ModelRunner.execute` with one
   :class:`~engine.batch.SequenceInput` per scheduled request: prompt chunks
   and decode tokens mixed. The runner flattens them, builds
   :class:`~engine.attention.AttentionMetadata`, runs one forward pass that
   writes the new keys and values into the cache, computes logits only at the
   last token of each sequence that samples, and samples.
3. The cache tensor :attr:`ModelRunner.kv_cache` is what the KV transfer layer
   reads and writes between steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from engine.attention import AttentionMetadata, KvCacheSpec, get_attention_backend
from engine.batch import SequenceInput, TokenLogprobs
from engine.config import ModelConfig
from engine.models.loader import load_model
from engine.sampler import Sampler


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; other names pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ModelRunner:
    """Holds the model, the KV cache and the sampler of one worker.

    Args:
        model_config: the checkpoint.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (already resolved,
            see :func:`engine.config.resolve_dtype`); model and cache dtype.
        block_size: tokens per KV block.
        num_kv_blocks: blocks in the cache; ``None`` fits as many as
            ``kv_cache_memory_bytes`` allows.
        kv_cache_memory_bytes: cache budget in bytes when ``num_kv_blocks`` is ``None``.
        max_model_len: longest sequence accepted (tokens).
        seed: seed of the sampler's shared generator and of ``"dummy"`` weights.
        attention_backend: name of the registered attention implementation.
        load_format: ``"auto"``, ``"safetensors"`` or ``"dummy"`` (random
            weights from config.json alone, see
            :func:`engine.models.loader.init_dummy_weights`).

    Raises:
        ValueError: bad architecture, dtype, load format or weights (see
            :func:`engine.models.loader.load_model`), or a budget below one block.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        *,
        device: str,
        dtype: str,
        block_size: int,
        num_kv_blocks: int | None,
        kv_cache_memory_bytes: int,
        max_model_len: int,
        seed: int = 0,
        attention_backend: str = "torch",
        load_format: str = "auto",
    ) -> None:
        self.model_config = model_config
        self.device = torch.device(resolve_device(device))
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.model = load_model(
            model_config,
            dtype,
            self.device,
            get_attention_backend(attention_backend),
            load_format=load_format,
            seed=seed,
        )
        spec = KvCacheSpec(
            num_layers=model_config.num_hidden_layers,
            num_blocks=0,
            block_size=block_size,
            num_kv_heads=model_config.num_key_value_heads,
            head_dim=model_config.head_dim,
            dtype=dtype,
        )
        if num_kv_blocks is None:
            num_kv_blocks = kv_cache_memory_bytes // spec.bytes_per_block
        if num_kv_blocks < 1:
            raise ValueError(
                f"KV cache budget of {kv_cache_memory_bytes} bytes is below one block ({spec.bytes_per_block} bytes)"
            )
        self.kv_cache_spec = dataclasses.replace(spec, num_blocks=num_kv_blocks)
        self.kv_cache = self.kv_cache_spec.allocate(self.device)
        self.sampler = Sampler(seed)

    @property
    def num_kv_blocks(self) -> int:
        """Blocks in the KV cache."""
        return self.kv_cache_spec.num_blocks

    @property
    def kv_cache_bytes_per_block(self) -> int:
        """Bytes of one block across all layers, keys and values."""
        return self.kv_cache_spec.bytes_per_block

    @property
    def num_layers(self) -> int:
        """Decoder layers (first axis of :attr:`kv_cache`)."""
        return self.kv_cache_spec.num_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer."""
        return self.kv_cache_spec.num_kv_heads

    @property
    def head_dim(self) -> int:
        """Per-head size."""
        return self.kv_cache_spec.head_dim

    @property
    def cache_layout(self) -> str:
        """Axis order of :attr:`kv_cache` (``"LKBTHD"``)."""
        return self.kv_cache_spec.layout

    @torch.inference_mode()
    def execute(self, seqs: Sequence[SequenceInput]) -> list[int | TokenLogprobs | None]:
        """Compute one step and sample.

        Args:
            seqs: one slice per scheduled request (see :class:`SequenceInput`).

        Returns:
            Per input, ``None`` when ``sample`` is not set, else the sampled token
            id, or its :class:`TokenLogprobs` when ``sampling.logprobs`` is set.

        Raises:
            ValueError: an input exceeds ``max_model_len``, has a block table
                too short for its tokens, or names a block outside the cache.
        """
        if not seqs:
            return []
        self._check_inputs(seqs)
        metadata = AttentionMetadata.build(
            [s.start_pos for s in seqs],
            [len(s.token_ids) for s in seqs],
            [s.block_table for s in seqs],
            self.block_size,
            self.device,
        )
        input_ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.int64)
        positions = torch.cat([torch.arange(s.start_pos, s.end_pos, dtype=torch.int64) for s in seqs])
        hidden = self.model(
            input_ids.to(self.device, non_blocking=True),
            positions.to(self.device, non_blocking=True),
            self.kv_cache,
            metadata,
        )
        sampled = [i for i, s in enumerate(seqs) if s.sample]
        results: list[int | TokenLogprobs | None] = [None] * len(seqs)
        if not sampled:
            return results
        last_rows = torch.tensor(
            [metadata.query_start_loc_cpu[i + 1] - 1 for i in sampled], device=self.device
        )
        logits = self.model.compute_logits(hidden[last_rows])
        tokens = self.sampler.sample(logits, [seqs[i] for i in sampled])
        for i, token in zip(sampled, tokens, strict=True):
            results[i] = token
        return results

    def _check_inputs(self, seqs: Sequence[SequenceInput]) -> None:
        for s in seqs:
            if s.end_pos > self.max_model_len:
                raise ValueError(f"{s.req_id}: {s.end_pos} tokens exceed max_model_len {self.max_model_len}")
            needed = -(-s.end_pos // self.block_size)
            bad = [b for b in s.block_table[:needed] if not 0 <= b < self.num_kv_blocks]
            if bad:
                raise ValueError(
                    f"{s.req_id}: block ids {bad} outside the cache of {self.num_kv_blocks} blocks"
                )
