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

:meth:`Scheduler.update_from_output` then advances cursors, registers blocks
that became full in the prefix cache, appends sampled tokens, applies stop
conditions and frees finished requests' blocks.

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

The scheduler never touches blocks itself; :class:`KVCacheManager` does.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.batch import SampleResult, SequenceInput, TokenLogprobs, sampled_token_id
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
    """

    seqs: list[SequenceInput] = field(default_factory=list)
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
    """

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.waiting: list[Request] = []  # sorted by Request.schedule_key
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # waiting and running (forked completions by own id)
        self.held: dict[str, Request] = {}
        self.reservations: set[str] = set()
        self.forks: dict[str, list[Request]] = {}  # parent id -> its unfinished completions
        self._arrivals = itertools.count()

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
        self.kv_cache_manager.free(request.req_id)
        self._forget_child(request)

    def _forget_child(self, request: Request) -> None:
        if request.parent_req_id is None:
            return
        siblings = self.forks[request.parent_req_id]
        siblings.remove(request)
        if not siblings:
            del self.forks[request.parent_req_id]

    # ---- scheduling ----------------------------------------------------

    def _make_input(self, request: Request, num_new_tokens: int) -> SequenceInput:
        start = request.num_computed_tokens
        end = start + num_new_tokens
        return SequenceInput(
            req_id=request.req_id,
            token_ids=request.token_ids_between(start, end),
            start_pos=start,
            block_table=self.kv_cache_manager.get_block_table(request.req_id),
            sample=end == request.num_tokens,
            sampling=request.sampling,
            output_index=len(request.output_token_ids),
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
        )

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request.req_id)
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
        write_pos = request.num_computed_tokens
        while not kv.can_allocate(num_tokens, request.req_id, write_pos=write_pos):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted_req_ids.append(victim.req_id)
            if victim is request:
                return False
        copy = kv.copy_on_write(request.req_id, write_pos)
        if copy is not None:
            out.blocks_to_copy.append(copy)
        kv.allocate(request.req_id, num_tokens)
        return True

    def schedule(self) -> SchedulerOutput:
        """Choose this step's tokens (see the module docstring for the policy)."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda r: (*r.schedule_key, r.index))
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, request.num_computed_tokens + n, out):
                break
            out.seqs.append(self._make_input(request, n))
            budget -= n
            i += 1
        if out.preempted_req_ids:
            return out
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
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.seqs.append(self._make_input(request, n))
            budget -= n
        return out

    def _finish(self, request: Request) -> None:
        self.running.remove(request)
        del self.requests[request.req_id]
        if request.hold_blocks_on_finish:
            self.held[request.req_id] = request
        else:
            self.kv_cache_manager.free(request.req_id)
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
            One output per request that sampled a token, in input order.

        Raises:
            ValueError: ``sampled`` has the wrong length or lacks a token for an
                input that samples.
        """
        if len(sampled) != len(scheduler_output.seqs):
            raise ValueError(f"{len(sampled)} results for {len(scheduler_output.seqs)} inputs")
        outputs = []
        for seq, result in zip(scheduler_output.seqs, sampled, strict=True):
            request = self.requests.get(seq.req_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted after scheduling
            request.num_computed_tokens = seq.end_pos
            _record_prompt_logprobs(request, seq)
            self.kv_cache_manager.cache_full_blocks(request)
            if not seq.sample:
                continue
            if result is None:
                raise ValueError(f"no token sampled for {seq.req_id!r}")
            if seq.samples is not None:
                outputs.extend(self._fork(request, seq.samples))
            else:
                outputs.append(self._append_token(request, result))
        return outputs

    def _append_token(self, request: Request, result: SampleResult) -> EngineOutput:
        """Append one sampled token, apply stop conditions, and describe it."""
        token_id = sampled_token_id(result)
        request.append_output_token(token_id)
        finished = request.check_stop()
        if finished:
            self._finish(request)
        first = len(request.output_token_ids) == 1 and request.prompt_logprobs is not None
        return EngineOutput(
            req_id=request.output_req_id,
            new_token_ids=[token_id],
            finished=finished,
            finish_reason=finish_reason(request.status),
            num_cached_tokens=request.num_cached_tokens,
            logprobs=[result] if isinstance(result, TokenLogprobs) else [],
            index=request.index,
            prompt_logprobs=list(request.prompt_logprobs)
            if first and request.prompt_logprobs is not None
            else None,
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
        self.kv_cache_manager.free(req_id)
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


def _record_prompt_logprobs(request: Request, seq: SequenceInput) -> None:
    """Append the prompt log-probabilities the runner computed for ``seq`` that
    ``request`` lacks (a recompute after preemption repeats positions)."""
    if seq.prompt_logprobs is None or request.prompt_logprobs is None:
        return
    skip = len(request.prompt_logprobs) - seq.start_pos  # entry k is prompt token k + 1
    assert skip >= 0, f"{request.req_id}: prompt log-probabilities out of order"
    request.prompt_logprobs.extend(seq.prompt_logprobs[skip:])
