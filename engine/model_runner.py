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
from collections.abc import Sequence
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
        prepare_s: host seconds from entering ``execute`` to launching the forward pass.
        gpu_s: device seconds from the forward's launch point to the sampled tokens
            (CUDA events; 0 on CPU).
        wall_s: host seconds spent in ``execute``.
        started_s: ``time.perf_counter()`` on entering ``execute`` (to measure the
            period between steps, hence the time the GPU waits on the host).
    """

    num_seqs: int
    decode: bool
    graph: bool
    prepare_s: float
    gpu_s: float
    wall_s: float
    started_s: float


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

    @torch.inference_mode()
    def execute(self, seqs: Sequence[SequenceInput]) -> list[int | TokenLogprobs | None]:
        """Compute one step and sample.

        Args:
            seqs: one slice per scheduled request (see :class:`SequenceInput`).

        Returns:
            Per input, ``None`` when ``sample`` is not set, else the sampled token
            id, or its :class:`TokenLogprobs` when ``sampling.logprobs`` is set.
            Inputs get their output fields ``prompt_logprobs`` and ``samples``
            filled when their sampling parameters ask for them.

        Raises:
            ValueError: an input exceeds ``max_model_len``, has a block table
                too short for its tokens, or names a block outside the cache.
        """
        if not seqs:
            return []
        start = time.perf_counter()
        self._check_inputs(seqs)
        timer = _StepTimer(self.device) if self.step_timings is not None else None
        hidden, query_start_loc, graph = self._forward(seqs, timer)
        self._fill_prompt_logprobs(seqs, hidden, query_start_loc)
        sampled = [i for i, s in enumerate(seqs) if s.sample]
        results: list[int | TokenLogprobs | None] = [None] * len(seqs)
        if not sampled:
            return results
        if len(sampled) == len(seqs) and hidden.shape[0] == len(seqs):
            last_hidden = hidden  # one row per sequence (decode): no gather
        else:
            last_rows = torch.tensor([query_start_loc[i + 1] - 1 for i in sampled], device=self.device)
            last_hidden = hidden[last_rows]
        logits = self.model.compute_logits(last_hidden)
        tokens = self.sampler.sample(logits, [seqs[i] for i in sampled])
        for i, token in zip(sampled, tokens, strict=True):
            results[i] = token
        if timer is not None and self.step_timings is not None:
            decode = hidden.shape[0] == len(seqs)
            self.step_timings.append(timer.finish(len(seqs), decode, graph, start))
        return results

    def _forward(
        self, seqs: Sequence[SequenceInput], timer: _StepTimer | None
    ) -> tuple[torch.Tensor, Sequence[int], bool]:
        """Hidden states ``[T, hidden]`` of the step, its query row offsets, and
        whether a CUDA graph ran (pure decode batches within the captured sizes)."""
        graphs = self.graphs
        if (
            graphs is not None
            and len(seqs) <= graphs.max_batch_size
            and all(len(s.token_ids) == 1 for s in seqs)
        ):
            width = graphs.prepare_decode(
                [s.token_ids[0] for s in seqs], [s.start_pos for s in seqs], [s.block_table for s in seqs]
            )
            if timer is not None:
                timer.launch()  # after the host-side input build: the GPU is idle until here
            hidden = graphs.replay_prepared(len(seqs), width)
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
        hidden = self.model(
            input_ids.to(self.device, non_blocking=True),
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
        num_blocks, block_size = self.num_kv_blocks, self.block_size
        for s in seqs:
            if s.end_pos > self.max_model_len:
                raise ValueError(f"{s.req_id}: {s.end_pos} tokens exceed max_model_len {self.max_model_len}")
            needed = s.block_table[: -(-s.end_pos // block_size)]
            if not needed or (min(needed) >= 0 and max(needed) < num_blocks):
                continue  # min/max run in C: no per-block Python work on the hot path
            bad = [b for b in needed if not 0 <= b < num_blocks]
            if bad:
                raise ValueError(
                    f"{s.req_id}: block ids {bad} outside the cache of {self.num_kv_blocks} blocks"
                )


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

    def finish(self, num_seqs: int, decode: bool, graph: bool, start_s: float) -> StepTiming:
        """Close the step (synchronises the end event on CUDA)."""
        gpu_s = 0.0
        if self._cuda:
            self._events[1].record()
            self._events[1].synchronize()
            gpu_s = self._events[0].elapsed_time(self._events[1]) / 1000
        end = time.perf_counter()
        return StepTiming(num_seqs, decode, graph, self._launch_s - start_s, gpu_s, end - start_s, start_s)
