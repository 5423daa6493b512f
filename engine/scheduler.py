"""Continuous-batching scheduler with chunked prefill and recompute preemption.

Each request carries a cursor, ``num_computed_tokens``; a step computes the next
tokens after the cursor, so prefill, chunked prefill, decode and recompute are
one operation (the token-cursor design of vLLM v1 and nano-vllm; Tandem's code).
One :meth:`Scheduler.schedule` call:

  1. gives each RUNNING request, in ``(priority, arrival)`` order, its remaining
     tokens (one for a decode, the rest of the prompt for a chunked prefill)
     within the step's token budget. When the pool has no block for it, the
     running request that comes LAST in that order (the largest priority
     value, the newest among equals) is preempted (blocks freed, cursor reset
     to 0, back in the waiting queue) until it fits, so the first request
     always progresses;
  2. when nothing was preempted, admits WAITING requests in ``(priority,
     arrival)`` order (lower priority value first, then first come first
     served) while ``max_num_seqs``, the token budget and free blocks allow; a request
     whose leading blocks are in the prefix cache shares them and starts its
     cursor after them (``num_cached_tokens``); a prompt longer than the
     remaining budget is split, and only the chunk that reaches the end of the
     sequence samples a token.

:meth:`Scheduler.schedule` advances each scheduled request's cursor at once
and counts the token it will sample as a *placeholder*
(``Request.num_output_placeholders``); :meth:`Scheduler.update_from_output`
then registers blocks that became full in the prefix cache, replaces the
placeholders with the sampled tokens, applies stop conditions and frees
finished requests' blocks.

Asynchronous scheduling (``EngineCore(async_scheduling=True)``):
:meth:`Scheduler.schedule_ahead` schedules step N + 1 while step N still runs
on the device. A running decode request then computes its placeholder (the
runner takes the token from step N's sampled ids on the device); a request
known to end at step N by length is left out; a request that ends at step N
on a stop token computes one wasted row in step N + 1, whose result
:meth:`Scheduler.update_from_output` drops (it is no longer running).
:meth:`Scheduler.schedule_ahead` declines (returns ``None``) when the step
would need a preemption or a copy-on-write block. Blocks of requests that end
while a step that writes them may still run are freed only once that step has
completed (:meth:`Scheduler.mark_in_flight`).

``n`` > 1 completions: the prompt is computed once, by the request itself.
Its sampling step returns ``n`` tokens; the request then *forks* into ``n``
completions (ids ``<req_id>/<i>``, outputs still carry ``req_id`` and the
completion's ``index``) sharing its blocks
(:meth:`KVCacheManager.fork`). A completion about to write into a block it
still shares gets a private copy first; the step's ``blocks_to_copy`` tells
the runner which KV to copy before the forward pass. After the fork each
completion is an ordinary request (preempted, finished, aborted alone).

Disaggregated roles:

- prefill worker: a request with ``hold_blocks_on_finish`` keeps its blocks
  when it finishes (after its first token) in a *held* map until
  :meth:`Scheduler.release_held`, so the service can push its KV first;
- decode worker: :meth:`Scheduler.reserve` takes blocks for a remote prefill,
  and :meth:`Scheduler.add_prefilled_request` turns the reservation into a
  RUNNING request whose prompt is already computed.

Phase timestamps, read from the scheduler's ``clock`` once per request per
phase: ``Request.queued_time`` (``add_request``), ``first_scheduled_time``
(first admission; kept across preemption) and ``first_token_time`` (the
first sampled token applied); workers report queue and prefill time from them.

The scheduler never touches blocks itself; :class:`KVCacheManager` does.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.batch import (
    PLACEHOLDER_TOKEN_ID,
    SampleResult,
    SequenceInput,
    TokenLogprobs,
    sampled_token_id,
)
from engine.errors import CapacityExceeded, InvalidRequest, ReservationNotFound
from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.request import EngineOutput, Request, RequestStatus, finish_reason


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduler.

    Attributes:
        max_num_seqs: most requests in the running batch.
        max_num_batched_tokens: most tokens computed in one step.
        max_model_len: most tokens (prompt plus output) of one sequence.
        max_queue_len: most waiting requests; ``None`` is unbounded.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_queue_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SchedulerOutput:
    """One step's work.

    Attributes:
        seqs: one input per scheduled request, running ones first.
        preempted_req_ids: requests preempted while scheduling this step.
        blocks_to_copy: ``(src_block_id, dst_block_id)`` pairs whose keys and
            values the runner copies, in order, before the forward pass
            (copy-on-write of blocks shared by forked completions).
        requests: the scheduled requests, one per ``seqs`` entry (results of
            a request that ended, or was replaced under the same id, are dropped).
    """

    seqs: list[SequenceInput] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        """Tokens computed this step."""
        return sum(len(s.token_ids) for s in self.seqs)


class Scheduler:
    """Decides which tokens of which requests each step computes. Not thread-safe.

    Args:
        config: batch, budget and length limits.
        kv_cache_manager: owner of the requests' block tables.
        clock: seconds for the requests' phase timestamps (``Request.queued_time``,
            ``first_scheduled_time``, ``first_token_time``); read once per request
            per phase, never per step.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self._clock = clock
        self.waiting: list[Request] = []  # sorted by Request.schedule_key
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # waiting and running (forked completions by own id)
        self.held: dict[str, Request] = {}
        self.reservations: set[str] = set()
        self.forks: dict[str, list[Request]] = {}  # parent id -> its unfinished completions
        self._arrivals = itertools.count()
        self._in_flight: SchedulerOutput | None = None  # the step the device may still run
        self._in_flight_ids: frozenset[str] | None = None  # its request ids, built at the first free

    # ---- queries -------------------------------------------------------

    @property
    def num_running(self) -> int:
        """Requests in the running batch."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for admission (new or preempted)."""
        return len(self.waiting)

    @property
    def num_tokens_waiting(self) -> int:
        """Tokens the waiting requests still have to compute before sampling."""
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running (held and reserved ones do not count)."""
        return bool(self.waiting or self.running)

    def get_block_table(self, req_id: str) -> list[int]:
        """Block ids of a running, held or reserved request.

        Raises:
            KeyError: ``req_id`` holds no blocks.
        """
        return self.kv_cache_manager.get_block_table(req_id)

    # ---- admission -----------------------------------------------------

    def _check_new_id(self, req_id: str) -> None:
        if (
            req_id in self.requests
            or req_id in self.held
            or req_id in self.reservations
            or req_id in self.forks
        ):
            raise InvalidRequest("req_id", f"duplicate request id {req_id!r}")

    def _check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Reject a sequence that can never fit in ``max_model_len`` or the whole pool."""
        if num_prompt_tokens < 1:
            raise InvalidRequest("prompt_token_ids", "must not be empty")
        max_len = self.config.max_model_len
        if num_prompt_tokens >= max_len:
            raise InvalidRequest(
                "prompt_token_ids", f"{num_prompt_tokens} tokens leave no room under max_model_len {max_len}"
            )
        # The last sampled token never needs a KV slot.
        needed = cdiv(min(num_prompt_tokens + max_tokens, max_len) - 1, self.kv_cache_manager.block_size)
        total = self.kv_cache_manager.num_total_blocks
        if needed > total:
            raise CapacityExceeded(f"request needs up to {needed} KV blocks, the pool has {total}")

    def _cap_max_model_len(self, request: Request) -> None:
        limit = self.config.max_model_len
        request.max_model_len = limit if request.max_model_len is None else min(request.max_model_len, limit)

    def add_request(self, request: Request) -> None:
        """Queue a new request (status WAITING).

        Fills ``request.max_model_len`` with the scheduler's limit (or the
        smaller of the two).

        Raises:
            InvalidRequest: duplicate id, empty prompt, or a prompt that leaves
                no room under ``max_model_len``.
            CapacityExceeded: the waiting queue is full, or the request could
                need more blocks than the whole pool.
        """
        self._check_new_id(request.req_id)
        self._check_fits(request.num_prompt_tokens, request.sampling.max_tokens)
        limit = self.config.max_queue_len
        if limit is not None and len(self.waiting) >= limit:
            raise CapacityExceeded(f"waiting queue is full ({limit} requests)")
        self._cap_max_model_len(request)
        request.status = RequestStatus.WAITING
        request.arrival_seq = next(self._arrivals)
        request.queued_time = self._clock()
        self.requests[request.req_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=lambda r: r.schedule_key)

    def abort_request(self, req_id: str, index: int | None = None) -> bool:
        """Drop a request wherever it is (waiting, running, held or reserved) and free its blocks.

        Args:
            req_id: the request's id (a forked request's own id, not a completion's).
            index: abort only this completion of a forked request; ``None``
                aborts all of them.

        Returns:
            Whether ``req_id`` was known.
        """
        if index is None and (self.release_held(req_id) or self.release_reservation(req_id)):
            return True
        children = self.forks.get(req_id)
        if children is not None:
            for child in [c for c in children if index is None or c.index == index]:
                self._abort_one(child)
            return True
        request = self.requests.get(req_id)
        if request is None:
            return False
        self._abort_one(request)
        return True

    def _abort_one(self, request: Request) -> None:
        del self.requests[request.req_id]
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED_ABORTED
        self._free_blocks(request.req_id)
        self._forget_child(request)

    def _free_blocks(self, req_id: str) -> None:
        """Free ``req_id``'s blocks, deferred while a step that writes them may still run."""
        defer = False
        if self._in_flight is not None:
            if self._in_flight_ids is None:
                self._in_flight_ids = frozenset(s.req_id for s in self._in_flight.seqs)
            defer = req_id in self._in_flight_ids
        self.kv_cache_manager.free(req_id, defer=defer)

    def mark_in_flight(self, scheduler_output: SchedulerOutput | None) -> None:
        """Say which step the device may still be computing (asynchronous scheduling).

        Every step launched before it has completed: the blocks whose frees
        were deferred are released now. Until the next call, blocks of
        ``scheduler_output``'s requests that end (finish, abort) are freed
        deferred (:meth:`KVCacheManager.free`); ``None``: nothing runs.
        """
        self.kv_cache_manager.free_deferred()
        self._in_flight = scheduler_output
        self._in_flight_ids = None

    def _forget_child(self, request: Request) -> None:
        if request.parent_req_id is None:
            return
        siblings = self.forks[request.parent_req_id]
        siblings.remove(request)
        if not siblings:
            del self.forks[request.parent_req_id]

    # ---- scheduling ----------------------------------------------------

    def _make_input(self, request: Request, num_new_tokens: int) -> SequenceInput:
        """The step's input for ``request``; tokens not sampled yet are placeholders."""
        start = request.num_computed_tokens
        end = start + num_new_tokens
        known = request.num_tokens
        if end <= known:
            token_ids = request.token_ids_between(start, end)
            feed_row = None
        else:  # the last token is being sampled by the previous step, at the request's row there
            token_ids = request.token_ids_between(start, known)
            token_ids += [PLACEHOLDER_TOKEN_ID] * (end - max(start, known))
            assert end - known == 1 and request.num_output_placeholders == 1, request.req_id
            feed_row = request.step_row
        num_outputs = len(request.output_token_ids) + request.num_output_placeholders
        return SequenceInput(
            req_id=request.req_id,
            token_ids=token_ids,
            start_pos=start,
            block_table=self.kv_cache_manager.block_table_view(request.req_id),
            sample=end == known + request.num_output_placeholders,
            sampling=request.sampling,
            output_index=num_outputs,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            feed_row=feed_row,
        )

    def _preempt(self, request: Request) -> None:
        assert request.num_output_placeholders == 0, f"{request.req_id} preempted with a step in flight"
        self._free_blocks(request.req_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self._enqueue(request)

    def _allocate_or_preempt(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate for ``request`` (copy-on-write included), preempting the running
        requests last in ``(priority, arrival)`` order as needed.

        ``self.running`` is sorted by that order, and earlier requests were
        scheduled already, so a victim is never a request scheduled this step.
        Returns False when ``request`` itself had to be preempted.
        """
        kv = self.kv_cache_manager
        req_id = request.req_id
        write_pos = request.num_computed_tokens
        while True:  # kv.can_allocate plus copy-on-write blocks, parts kept for below
            needed = kv.num_blocks_needed(num_tokens, req_id)
            copies = kv.num_copy_on_write_blocks(req_id, write_pos)
            if needed + copies <= kv.num_free_blocks:
                break
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted_req_ids.append(victim.req_id)
            if victim is request:
                return False
        if copies:
            copy = kv.copy_on_write(req_id, write_pos)
            assert copy is not None
            out.blocks_to_copy.append(copy)
        if needed:
            kv.allocate(req_id, num_tokens)
        return True

    def schedule(self) -> SchedulerOutput:
        """Choose this step's tokens (see the module docstring for the policy)."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=_running_order)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, request.num_computed_tokens + n, out):
                break
            out.seqs.append(self._make_input(request, n))
            out.requests.append(request)
            budget -= n
            i += 1
        if not out.preempted_req_ids:
            self._admit(out, budget)
        _advance_cursors(out)
        return out

    def schedule_ahead(self) -> SchedulerOutput | None:
        """Choose step N + 1's tokens while step N may still run (asynchronous scheduling).

        As :meth:`schedule`, except that a request whose pending tokens reach
        ``max_tokens`` or ``max_model_len`` is left out (it ends at step N),
        and that nothing is preempted or copied.

        Returns:
            The step, or ``None`` (nothing changed) when a running request
            would need a preemption or a copy-on-write block: the caller
            applies step N first and calls :meth:`schedule`.
        """
        kv = self.kv_cache_manager
        self.running.sort(key=_running_order)
        budget = self.config.max_num_batched_tokens
        free = kv.num_free_blocks
        plan: list[tuple[Request, int, int]] = []  # request, tokens, new blocks
        for request in self.running:
            if budget <= 0:
                break
            pending = request.num_output_placeholders
            if pending and _ends_with_pending(request, pending):
                continue
            n = min(request.num_tokens + pending - request.num_computed_tokens, budget)
            num_tokens = request.num_computed_tokens + n
            if request.parent_req_id is not None and kv.num_copy_on_write_blocks(
                request.req_id, request.num_computed_tokens
            ):
                return None
            needed = kv.num_blocks_needed(num_tokens, request.req_id)
            free -= needed
            if free < 0:
                return None
            plan.append((request, n, needed))
            budget -= n
        out = SchedulerOutput()
        for request, n, needed in plan:
            if needed:
                kv.allocate(request.req_id, request.num_computed_tokens + n)
            out.seqs.append(self._make_input(request, n))
            out.requests.append(request)
        self._admit(out, budget)
        _advance_cursors(out)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Move WAITING requests into the running batch while budget, seats and blocks allow."""
        kv = self.kv_cache_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            # A waiting request holds no blocks (cursor 0): start after its cached prefix,
            # unless it wants prompt log-probabilities (every position computed).
            cached = (
                kv.find_cached_prefix(request.all_token_ids, request.cache_salt)
                if request.sampling.prompt_logprobs is None
                else []
            )
            num_computed = len(cached) * kv.block_size
            n = min(request.num_tokens - num_computed, budget)
            if not kv.can_allocate(num_computed + n, request.req_id, cached):
                break
            kv.allocate(request.req_id, num_computed + n, cached)
            request.num_computed_tokens = num_computed
            if request.status is RequestStatus.WAITING:  # a preempted request keeps its first count
                request.num_cached_tokens = min(num_computed, request.num_prompt_tokens)
            if request.first_scheduled_time is None:  # and its first schedule (Request docstring)
                request.first_scheduled_time = self._clock()
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.seqs.append(self._make_input(request, n))
            out.requests.append(request)
            budget -= n

    def _finish(self, request: Request) -> None:
        self.running.remove(request)
        del self.requests[request.req_id]
        if request.hold_blocks_on_finish:
            self.held[request.req_id] = request
        else:
            self._free_blocks(request.req_id)
        self._forget_child(request)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled: Sequence[int | TokenLogprobs | None]
    ) -> list[EngineOutput]:
        """Apply one step's results.

        Args:
            scheduler_output: what :meth:`schedule` returned for the step.
            sampled: one entry per ``scheduler_output.seqs``: the sampled token
                id (or its :class:`TokenLogprobs`, passed on in
                ``EngineOutput.logprobs``), or ``None`` where the input did not
                sample. An input whose ``samples`` is set (the prompt of an
                ``n`` > 1 request) forks its request instead.

        Returns:
            One output per request that sampled a token, in input order; none
            for a request that ended (or was aborted) after the step was
            scheduled: its result is dropped.

        Raises:
            ValueError: ``sampled`` has the wrong length or lacks a token for an
                input that samples.
        """
        seqs = scheduler_output.seqs
        if len(sampled) != len(seqs):
            raise ValueError(f"{len(sampled)} results for {len(seqs)} inputs")
        scheduled: Sequence[Request | None] = scheduler_output.requests or [
            self.requests.get(s.req_id) for s in seqs
        ]
        outputs = []
        requests = self.requests
        cache_full_blocks = self.kv_cache_manager.cache_full_blocks
        running = RequestStatus.RUNNING
        for seq, request, result in zip(seqs, scheduled, sampled, strict=True):
            if request is None or request.status is not running or requests.get(seq.req_id) is not request:
                continue  # ended (stop token, abort) after scheduling
            if seq.prompt_logprobs is not None:
                _record_prompt_logprobs(request, seq)
            cache_full_blocks(request, seq.end_pos)
            if not seq.sample:
                continue
            if result is None:
                raise ValueError(f"no token sampled for {seq.req_id!r}")
            request.num_output_placeholders -= 1
            if request.first_token_time is None:
                request.first_token_time = self._clock()
            if seq.samples is not None:
                outputs.extend(self._fork(request, seq.samples))
            else:
                outputs.append(self._append_token(request, result))
        return outputs

    def _append_token(self, request: Request, result: SampleResult) -> EngineOutput:
        """Append one sampled token, apply stop conditions, and describe it."""
        if isinstance(result, TokenLogprobs):
            token_id, logprobs = result.token_id, [result]
        else:
            token_id, logprobs = result, []
        request.append_output_token(token_id)
        finished = request.check_stop()
        if finished:
            self._finish(request)
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is not None and len(request.output_token_ids) == 1:
            prompt_logprobs = list(prompt_logprobs)  # the first output carries them
        else:
            prompt_logprobs = None
        return EngineOutput(
            req_id=request.output_req_id,
            new_token_ids=[token_id],
            finished=finished,
            finish_reason=finish_reason(request.status) if finished else None,
            num_cached_tokens=request.num_cached_tokens,
            logprobs=logprobs,
            index=request.index,
            prompt_logprobs=prompt_logprobs,
        )

    def _fork(self, request: Request, results: Sequence[SampleResult]) -> list[EngineOutput]:
        """Split a RUNNING request whose prompt is computed into ``len(results)`` completions.

        Completion ``i`` starts with ``results[i]`` and shares every block of
        ``request``. A request with ``hold_blocks_on_finish`` (a prefill
        worker's, ``max_tokens`` 1) is not forked: it finishes holding the
        prompt's blocks and reports one output per completion (the decode
        worker forks).
        """
        if request.hold_blocks_on_finish:
            outputs = [self._append_token(request, results[0])]
            for i, result in enumerate(results[1:], start=1):
                extra = dataclasses.replace(outputs[0], new_token_ids=[sampled_token_id(result)], index=i)
                extra.logprobs = [result] if isinstance(result, TokenLogprobs) else []
                extra.prompt_logprobs = None
                outputs.append(extra)
            return outputs
        children = [
            Request(
                req_id=f"{request.req_id}/{i}",
                prompt_token_ids=request.prompt_token_ids,
                sampling=request.sampling.for_child(i),
                eos_token_ids=request.eos_token_ids,
                max_model_len=request.max_model_len,
                arrival_time=request.arrival_time,
                cache_salt=request.cache_salt,
                num_computed_tokens=request.num_computed_tokens,
                num_cached_tokens=request.num_cached_tokens,
                status=RequestStatus.RUNNING,
                priority=request.priority,
                parent_req_id=request.req_id,
                index=i,
                prompt_logprobs=request.prompt_logprobs if i == 0 else None,
                arrival_seq=request.arrival_seq,
                queued_time=request.queued_time,
                first_scheduled_time=request.first_scheduled_time,
                first_token_time=request.first_token_time,
            )
            for i in range(len(results))
        ]
        self.kv_cache_manager.fork(request.req_id, [c.req_id for c in children])
        position = self.running.index(request)
        self.running[position : position + 1] = children
        del self.requests[request.req_id]
        for child in children:
            self.requests[child.req_id] = child
        self.forks[request.req_id] = list(children)
        request.status = RequestStatus.FINISHED_STOPPED  # lives on as its completions
        return [self._append_token(child, result) for child, result in zip(children, results, strict=True)]

    # ---- disaggregated roles -------------------------------------------

    def release_held(self, req_id: str) -> bool:
        """Free the blocks of a finished request kept by ``hold_blocks_on_finish``.

        Returns:
            Whether ``req_id`` was held.
        """
        if self.held.pop(req_id, None) is None:
            return False
        self._free_blocks(req_id)
        return True

    def reserve(self, req_id: str, num_tokens: int, max_tokens: int | None = None) -> list[int]:
        """Reserve blocks covering ``num_tokens`` prompt tokens for a remote prefill.

        Args:
            req_id: id the prefilled request will have.
            num_tokens: prompt length (tokens); ``cdiv(num_tokens, block_size)``
                blocks are reserved.
            max_tokens: when given, also reject a request that could never fit
                (see :meth:`add_request`).

        Returns:
            The reserved block ids, in the order of the prompt's blocks.

        Raises:
            InvalidRequest: duplicate id, ``num_tokens`` < 1, or too long.
            CapacityExceeded: not enough free blocks, the batch is full
                (running plus reserved requests reach ``max_num_seqs``), or
                preempted requests are waiting (they go first).
        """
        self._check_new_id(req_id)
        if num_tokens < 1:
            raise InvalidRequest("num_prompt_tokens", "must be >= 1")
        if max_tokens is not None:
            self._check_fits(num_tokens, max_tokens)
        if self.waiting:
            raise CapacityExceeded(f"{len(self.waiting)} requests are waiting for blocks")
        if len(self.running) + len(self.reservations) >= self.config.max_num_seqs:
            raise CapacityExceeded(f"batch is full ({self.config.max_num_seqs} requests)")
        block_ids = self.kv_cache_manager.allocate(req_id, num_tokens)
        self.reservations.add(req_id)
        return block_ids

    def release_reservation(self, req_id: str) -> bool:
        """Free a reservation that will not be decoded (idempotent).

        Returns:
            Whether a reservation was found and released.
        """
        if req_id not in self.reservations:
            return False
        self.reservations.remove(req_id)
        self.kv_cache_manager.free(req_id)
        return True

    def add_prefilled_request(self, request: Request, first_token_id: int) -> EngineOutput:
        """:meth:`add_prefilled_completions` for one completion (``sampling.n`` 1)."""
        return self.add_prefilled_completions(request, [first_token_id])[0]

    def add_prefilled_completions(
        self, request: Request, first_token_ids: Sequence[int]
    ) -> list[EngineOutput]:
        """Turn the reservation ``request.req_id`` into RUNNING request(s).

        The reserved blocks become the request's block table, its prompt counts
        as computed and ``first_token_ids[i]`` (sampled by the prefill worker)
        is completion ``i``'s first output; with ``sampling.n`` > 1 the request
        forks at once into ``n`` completions sharing the reserved blocks. A
        completion may finish at once (EOS or ``max_tokens`` 1); blocks nobody
        holds any more are then freed.

        Returns:
            One output per completion, with no new tokens (the first ones came
            from the prefill worker), saying whether it already finished.

        Raises:
            ReservationNotFound: no reservation ``request.req_id``.
            InvalidRequest: the prompt is empty, too long for ``max_model_len``,
                or longer than the reservation, or ``len(first_token_ids)`` is
                not ``sampling.n`` (the reservation stays).
            CapacityExceeded: the request could need more blocks than the pool.
        """
        req_id = request.req_id
        if req_id not in self.reservations:
            raise ReservationNotFound(f"no reservation for {req_id!r}")
        if len(first_token_ids) != request.sampling.n:
            raise InvalidRequest(
                "first_token_ids", f"{len(first_token_ids)} first tokens for n={request.sampling.n}"
            )
        self._check_fits(request.num_prompt_tokens, request.sampling.max_tokens)
        if self.kv_cache_manager.num_blocks_needed(request.num_prompt_tokens, req_id) > 0:
            raise InvalidRequest("prompt_token_ids", "prompt is longer than the reservation")
        self.reservations.remove(req_id)
        self._cap_max_model_len(request)
        request.num_computed_tokens = request.num_prompt_tokens
        request.status = RequestStatus.RUNNING
        request.arrival_seq = next(self._arrivals)
        if len(first_token_ids) > 1:
            self.requests[req_id] = request
            self.running.append(request)
            forked = self._fork(request, list(first_token_ids))
            return [
                dataclasses.replace(o, new_token_ids=[], logprobs=[], prompt_logprobs=None) for o in forked
            ]
        request.output_token_ids = [first_token_ids[0]]
        finished = request.check_stop()
        if finished:
            self.kv_cache_manager.free(req_id)
        else:
            self.requests[req_id] = request
            self.running.append(request)
        return [
            EngineOutput(
                req_id=req_id,
                new_token_ids=[],
                finished=finished,
                finish_reason=finish_reason(request.status),
                num_cached_tokens=request.num_cached_tokens,
            )
        ]


def _ends_with_pending(request: Request, pending: int) -> bool:
    """Whether ``request`` reaches ``max_tokens`` or ``max_model_len`` once its
    ``pending`` placeholder tokens are applied (it then ends without another step)."""
    limit = request.max_model_len
    return len(request.output_token_ids) + pending >= request.sampling.max_tokens or (
        limit is not None and request.num_tokens + pending >= limit
    )


def _advance_cursors(out: SchedulerOutput) -> None:
    """Move each scheduled request's cursor past its step, count the token it
    samples, and record its row (which the next step's placeholder reads)."""
    for row, (request, seq) in enumerate(zip(out.requests, out.seqs, strict=True)):
        request.step_row = row
        request.num_computed_tokens = seq.end_pos
        if seq.sample:
            request.num_output_placeholders += 1


def _running_order(request: Request) -> tuple[int, float, int, int]:
    """Order of the running batch: ``(priority, arrival)``, then completion index."""
    return (request.priority, request.arrival_time, request.arrival_seq, request.index)


def _record_prompt_logprobs(request: Request, seq: SequenceInput) -> None:
    """Append the prompt log-probabilities the runner computed for ``seq`` that
    ``request`` lacks (a recompute after preemption repeats positions)."""
    if seq.prompt_logprobs is None or request.prompt_logprobs is None:
        return
    skip = len(request.prompt_logprobs) - seq.start_pos  # entry k is prompt token k + 1
    assert skip >= 0, f"{request.req_id}: prompt log-probabilities out of order"
    request.prompt_logprobs.extend(seq.prompt_logprobs[skip:])
