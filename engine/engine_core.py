"""The engine core: one scheduler plus one model executor, stepped by the caller.

A step is: ``Scheduler.schedule()`` picks the tokens to compute, the executor
runs them in one forward pass and samples, and ``Scheduler.update_from_output``
applies the sampled tokens. Not thread-safe: the serving layer runs the core on
one thread (``engine/engine_loop.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from engine.batch import SequenceInput, TokenLogprobs
from engine.request import EngineOutput, Request
from engine.scheduler import Scheduler

__all__ = ["EngineCore", "EngineOutput", "ModelExecutor"]


class ModelExecutor(Protocol):
    """Anything that computes a step (``engine.model_runner.ModelRunner``, or a fake in tests)."""

    def execute(self, seqs: list[SequenceInput]) -> Sequence[int | TokenLogprobs | None]:
        """Compute ``seqs`` in one pass; return per input the sampled token id, or its
        :class:`TokenLogprobs` when the request asked for them (``None`` if not sampled).
        For the prompt of an ``n`` > 1 request also fill ``SequenceInput.samples``."""
        ...

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy the keys and values of block ``src`` into block ``dst`` in every layer,
        for each ``(src, dst)`` in order (copy-on-write of forked completions)."""
        ...


class EngineCore:
    """Drives a :class:`Scheduler` and a :class:`ModelExecutor`.

    Args:
        scheduler: owns the requests and the KV cache bookkeeping.
        runner: computes the scheduled inputs.
    """

    def __init__(self, scheduler: Scheduler, runner: ModelExecutor) -> None:
        self.scheduler = scheduler
        self.runner = runner
        #: Tokens computed by the last step (0: nothing could be scheduled).
        self.last_num_scheduled_tokens = 0
        #: Called with a step's inputs right before they are computed (layer-wise KV streaming).
        self.before_execute: Callable[[list[SequenceInput]], None] | None = None

    def add_request(self, request: Request) -> None:
        """Queue a request (see :meth:`Scheduler.add_request` for the errors raised)."""
        self.scheduler.add_request(request)

    def abort_request(self, req_id: str, index: int | None = None) -> bool:
        """Drop a request (or only its completion ``index``) wherever it is and free its
        blocks; returns whether it was known."""
        return self.scheduler.abort_request(req_id, index)

    def has_unfinished_requests(self) -> bool:
        """Whether a step would have work (waiting or running requests)."""
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineOutput]:
        """Run one step; return one output per request that sampled a token."""
        scheduler_output = self.scheduler.schedule()
        self.last_num_scheduled_tokens = scheduler_output.total_num_scheduled_tokens
        if not scheduler_output.seqs:
            return []
        if scheduler_output.blocks_to_copy:
            self.runner.copy_blocks(scheduler_output.blocks_to_copy)
        if self.before_execute is not None:
            self.before_execute(scheduler_output.seqs)
        sampled = self.runner.execute(scheduler_output.seqs)
        return self.scheduler.update_from_output(scheduler_output, sampled)
