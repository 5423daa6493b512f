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
   The inputs are built with numpy in pinned host buffers
   (:class:`DecodeHostInputs`), two sets used in turn, so the host can build
   step N + 1 while step N's copies may still be queued (asynchronous
   scheduling); a token not yet known on the host is gathered on the device
   from the previous step's sampled ids (``feed``).

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
from engine.batch import SequenceInput
from engine.models.registry import CausalLM

logger = logging.getLogger(__name__)

#: Default batch sizes captured: 1, 2, 4, 8, then every 16 up to 512.
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, *range(16, 513, 16))


class DecodeHostInputs:
    """Host staging of one decode step's inputs, built with numpy (no per-token Python work).

    Block tables are written incrementally: a row that was last filled from
    the same list object (the KV cache manager's own list of the request,
    which only grows; a copy-on-write replaces the list) gets only its new
    block ids, so a steady decode batch converts almost no Python ints.

    Args:
        max_batch_size: most sequences (rows).
        max_blocks: widest block table (blocks).
        block_size: tokens per block.
        pin_memory: page-locked buffers (CUDA: the copies to the device are asynchronous).

    Attributes:
        i64: int64 ``[3, max_batch_size]``: token ids, positions, slots.
        seq_lens: int32 ``[max_batch_size]``: context lengths (tokens, the new one included).
        tables: int32 ``[max_batch_size, max_blocks]``: block tables.
        copied: CUDA event recorded after the last step built here (its copies
            out of these buffers, then its graph) was queued; :meth:`fill`
            waits on it before building again (``None`` on CPU or before the
            first use).
    """

    def __init__(self, max_batch_size: int, max_blocks: int, block_size: int, pin_memory: bool) -> None:
        self.block_size = block_size
        self.i64 = torch.zeros((3, max_batch_size), dtype=torch.int64, pin_memory=pin_memory)
        self.seq_lens = torch.zeros(max_batch_size, dtype=torch.int32, pin_memory=pin_memory)
        self.tables = torch.zeros((max_batch_size, max_blocks), dtype=torch.int32, pin_memory=pin_memory)
        self.copied: torch.cuda.Event | None = None
        self._i64 = self.i64.numpy()
        self._seq_lens = self.seq_lens.numpy()
        self._tables = self.tables.numpy()
        self._row_source: list[Sequence[int] | None] = [None] * max_batch_size  # list each row came from
        self._row_written = [0] * max_batch_size  # entries of that list already in the row

    def fill(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        num_blocks: int | None = None,
    ) -> int:
        """Write rows ``0 .. n - 1``: sequence ``i`` feeds ``token_ids[i]`` at ``positions[i]``.

        Waits for :attr:`copied` first (the previous step built here must have
        left these buffers).

        Args:
            token_ids, positions: one per sequence.
            block_tables: block ids per sequence.
            num_blocks: when given, every block id written must be in
                ``[0, num_blocks)`` (ids written before were checked then).

        Returns:
            The block-table width (blocks) the step reads.

        Raises:
            BlockIdsOutOfRange: a block id outside ``[0, num_blocks)``.
        """
        if self.copied is not None:
            self.copied.synchronize()
        n = len(token_ids)
        ids, pos, slots = self._i64[0, :n], self._i64[1, :n], self._i64[2, :n]
        ids[:] = token_ids
        pos[:] = positions
        bs = self.block_size
        width = int(pos.max()) // bs + 1
        tables, sources, written = self._tables, self._row_source, self._row_written
        max_blocks = tables.shape[1]
        for i, table in enumerate(block_tables):
            start = written[i] if sources[i] is table else 0
            end = min(len(table), max_blocks)
            if start < end:
                new = table[start:end]
                if num_blocks is not None and (min(new) < 0 or max(new) >= num_blocks):
                    sources[i] = None
                    raise BlockIdsOutOfRange(i, [b for b in new if not 0 <= b < num_blocks], num_blocks)
                tables[i, start:end] = new
            sources[i] = table
            written[i] = end
        self._seq_lens[:n] = pos + 1
        block_ids = tables[np.arange(n), pos // bs]
        slots[:] = block_ids.astype(np.int64) * bs + pos % bs
        return width

    def fill_decode(self, seqs: Sequence[SequenceInput], num_blocks: int, max_model_len: int) -> int:
        """:meth:`fill` from decode inputs (one token each), checked as
        ``engine.model_runner.check_inputs`` does, but only the block ids new
        since a row was last filled (the others were checked then).

        Returns:
            The block-table width (blocks) the step reads.

        Raises:
            ValueError: an input exceeds ``max_model_len`` or names a block
                outside ``[0, num_blocks)`` (the message names the request).
        """
        last = max(s.start_pos for s in seqs)
        if last >= max_model_len:
            bad = next(s for s in seqs if s.start_pos == last)
            raise ValueError(f"{bad.req_id}: {last + 1} tokens exceed max_model_len {max_model_len}")
        try:
            return self.fill(
                [s.token_ids[0] for s in seqs],
                [s.start_pos for s in seqs],
                [s.block_table for s in seqs],
                num_blocks,
            )
        except BlockIdsOutOfRange as exc:
            raise ValueError(
                f"{seqs[exc.row].req_id}: block ids {exc.block_ids} outside the cache of {num_blocks} blocks"
            ) from None


class BlockIdsOutOfRange(ValueError):
    """A block table names blocks outside the cache.

    Attributes:
        row: the row (sequence index) of the table.
        block_ids: the bad ids.
    """

    def __init__(self, row: int, block_ids: list[int], num_blocks: int) -> None:
        super().__init__(f"row {row}: block ids {block_ids} outside the cache of {num_blocks} blocks")
        self.row = row
        self.block_ids = block_ids


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
        # Host staging, two sets used in turn (pinned: the copies to the static buffers are asynchronous).
        self._staging = [DecodeHostInputs(n, self.max_blocks, block_size, pin_memory=True) for _ in range(2)]
        self._num_prepared = 0
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

    @property
    def _prepared(self) -> DecodeHostInputs:
        return self._staging[(self._num_prepared - 1) % 2]

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

    def prepare_inputs(self, seqs: Sequence[SequenceInput], num_blocks: int, max_model_len: int) -> int:
        """:meth:`prepare_decode` for decode inputs, checked (see :meth:`DecodeHostInputs.fill_decode`).

        Returns:
            The block-table width (blocks) to pass to :meth:`replay_prepared`.
        """
        host = self._staging[self._num_prepared % 2]
        self._num_prepared += 1
        return host.fill_decode(seqs, num_blocks, max_model_len)

    def prepare_decode(
        self, token_ids: Sequence[int], positions: Sequence[int], block_tables: Sequence[Sequence[int]]
    ) -> int:
        """Fill the next set of pinned host buffers for a decode step (see :meth:`run_decode`).

        Builds the slots, context lengths and block tables with numpy (see
        :meth:`DecodeHostInputs.fill`; no device sync unless the set's copies
        of two steps ago are still queued).

        Returns:
            The block-table width (blocks) to pass to :meth:`replay_prepared`.
        """
        host = self._staging[self._num_prepared % 2]
        self._num_prepared += 1
        return host.fill(token_ids, positions, block_tables)

    def replay_prepared(
        self, n: int, width: int, feed: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Replay on the first ``n`` rows filled by :meth:`prepare_decode` (returns as :meth:`replay`).

        Args:
            n: sequences.
            width: from :meth:`prepare_decode`.
            feed: ``(rows, token_ids)``, int64 device tensors of one length:
                after the copies, token ``token_ids[j]`` replaces the
                placeholder of row ``rows[j]`` (asynchronous scheduling).
        """
        host = self._prepared
        hidden = self.replay(
            host.i64[0, :n],
            host.i64[1, :n],
            host.i64[2, :n],
            host.seq_lens[:n],
            host.tables[:n, :width],
            feed,
        )
        if host.copied is None:
            host.copied = torch.cuda.Event()
        host.copied.record()
        return hidden

    def replay(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        feed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run one decode step of ``n`` sequences through the captured graph.

        Args:
            input_ids, positions, slot_mapping: int64 ``[n]`` (host pinned or device).
            seq_lens: int32 ``[n]``.
            block_tables: int32 ``[n, w]`` with ``w <= ceil(max_model_len / block_size)``.
            feed: placeholder tokens gathered on the device (see :meth:`replay_prepared`).

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
        if feed is not None:
            self.input_ids[feed[0]] = feed[1]
        if size > n:
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].zero_()
        self._graphs[size].replay()
        return self._outputs[size][:n]
