"""One generation request as the scheduler tracks it, and what a step reports about it.

A request is a token sequence (prompt, then generated tokens) with a cursor,
``num_computed_tokens``: the tokens whose KV is in the cache. Each step computes
``all_token_ids[num_computed_tokens:...]``; prefill, chunked prefill, decode and
recompute after preemption are all the same operation (vLLM v1's token-cursor
design). Torch-free.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.batch import TokenLogprobs
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        """True for the three ``FINISHED_*`` states."""
        return self in _FINISH_REASONS


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


def finish_reason(status: RequestStatus) -> str | None:
    """``"stop"``, ``"length"`` or ``"abort"`` for a finished status, else ``None``."""
    return _FINISH_REASONS.get(status)


@dataclass
class EngineOutput:
    """What one step produced for one request.

    Attributes:
        req_id: the request.
        new_token_ids: tokens generated this step (0 or 1 today).
        finished: the request is done; no further outputs follow.
        finish_reason: ``"stop"``, ``"length"`` or ``"abort"`` when finished.
        num_cached_tokens: prompt tokens whose KV was reused from the prefix
            cache instead of computed (tokens).
        logprobs: one entry per ``new_token_ids`` entry when the request's
            ``sampling.logprobs`` is set, else empty.
        index: which completion of an ``n`` > 1 request this is (0 to n - 1);
            ``req_id`` is the request's own id for every completion.
        prompt_logprobs: on the first output of completion 0 of a request with
            ``sampling.prompt_logprobs`` set: one entry per prompt token after
            the first (entry ``k`` is prompt token ``k + 1``); else ``None``.
    """

    req_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    index: int = 0
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass(eq=False)
class Request:
    """A request inside the scheduler (compared by identity).

    Attributes:
        req_id: unique id.
        prompt_token_ids: the prompt (>= 1 token).
        sampling: sampling parameters (``max_tokens``, ``ignore_eos``, ...).
        eos_token_ids: tokens that end generation unless ``sampling.ignore_eos``.
        max_model_len: most tokens (prompt plus output) of the sequence;
            ``None`` until the scheduler fills in its own limit.
        arrival_time: ``time.monotonic()`` at creation (seconds).
        hold_blocks_on_finish: keep the KV blocks after finishing until the
            scheduler's ``release_held`` (prefill worker: the KV is pushed first).
        cache_salt: mixed into the request's block hashes; requests with
            different salts never share prefix-cache blocks (tenant isolation).
        output_token_ids: generated tokens so far.
        num_computed_tokens: tokens whose KV is in the cache (the cursor).
        num_cached_tokens: prompt tokens reused from the prefix cache.
        status: see :class:`RequestStatus`.
        priority: lower values are scheduled first and preempted last; ties
            go first come first served (as vLLM's ``priority``).
        parent_req_id: for one completion of an ``n`` > 1 request, the id of
            the request it was forked from (outputs carry that id); else ``None``.
        index: the completion's index among its parent's (0 when not forked).
        prompt_logprobs: log-probabilities of prompt tokens ``1 ..`` computed
            so far, in prompt order, when ``sampling.prompt_logprobs`` is set
            (completion 0 of a forked request inherits its parent's); else ``None``.
        arrival_seq: admission order inside the scheduler (ties of
            ``arrival_time``); set by the scheduler.
        num_output_placeholders: tokens scheduled to be sampled whose ids the
            scheduler has not received yet (0 or 1 between a step's schedule and
            its update; 2 while asynchronous scheduling runs a step ahead).
            ``num_computed_tokens`` already counts the positions those steps
            compute.
        needs_host_tokens: set from ``sampling`` and ``hold_blocks_on_finish``:
            a step sampling for this request must reach the host before the
            next step is scheduled (penalties, log-probabilities, prompt
            log-probabilities, ``n`` > 1, or a prefill worker's request).
        step_row: the request's row among the inputs of the step that last
            scheduled it (set by the scheduler; -1 before).
        queued_time: when the scheduler took the request in (``add_request``;
            seconds of the scheduler's clock, ``time.monotonic`` by default);
            ``None`` for a request whose prompt was computed elsewhere
            (``add_prefilled_request``).
        first_scheduled_time: when a step first scheduled it (``None`` before).
            A preempted request keeps it: its wait to be scheduled again
            counts as compute, not queue (vLLM counts queue time to the first
            schedule too).
        first_token_time: when the step that computed the prompt's last chunk
            completed; that step samples the first token, so this is also
            when the first token was sampled (``None`` before).
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: Sequence[int] = ()
    max_model_len: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    hold_blocks_on_finish: bool = False
    cache_salt: str = ""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    priority: int = 0
    parent_req_id: str | None = None
    index: int = 0
    prompt_logprobs: list[TokenLogprobs] | None = None
    arrival_seq: int = 0
    num_output_placeholders: int = 0
    needs_host_tokens: bool = field(init=False, default=False)
    step_row: int = field(init=False, default=-1)
    queued_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        sp = self.sampling
        if self.prompt_logprobs is None and sp.prompt_logprobs is not None:
            self.prompt_logprobs = []
        self.needs_host_tokens = (
            sp.n != 1
            or sp.logprobs is not None
            or sp.prompt_logprobs is not None
            or sp.has_penalties
            or self.hold_blocks_on_finish
        )

    @property
    def output_req_id(self) -> str:
        """The id its outputs carry: the parent's for a forked completion, else ``req_id``."""
        return self.parent_req_id if self.parent_req_id is not None else self.req_id

    @property
    def schedule_key(self) -> tuple[int, float, int]:
        """Waiting-queue order: ``(priority, arrival_time, arrival_seq)``, smallest first."""
        return (self.priority, self.arrival_time, self.arrival_seq)

    @property
    def queue_seconds(self) -> float | None:
        """Seconds in the waiting queue before the first schedule (``None`` until scheduled,
        or when the scheduler never queued it)."""
        if self.queued_time is None or self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.queued_time

    @property
    def prefill_seconds(self) -> float | None:
        """Seconds from the first schedule to the first token: the prompt's compute,
        chunks and any preemption included (``None`` until the first token)."""
        if self.first_scheduled_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length (tokens)."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        """True once the status is one of the ``FINISHED_*`` states."""
        return self.status.is_finished

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without copying the whole sequence."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    def append_output_token(self, token_id: int) -> None:
        """Record one generated token."""
        self.output_token_ids.append(token_id)

    def check_stop(self) -> bool:
        """Finish the request if its last token ends it; return whether it is finished.

        Stop tokens are checked first: EOS unless ``ignore_eos``, and
        ``sampling.stop_token_ids`` always (``FINISHED_STOPPED``; the token stays
        in the output), then length: ``max_tokens`` outputs or ``max_model_len``
        tokens in all (``FINISHED_LENGTH``). A token that is both a stop token
        and the last allowed one reports ``"stop"``.
        """
        if not self.output_token_ids:
            return False
        last = self.output_token_ids[-1]
        is_eos = not self.sampling.ignore_eos and last in self.eos_token_ids
        if is_eos or last in self.sampling.stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
        elif len(self.output_token_ids) >= self.sampling.max_tokens or (
            self.max_model_len is not None and self.num_tokens >= self.max_model_len
        ):
            self.status = RequestStatus.FINISHED_LENGTH
        return self.is_finished
