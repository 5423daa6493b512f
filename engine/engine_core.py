"""The engine core: one scheduler plus one model executor, stepped by the caller.

A step is: ``Scheduler.schedule()`` picks the tokens to compute, the executor
runs them in one forward pass and samples, and ``Scheduler.update_from_output``
applies the sampled tokens. Not thread-safe: the serving layer runs the core on
one thread (``engine/engine_loop.py``).

Asynchronous scheduling (``async_scheduling=True``, after vLLM's
``--async-scheduling``; Tandem's code): each :meth:`EngineCore.step`

1. launches step N + 1 (:meth:`Scheduler.schedule_ahead`) while step N still
   runs on the device; a running decode request's input is a placeholder the
   runner fills on the device from step N's sampled ids (no host sync);
2. waits for step N's sampled ids and applies them
   (:meth:`Scheduler.update_from_output`: stop conditions one step late; the
   wasted row of a request that stopped at step N is dropped), while the
   device computes step N + 1;
3. returns step N's outputs, so the caller's bookkeeping (detokenisation) also
   overlaps step N + 1.

Every call returns the outputs of exactly one step, so a caller that aborts a
request after its last wanted token never sees another one. A step whose
successor needs the host to know its tokens runs synchronously (waited for
before the next is scheduled): when one of its sampling inputs has penalties,
log-probabilities, prompt log-probabilities, ``n`` > 1 (a fork), samples the
first token of a prompt (a prefill chunk that samples) or holds its blocks on
finish (prefill worker); when the layer-wise streaming hook
(``before_execute``) is set; and when the next step would preempt a request or
copy a block (``schedule_ahead`` declines). Blocks of requests that end while
a step may still write them are freed once it completes
(:meth:`Scheduler.mark_in_flight`). On CPU the device runs synchronously: the
calls are the same, only nothing overlaps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.batch import SequenceInput, TokenLogprobs
from engine.request import EngineOutput, Request
from engine.scheduler import Scheduler, SchedulerOutput

__all__ = ["AsyncModelExecutor", "EngineCore", "EngineOutput", "LaunchedStepLike", "ModelExecutor"]


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


class LaunchedStepLike(Protocol):
    """A step queued on the device (``engine.model_runner.LaunchedStep``)."""

    def results(self) -> Sequence[int | TokenLogprobs | None]:
        """Wait for the step; per input what :meth:`ModelExecutor.execute` returns."""
        ...


class AsyncModelExecutor(ModelExecutor, Protocol):
    """An executor that can queue a step without waiting for it (asynchronous scheduling)."""

    def launch(self, seqs: list[SequenceInput], previous: LaunchedStepLike | None = None) -> LaunchedStepLike:
        """Queue ``seqs``; an input with ``feed_row`` takes its last token from the ids
        ``previous`` sampled for its input ``feed_row``, on the device."""
        ...


@dataclass
class _InFlight:
    """A launched step and what was scheduled for it."""

    scheduled: SchedulerOutput
    launched: LaunchedStepLike
    can_run_ahead: bool


class EngineCore:
    """Drives a :class:`Scheduler` and a :class:`ModelExecutor`.

    Args:
        scheduler: owns the requests and the KV cache bookkeeping.
        runner: computes the scheduled inputs.
        async_scheduling: schedule and launch step N + 1 before applying step
            N's results (see the module docstring); ``runner`` must have
            ``launch`` (:class:`AsyncModelExecutor`).

    Raises:
        ValueError: ``async_scheduling`` with a runner that cannot launch.
    """

    def __init__(
        self, scheduler: Scheduler, runner: ModelExecutor, *, async_scheduling: bool = False
    ) -> None:
        if async_scheduling and not hasattr(runner, "launch"):
            raise ValueError(f"async_scheduling needs a runner with launch(), got {type(runner).__name__}")
        self.scheduler = scheduler
        self.runner = runner
        #: See ``async_scheduling`` above; may be changed while no step is in flight
        #: (``has_unfinished_requests()`` is False).
        self.async_scheduling = async_scheduling
        #: Tokens computed by the last step (0: nothing could be scheduled).
        self.last_num_scheduled_tokens = 0
        #: Called with a step's inputs right before they are computed (layer-wise KV streaming).
        self.before_execute: Callable[[list[SequenceInput]], None] | None = None
        #: Steps launched while the previous step was still in flight (asynchronous scheduling).
        self.num_async_steps = 0
        #: Steps launched with nothing in flight.
        self.num_sync_steps = 0
        self._in_flight: _InFlight | None = None

    def add_request(self, request: Request) -> None:
        """Queue a request (see :meth:`Scheduler.add_request` for the errors raised)."""
        self.scheduler.add_request(request)

    def abort_request(self, req_id: str, index: int | None = None) -> bool:
        """Drop a request (or only its completion ``index``) wherever it is and free its
        blocks (once no step in flight writes them); returns whether it was known."""
        return self.scheduler.abort_request(req_id, index)

    def has_unfinished_requests(self) -> bool:
        """Whether a step would have work (waiting or running requests, or a step in flight)."""
        return self._in_flight is not None or self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineOutput]:
        """Run one step; return one output per request that sampled a token.

        With asynchronous scheduling the outputs are those of the step launched
        by the previous call (or by this one when nothing was in flight), and
        the next step may be left running on the device.
        """
        if self.async_scheduling:
            return self._step_async()
        scheduler_output = self.scheduler.schedule()
        self.last_num_scheduled_tokens = scheduler_output.total_num_scheduled_tokens
        if not scheduler_output.seqs:
            return []
        self._prepare(scheduler_output)
        self.num_sync_steps += 1
        sampled = self.runner.execute(scheduler_output.seqs)
        return self.scheduler.update_from_output(scheduler_output, sampled)

    def _prepare(self, scheduler_output: SchedulerOutput) -> None:
        if scheduler_output.blocks_to_copy:
            self.runner.copy_blocks(scheduler_output.blocks_to_copy)
        if self.before_execute is not None:
            self.before_execute(scheduler_output.seqs)

    def _step_async(self) -> list[EngineOutput]:
        runner: AsyncModelExecutor = self.runner  # type: ignore[assignment]  # checked in __init__
        current = self._in_flight
        if current is None:
            scheduled = self.scheduler.schedule()
            self.last_num_scheduled_tokens = scheduled.total_num_scheduled_tokens
            if not scheduled.seqs:
                return []
            self._prepare(scheduled)
            current = _InFlight(scheduled, runner.launch(scheduled.seqs), self._can_run_ahead(scheduled))
            self.num_sync_steps += 1
            self.scheduler.mark_in_flight(scheduled)
        self._in_flight = None
        if current.can_run_ahead and self.before_execute is None:
            ahead = self.scheduler.schedule_ahead()
            if ahead is not None and ahead.seqs:
                launched = runner.launch(ahead.seqs, current.launched)
                self._in_flight = _InFlight(ahead, launched, self._can_run_ahead(ahead))
                self.num_async_steps += 1
        results = current.launched.results()
        nxt = self._in_flight
        self.scheduler.mark_in_flight(nxt.scheduled if nxt is not None else None)
        self.last_num_scheduled_tokens = (nxt or current).scheduled.total_num_scheduled_tokens
        return self.scheduler.update_from_output(current.scheduled, results)

    @staticmethod
    def _can_run_ahead(scheduled: SchedulerOutput) -> bool:
        """Whether the step after ``scheduled`` can be scheduled before its results
        are known: every sampling input is a plain decode (see the module docstring)."""
        for seq, request in zip(scheduled.seqs, scheduled.requests, strict=True):
            if seq.sample and (request.needs_host_tokens or seq.output_index == 0 or len(seq.token_ids) != 1):
                return False
        return True
