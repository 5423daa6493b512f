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

:meth:`ModelRunner.execute` is :meth:`ModelRunner.launch` then
:meth:`LaunchedStep.results`. ``launch`` queues the forward pass and the
sampling on the device and returns without a host sync when the batch can be
sampled on the device (no penalties, log-probabilities, prompt
log-probabilities or ``n`` > 1; see :meth:`engine.sampler.Sampler.sample_ids`);
the next step can then be launched before this one's ids reach the host
(asynchronous scheduling): an input whose last token is a placeholder
(``SequenceInput.feed_row``) takes it from the previous step's sampled ids on
the device. On CPU the same calls run synchronously.

On CUDA the runner uses the Triton attention backend and fused ops, and
replays captured CUDA graphs for pure decode steps (see
:mod:`engine.cuda_graphs`); ``attention_backend="torch"``, ``fused_ops="torch"``
and ``enforce_eager=True`` (or the environment variables
``TANDEM_ATTENTION_BACKEND``, ``TANDEM_FUSED_OPS``, ``TANDEM_ENFORCE_EAGER=1``,
read when the runner is built) force the reference paths for comparison.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.attention import (
    AttentionMetadata,
    KvCacheSpec,
    get_attention_backend,
    resolve_attention_backend,
)
from engine.batch import SequenceInput, TokenLogprobs
from engine.config import ModelConfig
from engine.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphs
from engine.models.fused_ops import resolve_fused_ops, set_fused_ops
from engine.models.loader import load_model
from engine.sampler import Sampler, compute_logprobs


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; other names pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass(frozen=True)
class StepTiming:
    """Where one step's time went (recorded when :attr:`ModelRunner.step_timings` is a list).

    Attributes:
        num_seqs: sequences in the step.
        decode: every sequence had one new token.
        graph: the step replayed a CUDA graph.
        prepare_s: host seconds from entering ``launch`` to launching the forward pass.
        gpu_s: device seconds from the forward's launch point to the sampled tokens
            (CUDA events; 0 on CPU).
        wall_s: host seconds from entering ``launch`` to the sampled ids on the host
            (with asynchronous scheduling this spans the next step's launch).
        started_s: ``time.perf_counter()`` on entering ``launch`` (to measure the
            period between steps, hence the time the GPU waits on the host).
    """

    num_seqs: int
    decode: bool
    graph: bool
    prepare_s: float
    gpu_s: float
    wall_s: float
    started_s: float


class LaunchedStep:
    """A step queued on the device; :meth:`results` waits for its sampled ids.

    Args:
        num_seqs: inputs of the step.
        sampled_rows: indices of the inputs that sample, in order.
        sampled_ids: int64 ``[len(sampled_rows)]`` on the device, or ``None``
            when ``results`` are already on the host.
        results: the host results when ``sampled_ids`` is ``None``.
        on_done: called once, after the first :meth:`results` (step timing).
    """

    def __init__(
        self,
        num_seqs: int,
        sampled_rows: list[int],
        sampled_ids: torch.Tensor | None,
        results: list[int | TokenLogprobs | None] | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.num_seqs = num_seqs
        self.sampled_rows = sampled_rows
        self.sampled_ids = sampled_ids
        self._results = results
        self._on_done = on_done
        self._positions: dict[int, int] | None = None

    def position_of(self, row: int) -> int:
        """Index in :attr:`sampled_ids` of input ``row``'s token.

        Raises:
            ValueError: input ``row`` does not sample.
        """
        if self._positions is None:
            self._positions = {r: i for i, r in enumerate(self.sampled_rows)}
        position = self._positions.get(row)
        if position is None:
            raise ValueError(f"input {row} of the previous step samples no token")
        return position

    def results(self) -> list[int | TokenLogprobs | None]:
        """Per input, as :meth:`ModelRunner.execute` returns (syncs on the sampled ids once)."""
        if self._results is None:
            assert self.sampled_ids is not None
            results: list[int | TokenLogprobs | None] = [None] * self.num_seqs
            for row, token in zip(self.sampled_rows, self.sampled_ids.tolist(), strict=True):
                results[row] = token
            self._results = results
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done()
        return self._results


def _env_override(name: str, value: str) -> str:
    return os.environ.get(name) or value


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
        attention_backend: name of the registered attention implementation, or
            ``"auto"`` (Triton on CUDA, torch otherwise); env ``TANDEM_ATTENTION_BACKEND`` overrides.
        fused_ops: ``"auto"`` (Triton RMSNorm/RoPE/SiLU kernels on CUDA), ``"triton"``
            or ``"torch"``; env ``TANDEM_FUSED_OPS`` overrides.
        enforce_eager: never capture CUDA graphs (env ``TANDEM_ENFORCE_EAGER=1`` too).
        cuda_graph_batch_sizes: decode batch sizes to capture (default
            :data:`engine.cuda_graphs.DEFAULT_BATCH_SIZES`, capped at 256).
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
        attention_backend: str = "auto",
        load_format: str = "auto",
        fused_ops: str = "auto",
        enforce_eager: bool = False,
        cuda_graph_batch_sizes: Sequence[int] | None = None,
    ) -> None:
        self.model_config = model_config
        self.device = torch.device(resolve_device(device))
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.attention_backend = resolve_attention_backend(
            _env_override("TANDEM_ATTENTION_BACKEND", attention_backend), self.device
        )
        self.model = load_model(
            model_config,
            dtype,
            self.device,
            get_attention_backend(self.attention_backend),
            load_format=load_format,
            seed=seed,
        )
        self.fused_ops = resolve_fused_ops(_env_override("TANDEM_FUSED_OPS", fused_ops), self.device)
        set_fused_ops(self.model, self.fused_ops)  # type: ignore[arg-type]
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
        #: Per-step timings, recorded while this is a list (benchmarks set it).
        self.step_timings: list[StepTiming] | None = None
        self.graphs: DecodeGraphs | None = None
        enforce_eager = enforce_eager or os.environ.get("TANDEM_ENFORCE_EAGER") == "1"
        if self.device.type == "cuda" and self.attention_backend == "triton" and not enforce_eager:
            sizes = cuda_graph_batch_sizes or [b for b in DEFAULT_BATCH_SIZES if b <= 256]
            self.graphs = DecodeGraphs(self.model, self.kv_cache, block_size, max_model_len, sizes)
            self.graphs.capture()

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

    def execute(self, seqs: Sequence[SequenceInput]) -> list[int | TokenLogprobs | None]:
        """Compute one step and sample (:meth:`launch`, then wait for the results).

        Args:
            seqs: one slice per scheduled request (see :class:`SequenceInput`);
                none may hold a placeholder.

        Returns:
            Per input, ``None`` when ``sample`` is not set, else the sampled token
            id, or its :class:`TokenLogprobs` when ``sampling.logprobs`` is set.
            Inputs get their output fields ``prompt_logprobs`` and ``samples``
            filled when their sampling parameters ask for them.

        Raises:
            ValueError: see :meth:`launch`.
        """
        if not seqs:
            return []
        return self.launch(seqs).results()

    @torch.inference_mode()
    def launch(self, seqs: Sequence[SequenceInput], previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one step's forward pass and sampling on the device.

        Args:
            seqs: one slice per scheduled request (at least one).
            previous: the step launched before, whose sampled ids feed the
                inputs with a ``feed_row``.

        Returns:
            The step; its sampled ids stay on the device (no host sync) unless
            an input asks for penalties, log-probabilities, prompt
            log-probabilities or ``n`` > 1 (then they are computed now).

        Raises:
            ValueError: an input exceeds ``max_model_len``, has a block table
                too short for its tokens, names a block outside the cache, or
                has a ``feed_row`` that ``previous`` cannot serve from the device.
        """
        start = time.perf_counter()
        graphs = self.graphs
        use_graph = (
            graphs is not None
            and len(seqs) <= graphs.max_batch_size
            and all(len(s.token_ids) == 1 for s in seqs)
        )
        if not use_graph:
            self._check_inputs(seqs)  # the graph path checks while it builds its inputs
        timer = _StepTimer(self.device) if self.step_timings is not None else None
        feed = _feed_tokens(seqs, previous, self.device)
        hidden, query_start_loc, graph = self._forward(seqs, timer, feed, use_graph)
        self._fill_prompt_logprobs(seqs, hidden, query_start_loc)
        sampled = [i for i, s in enumerate(seqs) if s.sample]
        if not sampled:
            return LaunchedStep(len(seqs), sampled, None, [None] * len(seqs))
        if len(sampled) == len(seqs) and hidden.shape[0] == len(seqs):
            last_hidden = hidden  # one row per sequence (decode): no gather
        else:
            last_rows = _to_device([int(query_start_loc[i + 1]) - 1 for i in sampled], self.device)
            last_hidden = hidden[last_rows]
        logits = self.model.compute_logits(last_hidden)
        sampled_seqs = [seqs[i] for i in sampled]
        ids = self.sampler.sample_ids(logits, sampled_seqs)
        results: list[int | TokenLogprobs | None] | None = None
        if ids is None:
            results = [None] * len(seqs)
            for i, token in zip(sampled, self.sampler.sample(logits, sampled_seqs), strict=True):
                results[i] = token
        on_done = None
        if timer is not None:
            timer.end()
            decode = hidden.shape[0] == len(seqs)
            on_done = self._timing_recorder(timer, len(seqs), decode, graph, start)
        return LaunchedStep(len(seqs), sampled, ids, results, on_done)

    def _timing_recorder(
        self, timer: _StepTimer, num_seqs: int, decode: bool, graph: bool, start: float
    ) -> Callable[[], None]:
        def record() -> None:
            if self.step_timings is not None:
                self.step_timings.append(timer.finish(num_seqs, decode, graph, start))

        return record

    def _forward(
        self,
        seqs: Sequence[SequenceInput],
        timer: _StepTimer | None,
        feed: tuple[list[int], torch.Tensor] | None,
        use_graph: bool,
    ) -> tuple[torch.Tensor, Sequence[int], bool]:
        """Hidden states ``[T, hidden]`` of the step, its query row offsets, and
        whether a CUDA graph ran (pure decode batches within the captured sizes).

        ``feed``: ``(input rows, token ids on the device)`` replacing those
        inputs' last (placeholder) token."""
        graphs = self.graphs
        if use_graph:
            assert graphs is not None
            width = graphs.prepare_inputs(seqs, self.num_kv_blocks, self.max_model_len)
            if timer is not None:
                timer.launch()  # after the host-side input build: the GPU is idle until here
            graph_feed = None
            if feed is not None:
                graph_feed = (_to_device(feed[0], self.device), feed[1])
            hidden = graphs.replay_prepared(len(seqs), width, graph_feed)
            return hidden, range(len(seqs) + 1), True
        metadata = AttentionMetadata.build(
            [s.start_pos for s in seqs],
            [len(s.token_ids) for s in seqs],
            [s.block_table for s in seqs],
            self.block_size,
            self.device,
        )
        input_ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.int64)
        positions = torch.cat([torch.arange(s.start_pos, s.end_pos, dtype=torch.int64) for s in seqs])
        if timer is not None:
            timer.launch()
        device_ids = input_ids.to(self.device, non_blocking=True)
        if feed is not None:
            last = [metadata.query_start_loc_cpu[i + 1] - 1 for i in feed[0]]
            device_ids[_to_device(last, self.device)] = feed[1]
        hidden = self.model(
            device_ids,
            positions.to(self.device, non_blocking=True),
            self.kv_cache,
            metadata,
        )
        return hidden, metadata.query_start_loc_cpu, False

    def _fill_prompt_logprobs(
        self,
        seqs: Sequence[SequenceInput],
        hidden: torch.Tensor,
        query_start_loc: Sequence[int] | torch.Tensor,
    ) -> None:
        """Set ``prompt_logprobs`` of each input asking for them: the row at position
        ``p`` gives the log-softmax (float32) of prompt token ``p + 1``."""
        for i, s in enumerate(seqs):
            num_top = s.sampling.prompt_logprobs
            last = min(s.end_pos, len(s.prompt_token_ids) - 1)  # last prompt position predicted
            if num_top is None or s.start_pos >= last:
                continue
            first_row = int(query_start_loc[i])
            logits = self.model.compute_logits(hidden[first_row : first_row + last - s.start_pos]).float()
            targets = list(s.prompt_token_ids[s.start_pos + 1 : last + 1])
            s.prompt_logprobs = compute_logprobs(logits, targets, [num_top] * len(targets))

    @torch.inference_mode()
    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy block ``src``'s keys and values into block ``dst`` in every layer.

        Args:
            pairs: ``(src_block_id, dst_block_id)``; every ``dst`` differs from
                every ``src`` (copy-on-write targets are fresh blocks).
        """
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]  # layout LKBTHD: blocks on axis 2

    def _check_inputs(self, seqs: Sequence[SequenceInput]) -> None:
        check_inputs(seqs, self.num_kv_blocks, self.block_size, self.max_model_len)


def check_inputs(seqs: Sequence[SequenceInput], num_blocks: int, block_size: int, max_model_len: int) -> None:
    """Reject inputs past ``max_model_len`` (tokens) or with block ids outside ``[0, num_blocks)``.

    Raises:
        ValueError: naming the request.
    """
    for s in seqs:
        end = s.end_pos
        if end > max_model_len:
            raise ValueError(f"{s.req_id}: {end} tokens exceed max_model_len {max_model_len}")
        table = s.block_table
        num_needed = -(-end // block_size)
        needed = table if len(table) == num_needed else table[:num_needed]
        if not needed or (min(needed) >= 0 and max(needed) < num_blocks):
            continue  # min/max run in C: no per-block Python work on the hot path
        bad = [b for b in needed if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"{s.req_id}: block ids {bad} outside the cache of {num_blocks} blocks")


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 tensor of ``values`` on ``device`` (an asynchronous copy on CUDA)."""
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def _feed_tokens(
    seqs: Sequence[SequenceInput], previous: LaunchedStep | None, device: torch.device
) -> tuple[list[int], torch.Tensor] | None:
    """``(rows, token ids)``: the inputs whose last token is a placeholder, and the
    ids ``previous`` sampled for them, gathered on the device (no host sync)."""
    rows = [i for i, s in enumerate(seqs) if s.feed_row is not None]
    if not rows:
        return None
    if previous is None or previous.sampled_ids is None:
        raise ValueError("inputs with a feed_row need the previous step's sampled ids on the device")
    positions = [previous.position_of(seqs[i].feed_row) for i in rows]  # type: ignore[arg-type]
    return rows, previous.sampled_ids[_to_device(positions, device)]


class _StepTimer:
    """Host clock and CUDA events around one step (see :class:`StepTiming`)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._launch_s = 0.0
        if self._cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def launch(self) -> None:
        """Mark the point where inputs are ready and device work starts."""
        self._launch_s = time.perf_counter()
        if self._cuda:
            self._events[0].record()

    def end(self) -> None:
        """Mark the end of the step's device work (after sampling), without waiting for it."""
        if self._cuda:
            self._events[1].record()

    def finish(self, num_seqs: int, decode: bool, graph: bool, start_s: float) -> StepTiming:
        """Close the step (synchronises the end event on CUDA)."""
        gpu_s = 0.0
        if self._cuda:
            self._events[1].synchronize()
            gpu_s = self._events[0].elapsed_time(self._events[1]) / 1000
        end = time.perf_counter()
        return StepTiming(num_seqs, decode, graph, self._launch_s - start_s, gpu_s, end - start_s, start_s)
