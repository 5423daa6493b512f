import pytest

from engine.block_pool import BlockPool
from engine.errors import CapacityExceeded, InvalidRequest, ReservationNotFound
from engine.kv_cache_manager import KVCacheManager
from engine.request import EngineOutput, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

EOS = 0


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, **kw):
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=64, **kw
    )
    return Scheduler(config, KVCacheManager(BlockPool(num_blocks, block_size)))


def req(req_id, prompt, max_tokens=16, hold=False, ignore_eos=False):
    return Request(
        req_id,
        list(prompt),
        SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
        eos_token_ids=(EOS,),
        hold_blocks_on_finish=hold,
    )


def view(out):
    """(req_id, token_ids, start_pos, block_table, sample, output_index) per scheduled input."""
    return [(s.req_id, s.token_ids, s.start_pos, s.block_table, s.sample, s.output_index) for s in out.seqs]


def test_prefill_then_decode_batch():
    s = make_scheduler()
    s.add_request(req("a", [11, 12, 13, 14, 15]))
    s.add_request(req("b", [21, 22, 23]))
    out = s.schedule()
    assert view(out) == [
        ("a", [11, 12, 13, 14, 15], 0, [0, 1], True, 0),
        ("b", [21, 22, 23], 0, [2], True, 0),
    ]
    assert out.total_num_scheduled_tokens == 8
    assert s.update_from_output(out, [16, 24]) == [EngineOutput("a", [16]), EngineOutput("b", [24])]
    out = s.schedule()
    assert view(out) == [("a", [16], 5, [0, 1], True, 1), ("b", [24], 3, [2], True, 1)]
    s.update_from_output(out, [17, 25])
    out = s.schedule()  # b's 5th token needs a second block
    assert view(out) == [("a", [17], 6, [0, 1], True, 2), ("b", [25], 4, [2, 3], True, 2)]
    assert (s.num_running, s.num_waiting) == (2, 0)


def test_chunked_prefill_samples_only_last_chunk():
    s = make_scheduler(max_num_batched_tokens=4)
    s.add_request(req("a", range(1, 11)))
    s.add_request(req("b", [31, 32]))
    out = s.schedule()
    assert view(out) == [("a", [1, 2, 3, 4], 0, [0], False, 0)]
    assert s.update_from_output(out, [None]) == []
    out = s.schedule()
    assert view(out) == [("a", [5, 6, 7, 8], 4, [0, 1], False, 0)]
    s.update_from_output(out, [None])
    out = s.schedule()  # last chunk of a, then b fills the remaining budget
    assert view(out) == [("a", [9, 10], 8, [0, 1, 2], True, 0), ("b", [31, 32], 0, [3], True, 0)]
    assert s.update_from_output(out, [5, 6]) == [EngineOutput("a", [5]), EngineOutput("b", [6])]
    assert s.num_tokens_waiting == 0


def test_budget_splits_waiting_prompt_after_decodes():
    s = make_scheduler(max_num_batched_tokens=5)
    s.add_request(req("a", [1, 2]))
    s.update_from_output(s.schedule(), [3])
    s.add_request(req("b", [4, 5, 6, 7, 8, 9]))
    assert s.num_tokens_waiting == 6
    out = s.schedule()
    assert view(out) == [("a", [3], 2, [0], True, 1), ("b", [4, 5, 6, 7], 0, [1], False, 0)]


def test_preempts_newest_and_recomputes():
    s = make_scheduler(num_blocks=4, block_size=2)
    s.add_request(req("a", [1, 2, 3, 4], max_tokens=3))
    s.add_request(req("b", [5, 6, 7, 8], max_tokens=4))
    out = s.schedule()
    assert view(out) == [("a", [1, 2, 3, 4], 0, [0, 1], True, 0), ("b", [5, 6, 7, 8], 0, [2, 3], True, 0)]
    s.update_from_output(out, [40, 50])
    out = s.schedule()  # a needs a third block: b (newest) is preempted
    assert out.preempted_req_ids == ["b"]
    assert view(out) == [("a", [40], 4, [0, 1, 3], True, 1)]
    b = s.waiting[0]
    assert (b.req_id, b.status, b.num_computed_tokens, b.output_token_ids) == (
        "b",
        RequestStatus.PREEMPTED,
        0,
        [50],
    )
    s.update_from_output(out, [41])
    out = s.schedule()  # b needs 3 blocks, only 1 is free: it keeps waiting
    assert view(out) == [("a", [41], 5, [0, 1, 3], True, 2)]
    assert s.update_from_output(out, [42]) == [EngineOutput("a", [42], True, "length")]
    out = s.schedule()  # b recomputes its prompt and first output, then samples its second token
    assert view(out) == [("b", [5, 6, 7, 8, 50], 0, [2, 3, 1], True, 1)]
    assert s.update_from_output(out, [51]) == [EngineOutput("b", [51])]
    assert s.get_block_table("b") == [2, 3, 1]


def test_only_request_preempts_itself_when_others_hold_blocks():
    s = make_scheduler(num_blocks=2, block_size=2)
    s.reserve("r", 2)  # block 0 held by a reservation
    s.add_request(req("a", [1, 2], max_tokens=3))
    out = s.schedule()
    s.update_from_output(out, [3])
    out = s.schedule()
    assert out.preempted_req_ids == ["a"] and out.seqs == []
    assert (s.num_running, s.num_waiting) == (0, 1)
    s.release_reservation("r")
    assert view(s.schedule()) == [("a", [1, 2, 3], 0, [1, 0], True, 1)]


def test_max_num_seqs_limits_admission():
    s = make_scheduler(max_num_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", [1, 2]))
    assert [x.req_id for x in s.schedule().seqs] == ["r0", "r1"]
    assert (s.num_running, s.num_waiting) == (2, 1)


def test_stop_frees_blocks():
    s = make_scheduler(num_blocks=8)
    s.add_request(req("a", [1, 2, 3, 4, 5]))
    s.add_request(req("b", [1, 2], ignore_eos=True, max_tokens=2))
    out = s.schedule()
    assert s.update_from_output(out, [EOS, EOS]) == [
        EngineOutput("a", [EOS], True, "stop"),
        EngineOutput("b", [EOS]),
    ]
    assert s.kv_cache_manager.num_used_blocks == 1
    out = s.schedule()
    assert s.update_from_output(out, [EOS]) == [EngineOutput("b", [EOS], True, "length")]
    assert s.kv_cache_manager.num_used_blocks == 0
    assert not s.has_unfinished_requests()


def test_max_model_len_finishes_with_length():
    s = make_scheduler()
    r = req("a", range(1, 63), max_tokens=100)
    s.add_request(r)
    assert r.max_model_len == 64
    s.update_from_output(s.schedule(), [5])
    assert s.update_from_output(s.schedule(), [6]) == [EngineOutput("a", [6], True, "length")]


def test_abort_everywhere():
    s = make_scheduler(max_num_seqs=1)
    s.add_request(req("run", [1, 2, 3]))
    s.add_request(req("wait", [4]))
    s.schedule()
    assert s.abort_request("wait") and s.num_waiting == 0
    assert s.abort_request("run") and s.num_running == 0
    assert s.kv_cache_manager.num_used_blocks == 0
    assert not s.abort_request("run")
    # aborted between schedule and update: the result is ignored
    s.add_request(req("late", [1]))
    out = s.schedule()
    s.abort_request("late")
    assert s.update_from_output(out, [7]) == []


def test_prefill_worker_holds_blocks_until_released():
    s = make_scheduler()
    s.add_request(req("p", [1, 2, 3, 4, 5], max_tokens=1, hold=True))
    out = s.schedule()
    assert s.update_from_output(out, [9]) == [EngineOutput("p", [9], True, "length")]
    assert not s.has_unfinished_requests()
    assert s.get_block_table("p") == [0, 1]
    assert s.kv_cache_manager.num_used_blocks == 2
    with pytest.raises(InvalidRequest):
        s.add_request(req("p", [1]))  # still held: the id is taken
    assert s.release_held("p") and not s.release_held("p")
    assert s.kv_cache_manager.num_used_blocks == 0


def test_abort_releases_held_and_reserved():
    s = make_scheduler()
    s.add_request(req("p", [1, 2], max_tokens=1, hold=True))
    s.update_from_output(s.schedule(), [3])
    s.reserve("d", 5)
    assert s.abort_request("p") and s.abort_request("d")
    assert s.kv_cache_manager.num_used_blocks == 0


def test_decode_worker_reservation_becomes_running():
    s = make_scheduler()
    assert s.reserve("d", 5) == [0, 1]
    assert s.get_block_table("d") == [0, 1]
    assert not s.has_unfinished_requests()
    out = s.add_prefilled_request(req("d", [1, 2, 3, 4, 5]), first_token_id=7)
    assert out == EngineOutput("d", [], False, None)
    out = s.schedule()
    assert view(out) == [("d", [7], 5, [0, 1], True, 1)]
    assert s.update_from_output(out, [8]) == [EngineOutput("d", [8])]
    assert s.reservations == set()


def test_prefilled_request_can_finish_at_once():
    s = make_scheduler()
    s.reserve("eos", 3)
    s.reserve("one", 3)
    assert s.add_prefilled_request(req("eos", [1, 2, 3]), EOS) == EngineOutput("eos", [], True, "stop")
    assert s.add_prefilled_request(req("one", [1, 2, 3], max_tokens=1), 5) == EngineOutput(
        "one", [], True, "length"
    )
    assert s.kv_cache_manager.num_used_blocks == 0 and s.num_running == 0


def test_prefilled_request_errors():
    s = make_scheduler()
    with pytest.raises(ReservationNotFound):
        s.add_prefilled_request(req("x", [1]), 2)
    s.reserve("x", 4)
    with pytest.raises(InvalidRequest):
        s.add_prefilled_request(req("x", [1, 2, 3, 4, 5]), 2)
    assert s.get_block_table("x") == [0]  # the reservation stays
    assert s.release_reservation("x") and not s.release_reservation("x")


def test_reserve_refusals():
    s = make_scheduler(num_blocks=4, max_num_seqs=2)
    with pytest.raises(CapacityExceeded):
        s.reserve("big", 17)
    with pytest.raises(InvalidRequest):
        s.reserve("zero", 0)
    with pytest.raises(CapacityExceeded):
        s.reserve("long", 8, max_tokens=20)  # could need 7 blocks
    s.reserve("a", 4)
    with pytest.raises(InvalidRequest):
        s.reserve("a", 4)
    s.reserve("b", 4)
    with pytest.raises(CapacityExceeded):
        s.reserve("c", 4)  # batch full
    s.release_reservation("b")  # free queue: 2 3 1
    s.add_request(req("w", range(1, 9), max_tokens=1))
    with pytest.raises(CapacityExceeded):
        s.reserve("c", 4)  # a request is waiting: it goes first
    assert view(s.schedule()) == [("w", list(range(1, 9)), 0, [2, 3], True, 0)]
    with pytest.raises(CapacityExceeded):
        s.reserve("c", 4)  # running w plus reserved a fill the batch
    s.release_reservation("a")  # free queue: 1 0
    assert s.reserve("c", 4) == [1]


def test_add_request_validation():
    s = make_scheduler(num_blocks=4, block_size=4, max_queue_len=1)
    with pytest.raises(InvalidRequest):
        s.add_request(req("e", []))
    with pytest.raises(InvalidRequest):
        s.add_request(req("long", range(64)))
    with pytest.raises(CapacityExceeded):
        s.add_request(req("big", range(10), max_tokens=10))  # 19 KV slots > 16
    s.add_request(req("ok", range(10), max_tokens=7))  # 16 KV slots: fits exactly
    with pytest.raises(InvalidRequest):
        s.add_request(req("ok", [1]))
    with pytest.raises(CapacityExceeded):
        s.add_request(req("full", [1]))


def test_update_rejects_bad_results():
    s = make_scheduler()
    s.add_request(req("a", [1]))
    out = s.schedule()
    with pytest.raises(ValueError):
        s.update_from_output(out, [])
    with pytest.raises(ValueError):
        s.update_from_output(out, [None])


def test_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_batched_tokens=0)
