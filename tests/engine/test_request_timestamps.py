"""Phase timestamps the scheduler writes on each request (queued, first scheduled,
first token) read from an injected clock, through chunked prefill, preemption,
asynchronous scheduling, forking, finishing and prefilled requests."""

import time

from engine.block_pool import BlockPool
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig


class Clock:
    """A clock the test moves by hand; counts its reads."""

    def __init__(self) -> None:
        self.now = 100.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def make(clock: Clock, num_blocks=16, block_size=4, max_num_batched_tokens=64, max_num_seqs=8) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=64
    )
    return Scheduler(config, KVCacheManager(BlockPool(num_blocks, block_size)), clock=clock)


def req(req_id: str, prompt, max_tokens=16, n=1) -> Request:
    return Request(req_id, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True, n=n))


def times(r: Request) -> tuple[float | None, float | None, float | None]:
    return (r.queued_time, r.first_scheduled_time, r.first_token_time)


def test_queue_then_chunked_prefill_then_decode():
    clock = Clock()
    s = make(clock, max_num_batched_tokens=4)
    a, b = req("a", range(1, 11)), req("b", [31, 32])
    s.add_request(a)
    clock.now = 101.0
    s.add_request(b)
    assert times(a) == (100.0, None, None) and a.queue_seconds is None
    clock.now = 102.0
    out = s.schedule()  # a's first chunk; b waits (no budget)
    assert times(a) == (100.0, 102.0, None) and times(b) == (101.0, None, None)
    clock.now = 103.0
    s.update_from_output(out, [None])
    assert a.first_token_time is None  # a chunk that does not sample
    clock.now = 104.0
    s.update_from_output(s.schedule(), [None])
    clock.now = 105.0
    out = s.schedule()  # a's last chunk and b's prompt
    assert times(b) == (101.0, 105.0, None)
    clock.now = 106.5
    s.update_from_output(out, [7, 8])
    assert times(a) == (100.0, 102.0, 106.5) and times(b) == (101.0, 105.0, 106.5)
    assert (a.queue_seconds, a.prefill_seconds) == (2.0, 4.5)
    assert (b.queue_seconds, b.prefill_seconds) == (4.0, 1.5)
    reads = clock.reads
    for t in (107.0, 108.0, 109.0):  # decode steps write nothing and read no clock
        clock.now = t
        s.update_from_output(s.schedule(), [1, 2])
    assert clock.reads == reads
    assert times(a) == (100.0, 102.0, 106.5) and times(b) == (101.0, 105.0, 106.5)


def test_preempted_request_keeps_its_first_schedule_and_first_token():
    clock = Clock()
    s = make(clock, num_blocks=4, block_size=2)
    a, b = req("a", [1, 2, 3, 4], max_tokens=3), req("b", [5, 6, 7, 8], max_tokens=4)
    s.add_request(a)
    s.add_request(b)
    clock.now = 101.0
    out = s.schedule()
    clock.now = 102.0
    s.update_from_output(out, [40, 50])
    clock.now = 103.0
    out = s.schedule()  # a needs a third block: b is preempted, back in the waiting queue
    assert out.preempted_req_ids == ["b"]
    s.update_from_output(out, [41])
    clock.now = 104.0
    s.update_from_output(s.schedule(), [42])  # a finishes
    assert times(a) == (100.0, 101.0, 102.0)
    clock.now = 105.0
    out = s.schedule()  # b is admitted again and recomputes
    assert [q.req_id for q in out.requests] == ["b"]
    clock.now = 106.0
    s.update_from_output(out, [51])
    assert times(b) == (100.0, 101.0, 102.0)
    assert (b.queue_seconds, b.prefill_seconds) == (1.0, 1.0)


def test_preempted_before_its_first_token_counts_the_requeue_as_prefill():
    clock = Clock()
    s = make(clock, num_blocks=4, block_size=2, max_num_batched_tokens=2)
    a, b = req("a", [1, 2], max_tokens=4), req("b", [3, 4, 5, 6, 7, 8], max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    steps = []

    def step(t: float, sampled) -> list[str]:
        clock.now = t
        out = s.schedule()
        s.update_from_output(out, sampled(out))
        steps.append(out.preempted_req_ids)
        return [q.req_id for q in out.requests]

    def tokens(out):
        return [9 if seq.sample else None for seq in out.seqs]

    assert step(101.0, tokens) == ["a"]
    assert step(102.0, tokens) == ["a", "b"]  # b's first chunk (1 token)
    assert step(103.0, tokens) == ["a", "b"]
    assert step(104.0, tokens) == ["a"] and steps[-1] == ["b"]  # b preempted mid-prompt; a finishes
    assert times(b) == (100.0, 102.0, None)
    assert step(105.0, tokens) == ["b"]  # recomputed from token 0, in 3 chunks
    assert step(106.0, tokens) == ["b"]
    assert b.first_token_time is None
    assert step(107.0, tokens) == ["b"]
    assert times(b) == (100.0, 102.0, 107.0)
    assert (b.queue_seconds, b.prefill_seconds) == (2.0, 5.0)


def test_async_scheduling_sets_the_first_token_when_the_step_is_applied():
    clock = Clock()
    s = make(clock)
    a = req("a", [1, 2, 3], max_tokens=4)
    s.add_request(a)
    clock.now = 101.0
    first = s.schedule()
    s.mark_in_flight(first)
    clock.now = 102.0
    second = s.schedule_ahead()  # step 2 scheduled while step 1 runs
    assert second is not None and a.first_token_time is None
    clock.now = 103.0
    s.update_from_output(first, [5])
    assert times(a) == (100.0, 101.0, 103.0)
    clock.now = 104.0
    s.update_from_output(second, [6])
    assert times(a) == (100.0, 101.0, 103.0)


def test_forked_completions_inherit_the_parents_times():
    clock = Clock()
    s = make(clock)
    a = req("a", [1, 2, 3], max_tokens=3, n=2)
    s.add_request(a)
    clock.now = 101.0
    out = s.schedule()
    out.seqs[0].samples = [7, 8]
    clock.now = 102.5
    s.update_from_output(out, [7])
    children = [s.requests["a/0"], s.requests["a/1"]]
    assert [times(c) for c in children] == [(100.0, 101.0, 102.5)] * 2


def test_prefilled_request_has_no_engine_queue():
    clock = Clock()
    s = make(clock)
    s.reserve("r", 3)
    r = req("r", [1, 2, 3], max_tokens=4)
    s.add_prefilled_request(r, 9)
    s.update_from_output(s.schedule(), [10])
    assert r.queued_time is None and r.queue_seconds is None and r.prefill_seconds is None


def test_aborted_waiting_request_was_never_scheduled():
    clock = Clock()
    s = make(clock, max_num_seqs=1)
    a, b = req("a", [1, 2]), req("b", [3, 4])
    s.add_request(a)
    s.add_request(b)
    s.schedule()
    clock.now = 107.0
    assert s.abort_request("b")
    assert times(b) == (100.0, None, None)


def test_default_clock_is_monotonic():
    s = Scheduler(SchedulerConfig(), KVCacheManager(BlockPool(8, 4)))
    a = req("a", [1, 2])
    before = time.monotonic()
    s.add_request(a)
    s.update_from_output(s.schedule(), [3])
    after = time.monotonic()
    assert a.queued_time is not None and a.first_scheduled_time is not None
    assert a.first_token_time is not None
    assert before <= a.queued_time <= a.first_scheduled_time <= a.first_token_time <= after
