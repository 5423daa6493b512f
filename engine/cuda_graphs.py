"""CUDA graphs of decode steps, captured at start-up for a ladder of batch sizes.

A decode step launches hundreds of small kernels (32 layers x ~10); replaying
them as one CUDA graph (``torch.cuda.CUDAGraph``) removes the per-launch CPU
cost, which otherwise dominates at small batches.

Lifecycle:

1. :class:`DecodeGraphs` allocates static device buffers for the largest batch
   (token ids, positions, slots, context lengths, block tables), then captures
   one graph per batch size of the ladder, largest first, all sharing one
   memory pool. Captured inputs are padding rows (slot ``-1``: no KV write;
   context length 0: zero attention output), so capture touches no cache block.
   The attention metadata carries ``max_seq_len = max_model_len``; the decode
   kernel's grid depends on the batch size only and its partitions follow the
   device-side context lengths (see :mod:`kernels.paged_decode_attention`), so
   one graph per batch size serves every context. Time and memory are logged.
2. Each decode step of ``n`` sequences (every sequence one new token) copies its
   inputs into the first ``n`` rows of the static buffers, pads rows ``n .. B``
   of the smallest captured ``B >= n``, replays that graph and returns the
   first ``n`` rows of its output. Above the largest size the caller runs eagerly.

The graphs are only valid with the Triton attention backend (the torch
backend loops over host-side lengths) and with the cache tensor they were
captured on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.models.registry import CausalLM

logger = logging.getLogger(__name__)

#: Default batch sizes captured: 1, 2, 4, 8, then every 16 up to 512.
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, *range(16, 513, 16))


class DecodeGraphs:
    """Captured decode graphs of one model over one KV cache.

    Args:
        model: the model (its forward writes KV and returns hidden states).
        kv_cache: the worker's ``"LKBTHD"`` cache tensor (CUDA).
        block_size: tokens per block.
        max_model_len: longest sequence (tokens); bounds block tables and the
            attention split layout.
        batch_sizes: sizes to capture (deduplicated, sorted).
        hidden_size: model width (for the output buffer).

    Raises:
        ValueError: the cache is not on CUDA or ``batch_sizes`` is empty.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        max_model_len: int,
        batch_sizes: Sequence[int],
    ) -> None:
        if kv_cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA KV cache, got {kv_cache.device}")
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {list(batch_sizes)}")
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.batch_sizes[-1]
        device = kv_cache.device
        n = self.max_batch_size
        self.max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Host staging (pinned: the copies to the static buffers are asynchronous).
        self._host_i64 = torch.zeros((3, n), dtype=torch.int64, pin_memory=True)
        self._host_seq_lens = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self._host_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, pin_memory=True)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.capture_memory_bytes = 0

    def metadata(self, batch_size: int) -> AttentionMetadata:
        """Attention metadata over the first ``batch_size`` rows of the static buffers."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            num_computed_tokens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            block_size=self.block_size,
            query_start_loc_cpu=tuple(range(batch_size + 1)),
            seq_lens_cpu=(self.max_model_len,) * batch_size,
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    def _forward(self, batch_size: int) -> torch.Tensor:
        return self.model(
            self.input_ids[:batch_size], self.positions[:batch_size], self.kv_cache, self.metadata(batch_size)
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size (largest first, one shared pool); log time and memory."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for batch_size in reversed(self.batch_sizes):
                self._forward(batch_size)  # warm-up: compiles kernels, settles allocations
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._outputs[batch_size] = self._forward(batch_size)
                self._graphs[batch_size] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.capture_memory_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) in %.2f s using %.1f MiB",
            len(self._graphs),
            self.batch_sizes[0],
            self.max_batch_size,
            self.capture_seconds,
            self.capture_memory_bytes / 2**20,
        )

    def graph_batch_size(self, num_seqs: int) -> int | None:
        """Smallest captured size ``>= num_seqs``, or ``None`` above the ladder."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        return None

    def run_decode(
        self, token_ids: Sequence[int], positions: Sequence[int], block_tables: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """One decode step: sequence ``i`` feeds ``token_ids[i]`` at ``positions[i]``.

        :meth:`prepare_decode` then :meth:`replay_prepared`.

        Returns:
            Hidden states ``[n, hidden_size]`` (see :meth:`replay`).
        """
        width = self.prepare_decode(token_ids, positions, block_tables)
        return self.replay_prepared(len(token_ids), width)

    def prepare_decode(
        self, token_ids: Sequence[int], positions: Sequence[int], block_tables: Sequence[Sequence[int]]
    ) -> int:
        """Fill the pinned host buffers for a decode step (see :meth:`run_decode`).

        Builds the slots, context lengths and block tables with numpy (no
        per-token Python work, no device sync). The buffers are reused next
        step: the caller must have synchronised on the previous step's results
        first (sampling does).

        Returns:
            The block-table width (blocks) to pass to :meth:`replay_prepared`.
        """
        n = len(token_ids)
        host = self._host_i64.numpy()
        ids, pos, slots = host[0, :n], host[1, :n], host[2, :n]
        ids[:] = token_ids
        pos[:] = positions
        width = int(pos.max()) // self.block_size + 1
        tables = self._host_tables.numpy()
        for i, table in enumerate(block_tables):
            row = table[:width]
            tables[i, : len(row)] = row
        seq_lens = self._host_seq_lens.numpy()[:n]
        seq_lens[:] = pos + 1
        block_ids = tables[np.arange(n), pos // self.block_size]
        slots[:] = block_ids.astype(np.int64) * self.block_size + pos % self.block_size
        return width

    def replay_prepared(self, n: int, width: int) -> torch.Tensor:
        """Replay on the first ``n`` rows filled by :meth:`prepare_decode` (returns as :meth:`replay`)."""
        return self.replay(
            self._host_i64[0, :n],
            self._host_i64[1, :n],
            self._host_i64[2, :n],
            self._host_seq_lens[:n],
            self._host_tables[:n, :width],
        )

    def replay(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """Run one decode step of ``n`` sequences through the captured graph.

        Args:
            input_ids, positions, slot_mapping: int64 ``[n]`` (host pinned or device).
            seq_lens: int32 ``[n]``.
            block_tables: int32 ``[n, w]`` with ``w <= ceil(max_model_len / block_size)``.

        Returns:
            Hidden states ``[n, hidden_size]`` (a view of the graph's output buffer,
            valid until the next replay).

        Raises:
            ValueError: ``n`` exceeds the largest captured size.
        """
        n = input_ids.shape[0]
        size = self.graph_batch_size(n)
        if size is None:
            raise ValueError(f"{n} sequences exceed the largest captured batch {self.max_batch_size}")
        width = block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(block_tables, non_blocking=True)
        if size > n:
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].zero_()
        self._graphs[size].replay()
        return self._outputs[size][:n]
