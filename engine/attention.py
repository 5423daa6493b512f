"""Paged attention over a variable-length batch, and the KV cache it reads.

KV cache layout ``"LKBTHD"``: one tensor per worker,
``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``; index 0 of
the second axis holds keys, 1 values. Layer ``l`` sees ``kv_cache[l]``. The
token at position ``p`` of a sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

A step's batch is flattened: ``T`` new tokens of ``B`` sequences laid end to
end, sequence ``i`` owning rows ``query_start_loc[i]:query_start_loc[i + 1]``.
A sequence is a prefill chunk (several tokens, possibly after a cached prefix
of ``num_computed_tokens[i]`` tokens) or a decode (one token); both kinds mix
in one batch. :class:`AttentionMetadata` carries everything an attention
implementation needs; implementations are :class:`AttentionBackend` objects
looked up by name: ``"torch"`` (reference, any device) and ``"triton"``
(the kernels of :mod:`kernels`, CUDA, or CPU under ``TRITON_INTERPRET=1``);
:func:`resolve_attention_backend` turns ``"auto"`` into one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

#: Name of the KV cache layout (axis order) shared with the transfer layer.
KV_CACHE_LAYOUT = "LKBTHD"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` named ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises:
        ValueError: any other name.
    """
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(_DTYPES)}") from None


@dataclass(frozen=True)
class KvCacheSpec:
    """Shape and dtype of a worker's KV cache (layout :data:`KV_CACHE_LAYOUT`).

    Attributes:
        num_layers: decoder layers.
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        num_kv_heads: key/value heads per layer.
        head_dim: per-head size.
        dtype: element dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
    """

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layout: str = KV_CACHE_LAYOUT

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """``(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)``."""
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies across all layers, keys and values."""
        element_size = torch.empty((), dtype=torch_dtype(self.dtype)).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * element_size

    def allocate(self, device: torch.device | str) -> torch.Tensor:
        """A zero-filled cache tensor of :attr:`shape` on ``device``."""
        return torch.zeros(self.shape, dtype=torch_dtype(self.dtype), device=device)


@dataclass(frozen=True)
class AttentionMetadata:
    """Where a step's tokens sit in the paged KV cache.

    Tensors live on the model's device; the ``*_cpu`` tuples repeat the
    per-sequence sizes on the host so implementations need no device sync.

    Attributes:
        slot_mapping: int64 ``[T]``, cache slot of each new token.
        query_start_loc: int32 ``[B + 1]``, row offsets of each sequence's tokens.
        seq_lens: int32 ``[B]``, context length after this step (cached + new tokens).
        num_computed_tokens: int32 ``[B]``, tokens already cached before this step.
        block_tables: int32 ``[B, max_blocks]``, block ids padded with 0.
        block_size: tokens per block.
        query_start_loc_cpu: host copy of ``query_start_loc``.
        seq_lens_cpu: host copy of ``seq_lens``.
        max_query_len: longest new-token run in the batch (tokens).
        max_seq_len: longest context in the batch (tokens), or an upper bound on
            it (a CUDA graph captures with ``max_model_len``).
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    num_computed_tokens: torch.Tensor
    block_tables: torch.Tensor
    block_size: int
    query_start_loc_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch (``B``)."""
        return len(self.seq_lens_cpu)

    @classmethod
    def build(
        cls,
        num_computed_tokens: Sequence[int],
        query_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """Metadata of a batch, sequence ``i`` computing ``query_lens[i]`` tokens
        after ``num_computed_tokens[i]`` cached ones, its KV in ``block_tables[i]``.

        Raises:
            ValueError: a block table is too short for its sequence, or a query is empty.
        """
        seq_lens = [c + q for c, q in zip(num_computed_tokens, query_lens, strict=True)]
        if any(q < 1 for q in query_lens):
            raise ValueError(
                f"every sequence needs at least one new token, got query_lens {list(query_lens)}"
            )
        needed = [-(-n // block_size) for n in seq_lens]
        for i, (table, n) in enumerate(zip(block_tables, needed, strict=True)):
            if len(table) < n:
                raise ValueError(f"sequence {i} needs {n} blocks for {seq_lens[i]} tokens, got {len(table)}")
        tables = torch.zeros((len(seq_lens), max(needed)), dtype=torch.int32)
        slots = []
        for i, (table, n) in enumerate(zip(block_tables, needed, strict=True)):
            row = torch.tensor(list(table[:n]), dtype=torch.int64)
            tables[i, :n] = row.to(torch.int32)
            pos = torch.arange(num_computed_tokens[i], seq_lens[i], dtype=torch.int64)
            slots.append(row[pos // block_size] * block_size + pos % block_size)
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)

        def to_device(values: Sequence[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            slot_mapping=to_device(torch.cat(slots), torch.int64),
            query_start_loc=to_device(starts, torch.int32),
            seq_lens=to_device(seq_lens, torch.int32),
            num_computed_tokens=to_device(list(num_computed_tokens), torch.int32),
            block_tables=tables.to(device, non_blocking=True),
            block_size=block_size,
            query_start_loc_cpu=tuple(starts),
            seq_lens_cpu=tuple(seq_lens),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )


class AttentionBackend(Protocol):
    """Writes new keys/values into one layer's cache and attends over it."""

    name: str

    def write_kv(
        self, layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata
    ) -> None:
        """Store ``k``, ``v`` (``[T, num_kv_heads, head_dim]``) at ``metadata.slot_mapping``
        in ``layer_cache`` (``[2, num_blocks, block_size, num_kv_heads, head_dim]``)."""
        ...

    def forward(
        self, q: torch.Tensor, layer_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Causal attention of ``q`` (``[T, num_heads, head_dim]``) over each sequence's
        cached context (new tokens already written); returns ``[T, num_heads, head_dim]``."""
        ...


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {}


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    """Make ``factory()`` available as :func:`get_attention_backend` ``(name)``."""
    _BACKENDS[name] = factory


def get_attention_backend(name: str = "torch") -> AttentionBackend:
    """A new instance of the backend registered as ``name``.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; registered: {', '.join(sorted(_BACKENDS))}"
        ) from None


def write_kv(layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Copy keys and values of ``T`` tokens into their cache slots.

    Args:
        layer_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (contiguous).
        k, v: ``[T, num_kv_heads, head_dim]``, cast to the cache dtype.
        slot_mapping: int64 ``[T]``, slots in ``[0, num_blocks * block_size)``.
    """
    num_kv_heads, head_dim = layer_cache.shape[-2:]
    layer_cache[0].view(-1, num_kv_heads, head_dim)[slot_mapping] = k.to(layer_cache.dtype)
    layer_cache[1].view(-1, num_kv_heads, head_dim)[slot_mapping] = v.to(layer_cache.dtype)


def gather_kv(
    layer_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one sequence's first ``seq_len`` positions.

    Args:
        layer_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``.
        block_table: int ``[>= ceil(seq_len / block_size)]`` block ids.

    Returns:
        ``(k, v)``, each ``[seq_len, num_kv_heads, head_dim]``.
    """
    block_size, num_kv_heads, head_dim = layer_cache.shape[2:]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    k = layer_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    v = layer_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    return k, v


class TorchAttentionBackend:
    """Reference implementation in plain torch (CPU and CUDA).

    Scores and softmax are computed in float32. Query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)`` (grouped-query attention, Ainslie et
    al., 2023, arXiv:2305.13245). Query ``j`` of a sequence with ``c`` cached
    tokens sees positions ``0 .. c + j``.
    """

    name = "torch"

    def write_kv(
        self, layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata
    ) -> None:
        """See :meth:`AttentionBackend.write_kv`."""
        write_kv(layer_cache, k, v, metadata.slot_mapping)

    def forward(
        self, q: torch.Tensor, layer_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """See :meth:`AttentionBackend.forward`."""
        out = torch.empty_like(q)
        starts = metadata.query_start_loc_cpu
        for i, seq_len in enumerate(metadata.seq_lens_cpu):
            rows = slice(starts[i], starts[i + 1])
            k, v = gather_kv(layer_cache, metadata.block_tables[i], seq_len)
            out[rows] = _attend(q[rows], k, v, scale)
        return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last ``Q`` positions of one sequence.

    Args:
        q: ``[Q, num_heads, head_dim]``, positions ``S - Q .. S - 1``.
        k, v: ``[S, num_kv_heads, head_dim]``.

    Returns:
        ``[Q, num_heads, head_dim]`` in ``q``'s dtype.
    """
    num_queries, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    q32 = q.float().transpose(0, 1)  # [H, Q, D]
    k32 = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
    v32 = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q32, k32.transpose(1, 2)) * scale  # [H, Q, S]
    if num_queries > 1:
        query_pos = torch.arange(seq_len - num_queries, seq_len, device=q.device).unsqueeze(1)
        key_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v32).transpose(0, 1).to(q.dtype)


register_attention_backend(TorchAttentionBackend.name, TorchAttentionBackend)


class TritonAttentionBackend:
    """Triton kernels (:mod:`kernels`): KV writes by slot mapping, paged decode
    attention (GQA-grouped, split along the context) when every sequence has one
    new token, and variable-length prefill attention over the paged cache
    otherwise. Negative slots skip the write (padding rows of a CUDA graph).
    """

    name = "triton"

    def __init__(self) -> None:
        from kernels.paged_decode_attention import paged_decode_attention
        from kernels.prefill_attention import prefill_attention
        from kernels.write_kv import write_kv as write_kv_kernel

        self._decode = paged_decode_attention
        self._prefill = prefill_attention
        self._write_kv = write_kv_kernel

    def write_kv(
        self, layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata
    ) -> None:
        """See :meth:`AttentionBackend.write_kv`."""
        self._write_kv(layer_cache, k, v, metadata.slot_mapping)

    def forward(
        self, q: torch.Tensor, layer_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """See :meth:`AttentionBackend.forward`."""
        if metadata.max_query_len == 1 and q.shape[0] == metadata.block_tables.shape[0]:
            return self._decode(
                q, layer_cache, metadata.block_tables, metadata.seq_lens, scale, metadata.max_seq_len
            )
        return self._prefill(
            q,
            layer_cache,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
            scale,
            metadata.max_query_len,
        )


register_attention_backend(TritonAttentionBackend.name, TritonAttentionBackend)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA when triton is installed, else ``"torch"``;
    other names pass through (checked by :func:`get_attention_backend`)."""
    if name != "auto":
        return name
    import importlib.util

    has_triton = importlib.util.find_spec("triton") is not None
    return "triton" if device.type == "cuda" and has_triton else "torch"
