"""The offline API: generate completions for a list of prompts in this process.

No servers, no KV transfer: one :class:`~engine.engine_core.EngineCore` (the
same scheduler and model runner a worker uses) continuously batches every
prompt given to :meth:`LLM.generate`. It is both a library entry point and the
colocated baseline the disaggregated deployment is measured against.

A call to :meth:`LLM.generate`:

1. tokenizes the text prompts (token-id prompts pass through) and checks ids;
2. queues one request per prompt, by ``priority`` (lower first) then first
   come first served; a prompt with ``n`` > 1 is computed once and forks into
   ``n`` completions that share its KV blocks (copy-on-write);
3. steps the engine core until every request finishes: each step mixes prompt
   chunks and decode tokens under the token budget, and preempts (recomputes
   later) the newest requests when KV blocks run out;
4. detokenizes each request's tokens as they arrive, ends a request whose text
   reaches one of its stop strings (the text is cut before it), and returns
   the outputs in the order of the prompts.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import torch
from tqdm.auto import tqdm

from engine.batch import TokenLogprobs
from engine.block_pool import BlockPool
from engine.config import ModelConfig, resolve_dtype, resolve_max_model_len
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_core import EngineCore
from engine.errors import InvalidRequest
from engine.kv_cache_manager import KVCacheManager
from engine.model_runner import ModelRunner, resolve_device
from engine.request import EngineOutput, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.stop import StopStringMatcher
from engine.tokenizer import Tokenizer
from engine.worker_config import WorkerConfig

#: One prompt: text, or token ids used as they are (no special tokens added).
PromptType = str | Sequence[int]


@dataclass
class CompletionOutput:
    """One completion of a prompt.

    Attributes:
        index: position among the prompt's completions (0 for the first).
        text: ``tokenizer.decode(token_ids)`` with special tokens skipped, cut
            just before the first stop string (``""`` when the checkpoint has
            no ``tokenizer.json``).
        token_ids: generated token ids, the final end-of-sequence or stop token
            (or the token that completed a stop string) included.
        finish_reason: ``"stop"`` (end-of-sequence token, stop token or stop
            string) or ``"length"`` (``max_tokens`` or ``max_model_len`` reached).
        logprobs: per generated token, its log-probability and the top ones,
            when ``SamplingParams.logprobs`` is set; else ``None``.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestOutput:
    """The result of one prompt.

    Attributes:
        request_id: id of the request inside this :class:`LLM` (a decimal counter).
        prompt: the prompt text, or ``None`` for a token-id prompt.
        prompt_token_ids: the tokens the model saw (text prompts include the
            special tokens the tokenizer adds, e.g. BOS).
        outputs: ``SamplingParams.n`` completions, ``outputs[i].index == i``.
        prompt_logprobs: with ``SamplingParams.prompt_logprobs`` set, one entry
            per prompt token: ``None`` for the first (nothing predicts it), then
            the token's log-probability given the tokens before it and the top
            ones (as vLLM); else ``None``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class LLM:
    """A model with its KV cache, scheduler and tokenizer, for offline generation.

    Args:
        model: checkpoint directory (config.json, safetensors weights,
            tokenizer.json; with ``load_format="dummy"`` config.json suffices).
        dtype: ``"auto"`` (float32 on CPU; on CUDA the checkpoint's dtype or
            bfloat16), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"auto"`` (cuda when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        block_size: tokens per KV block.
        num_kv_blocks: blocks in the KV cache; ``None`` sizes it from
            ``kv_cache_memory_bytes``.
        kv_cache_memory_bytes: KV cache budget in bytes when ``num_kv_blocks`` is ``None``.
        max_model_len: longest prompt plus completion (tokens); ``None`` is the
            model's limit (see :func:`engine.config.resolve_max_model_len`).
        max_num_seqs: most requests in one step's batch.
        max_num_batched_tokens: most tokens computed in one step; longer
            prompts are prefilled in chunks.
        load_format: ``"auto"``, ``"safetensors"`` or ``"dummy"`` (seeded
            random weights from config.json alone).
        seed: seed of unseeded sampling and of ``"dummy"`` weights.
        kernels: ``"auto"`` (Triton kernels on CUDA, torch on CPU), ``"triton"``
            or ``"torch"`` (the reference path, for comparison).
        enforce_eager: never capture CUDA graphs for decode steps (as vLLM's option).
        async_scheduling: schedule and launch each decode step while the
            previous one still runs, so the scheduler and the detokenisation
            overlap the device (see :mod:`engine.engine_core`; outputs are
            those of the synchronous engine).

    Raises:
        ValueError: bad checkpoint, dtype, load format, device or KV budget.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = WorkerConfig.block_size,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int = WorkerConfig.kv_cache_memory_bytes,
        max_model_len: int | None = None,
        max_num_seqs: int = WorkerConfig.max_num_seqs,
        max_num_batched_tokens: int = WorkerConfig.max_num_batched_tokens,
        load_format: str = "auto",
        seed: int = 0,
        kernels: str = WorkerConfig.kernels,
        enforce_eager: bool = False,
        async_scheduling: bool = False,
    ) -> None:
        self.model_config = ModelConfig.from_pretrained(model)
        device = resolve_device(_check_device(device))
        self.max_model_len = resolve_max_model_len(self.model_config, max_model_len)
        self.runner = ModelRunner(
            self.model_config,
            device=device,
            dtype=resolve_dtype(dtype, self.model_config, device),
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=self.max_model_len,
            seed=seed,
            load_format=load_format,
            attention_backend=kernels,
            fused_ops=kernels,
            enforce_eager=enforce_eager,
        )
        scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=self.max_model_len,
            ),
            KVCacheManager(BlockPool(self.runner.num_kv_blocks, block_size)),
        )
        self.engine_core = EngineCore(scheduler, self.runner, async_scheduling=async_scheduling)
        has_tokenizer = (self.model_config.path / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_pretrained(self.model_config.path) if has_tokenizer else None
        self._request_counter = itertools.count()

    @overload
    def generate(
        self,
        prompts: PromptType,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]: ...

    @overload
    def generate(
        self,
        prompts: Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]: ...

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt, continuously batched; blocks until all finish.

        Args:
            prompts: one prompt or a sequence of prompts; a prompt is a string
                or a list of token ids (a flat list of ints is ONE prompt).
            sampling_params: one for all prompts, one per prompt, or ``None``
                for :class:`SamplingParams` defaults.
            use_tqdm: show a progress bar (prompts finished, output tokens/s) on stderr.
            priority: one per prompt (as vLLM): lower values are scheduled first
                and preempted last; ``None`` gives every prompt 0.

        Returns:
            One :class:`RequestOutput` per prompt, in the order given.

        Raises:
            InvalidRequest: an empty or too long prompt, a token id outside the
                vocabulary, text or stop strings without a tokenizer, or a
                number of sampling parameters or priorities that differs from
                the number of prompts.
            CapacityExceeded: a request could need more KV blocks than the cache holds.
        """
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        priorities = [0] * len(prompt_list) if priority is None else list(priority)
        if len(priorities) != len(prompt_list):
            raise InvalidRequest("priority", f"{len(priorities)} priorities for {len(prompt_list)} prompts")
        trackers = {}
        for prompt, sp, prio in zip(prompt_list, params, priorities, strict=True):
            tracker = self._make_tracker(prompt, sp, prio)
            trackers[tracker.request.req_id] = tracker
        try:
            for tracker in trackers.values():
                self.engine_core.add_request(tracker.request)
            self._run_to_completion(trackers, use_tqdm)
        finally:
            for req_id in trackers:  # only left over after an error
                self.engine_core.abort_request(req_id)
        return [tracker.request_output() for tracker in trackers.values()]

    def _make_tracker(self, prompt: PromptType, sp: SamplingParams, priority: int) -> _RequestTracker:
        if sp.stop and self.tokenizer is None:
            raise InvalidRequest(
                "sampling.stop", f"no tokenizer.json in {self.model_config.path} to match text"
            )
        request = Request(
            req_id=str(next(self._request_counter)),
            prompt_token_ids=self._prompt_token_ids(prompt),
            sampling=sp,
            eos_token_ids=self.model_config.eos_token_ids,
            priority=priority,
        )
        completions = []
        for _ in range(sp.n):
            detokenizer = None
            if self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
            completions.append(_Completion(detokenizer, StopStringMatcher(sp.stop)))
        return _RequestTracker(prompt, request, completions)

    def _run_to_completion(self, trackers: dict[str, _RequestTracker], use_tqdm: bool) -> None:
        start = time.perf_counter()
        num_output_tokens = 0
        with tqdm(total=len(trackers), desc="Generating", unit="prompt", disable=not use_tqdm) as bar:
            while self.engine_core.has_unfinished_requests():
                finished = 0
                for output in self.engine_core.step():
                    num_output_tokens += len(output.new_token_ids)
                    tracker = trackers[output.req_id]
                    completion = tracker.completions[output.index]
                    completion.add(output)
                    if output.prompt_logprobs is not None:
                        tracker.prompt_logprobs = output.prompt_logprobs
                    if completion.stopper.stopped and not output.finished:  # a stop string ended the text
                        self.engine_core.abort_request(output.req_id, index=output.index)
                    finished += completion.done and tracker.done
                if finished:
                    rate = num_output_tokens / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rate:.1f} output tok/s", refresh=False)
                    bar.update(finished)

    def _prompt_token_ids(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(
                    "prompt", f"no tokenizer.json in {self.model_config.path} to encode text"
                )
            return self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        vocab_size = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest("prompt_token_ids", f"ids {bad[:5]} are not in [0, {vocab_size})")
        return token_ids


@dataclass
class _Completion:
    """One completion's tokens, text (detokenized, cut at a stop string) and log-probabilities."""

    detokenizer: IncrementalDetokenizer | None
    stopper: StopStringMatcher
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        """Whether the completion ended (finished in the engine, or cut by a stop string)."""
        return self.finish_reason is not None

    def add(self, output: EngineOutput) -> None:
        """Take one step's output (new tokens, log-probabilities, finish)."""
        self.token_ids.extend(output.new_token_ids)
        self.logprobs.extend(output.logprobs)
        if self.detokenizer is not None:
            self.text += self.stopper.push(self.detokenizer.push(output.new_token_ids))
            if output.finished and not self.stopper.stopped:
                self.text += self.stopper.push(self.detokenizer.finish())
                self.text += self.stopper.flush()
        if self.stopper.stopped:
            self.finish_reason = "stop"
        elif output.finished:
            self.finish_reason = output.finish_reason


@dataclass
class _RequestTracker:
    """One prompt's request and its completions as their outputs arrive."""

    prompt: PromptType
    request: Request
    completions: list[_Completion]
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def done(self) -> bool:
        """Whether every completion ended."""
        return all(c.done for c in self.completions)

    def request_output(self) -> RequestOutput:
        request = self.request
        outputs = []
        for index, completion in enumerate(self.completions):
            assert completion.finish_reason is not None, (request.req_id, index)
            outputs.append(
                CompletionOutput(
                    index=index,
                    text=completion.text,
                    token_ids=completion.token_ids,
                    finish_reason=completion.finish_reason,
                    logprobs=completion.logprobs if request.sampling.logprobs is not None else None,
                )
            )
        prompt_logprobs: list[TokenLogprobs | None] | None = None
        if request.sampling.prompt_logprobs is not None:
            prompt_logprobs = [None, *(self.prompt_logprobs or [])]
        return RequestOutput(
            request_id=request.req_id,
            prompt=self.prompt if isinstance(self.prompt, str) else None,
            prompt_token_ids=list(request.prompt_token_ids),
            outputs=outputs,
            prompt_logprobs=prompt_logprobs,
        )


def _check_device(device: str) -> str:
    """``device`` unchanged when it names one this process can use.

    Raises:
        ValueError: not ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, or CUDA
            (or GPU ``N``) is not available.
    """
    kind, _, index = device.partition(":")
    if device in ("auto", "cpu") or (kind == "cuda" and (not index or index.isdigit())):
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available in this process")
        if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
        return device
    raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """``prompts`` as a list of prompts; a string or a flat list of ints is one prompt."""
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(item, int) for item in items):
        return [items]  # type: ignore[list-item]  # one token-id prompt
    for item in items:
        if not isinstance(item, str | Sequence):
            raise InvalidRequest(
                "prompt", f"must be a string or a list of token ids, got {type(item).__name__}"
            )
    return items  # type: ignore[return-value]


def _as_params_list(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise InvalidRequest(
            "sampling_params", f"{len(params)} sampling parameters for {num_prompts} prompts"
        )
    return params
