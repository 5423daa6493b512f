"""Asynchronous scheduling (``EngineCore(async_scheduling=True)``) against the synchronous engine.

The fake executor below is "a device": a step's tokens are computed when it is
launched (in queue order, like a CUDA stream) and only *reported* when the core
asks for its results; a placeholder input takes its token from the previous
step's values, as the runner's device-side gather does. It records which steps
were launched before their predecessor was synced (real overlap), and checks
that no block written by an unsynced step is ever free in the pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from engine.batch import PLACEHOLDER_TOKEN_ID, SequenceInput
from engine.block_pool import BlockPool
from engine.engine_core import EngineCore, EngineOutput
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.test_engine_core import EOS, PROMPTS, PagedFakeRunner, reference


@dataclasses.dataclass
class FakeStep:
    values: list[int | None]
    blocks: set[int]
    synced: bool = False

    def results(self) -> list[int | None]:
        self.synced = True
        return self.values


class AsyncPagedFake(PagedFakeRunner):
    """:class:`PagedFakeRunner` with ``launch`` (see the module docstring)."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        self.launched: list[FakeStep] = []
        self.num_overlapped = 0
        self.pool: BlockPool | None = None

    def launch(self, seqs: list[SequenceInput], previous: FakeStep | None = None) -> FakeStep:
        for s in seqs:
            if s.feed_row is None:
                assert PLACEHOLDER_TOKEN_ID not in s.token_ids, s
                continue
            assert s.token_ids == [PLACEHOLDER_TOKEN_ID], s
            assert previous is not None and not previous.synced
            token = previous.values[s.feed_row]
            assert token is not None
            s.token_ids[-1] = token  # the device-side gather
        if previous is not None and not previous.synced:
            self.num_overlapped += 1
        blocks = {s.block_table[p // self.block_size] for s in seqs for p in range(s.start_pos, s.end_pos)}
        step = FakeStep(self.execute(seqs), blocks)
        self.launched.append(step)
        self.check_in_flight_blocks()
        return step

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        raise AssertionError("no forks here")

    def check_in_flight_blocks(self) -> None:
        """Every block an unsynced step writes is held (a freed one could be reserved and
        overwritten by a KV transfer while the step still writes it)."""
        assert self.pool is not None
        for step in self.launched:
            if not step.synced:
                free = [b for b in step.blocks if self.pool.blocks[b].ref_cnt == 0]
                assert not free, f"blocks {free} are free while a step in flight writes them"


def make(async_scheduling: bool, num_blocks=64, block_size=4, budget=256, max_num_seqs=8):
    runner = AsyncPagedFake(block_size)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=256)
    pool = BlockPool(num_blocks, block_size)
    runner.pool = pool
    core = EngineCore(Scheduler(config, KVCacheManager(pool)), runner, async_scheduling=async_scheduling)
    return core, runner


def run(core: EngineCore, runner: AsyncPagedFake, requests: list[Request], on_output=None):
    """Step to completion; per request (tokens, finish reason). ``on_output(core, out)``
    runs after each output (the caller's bookkeeping, e.g. an abort)."""
    for r in requests:
        core.add_request(r)
    tokens: dict[str, list[int]] = {r.req_id: [] for r in requests}
    reasons: dict[str, str | None] = {}
    for _ in range(2000):
        if not core.has_unfinished_requests():
            break
        outputs = core.step()
        assert len({o.req_id for o in outputs}) == len(outputs), "one output per request per step"
        for out in outputs:
            assert out.req_id not in reasons, f"output after the end of {out.req_id}"
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.req_id] = out.finish_reason
            if on_output is not None:
                on_output(core, out)
        runner.check_in_flight_blocks()
    assert not core.has_unfinished_requests()
    kv = core.scheduler.kv_cache_manager
    assert kv.num_used_blocks == 0 and kv.num_deferred_blocks == 0
    return {rid: (t, reasons.get(rid)) for rid, t in tokens.items()}


def requests(max_tokens=12, ignore_eos=False, **sampling) -> list[Request]:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **sampling)
    return [Request(f"r{i}", p, sp, eos_token_ids=(EOS,)) for i, p in enumerate(PROMPTS)]


def expected(max_tokens=12) -> dict[str, tuple[list[int], str]]:
    out = {}
    for i, p in enumerate(PROMPTS):
        ref = reference(p, max_tokens)
        out[f"r{i}"] = (ref, "stop" if ref[-1] == EOS else "length")
    return out


def test_async_equals_sync_and_steps_overlap():
    sync_core, sync_runner = make(False)
    async_core, async_runner = make(True)
    assert run(sync_core, sync_runner, requests()) == expected()
    assert run(async_core, async_runner, requests()) == expected()
    assert sync_core.num_async_steps == 0 and sync_runner.num_overlapped == 0
    # one prefill step (sync), one decode launched from idle, then every step ahead
    assert async_runner.num_overlapped == async_core.num_async_steps == 10
    assert async_core.num_sync_steps == 2
    # r4 stops on EOS after 4 tokens: step 5 computed one wasted row for it, dropped
    rows = [[s.req_id for s in step] for step in async_runner.steps]
    assert sum("r4" in step for step in rows) == 5
    # length finishes are known ahead: no row beyond max_tokens
    assert sum("r0" in step for step in rows) == 12


def test_async_equals_sync_under_preemption_and_chunked_prefill():
    core, runner = make(True, num_blocks=12, block_size=2, budget=5)
    assert run(core, runner, requests(max_tokens=10)) == expected(10)
    seqs = [s for step in runner.steps for s in step]
    assert any(not s.sample for s in seqs), "no chunked prefill happened"
    assert any(s.start_pos == 0 and s.output_index > 0 for s in seqs), "no recompute after preemption"
    assert runner.num_overlapped > 0
    assert all(sum(len(s.token_ids) for s in step) <= 5 for step in runner.steps)


def test_abort_mid_stream_defers_the_exact_blocks():
    core, runner = make(True, num_blocks=16)
    kv = core.scheduler.kv_cache_manager
    pool = kv.block_pool
    for r in requests(ignore_eos=True)[:2]:  # r0: 7 prompt tokens, r1: 2
        core.add_request(r)
    assert core.step() == [EngineOutput("r0", [33]), EngineOutput("r1", [92])]  # prefill, sync
    assert core.step() == [EngineOutput("r0", [21]), EngineOutput("r1", [82])]  # decode 1; decode 2 in flight
    assert runner.num_overlapped == 1 and not runner.launched[-1].synced
    table = core.scheduler.get_block_table("r0")
    assert table == [0, 1, 3]  # r1 took block 2; block 3 holds position 8, written by the step in flight
    assert core.abort_request("r0")
    assert kv.num_deferred_blocks == 3
    assert all(pool.blocks[b].ref_cnt == 1 for b in table)
    assert set(table).isdisjoint(pool.free_queue.block_ids())
    # a KV transfer reserving blocks now never gets r0's
    reserved = core.scheduler.reserve("d", 12)
    assert set(reserved).isdisjoint(table) and reserved == [4, 5, 6]
    r1 = reference(PROMPTS[1], 3)
    assert r1[:2] == [92, 82]
    assert core.step() == [EngineOutput("r1", [r1[2]])]  # decode 2; r0's row dropped
    assert kv.num_deferred_blocks == 0
    assert all(pool.blocks[b].ref_cnt == 0 for b in table)
    assert pool.free_queue.block_ids()[-3:] == [3, 1, 0]  # freed tail first
    core.scheduler.release_reservation("d")
    while core.has_unfinished_requests():
        core.step()
    assert kv.num_used_blocks == 0


def test_stop_string_style_abort_never_emits_an_extra_token():
    """The caller ends r0 after its 3rd token (as LLM does on a stop string): the
    row already computed for its 4th token is dropped."""

    def stop_at_three(core: EngineCore, out: EngineOutput) -> None:
        seen.setdefault(out.req_id, []).extend(out.new_token_ids)
        if out.req_id == "r0" and len(seen["r0"]) == 3:
            core.abort_request("r0")

    results = {}
    for mode in (False, True):
        seen: dict[str, list[int]] = {}
        core, runner = make(mode)
        results[mode] = run(core, runner, requests(), on_output=stop_at_three)
    assert results[True] == results[False]
    assert results[True]["r0"] == (reference(PROMPTS[0], 3), None)


def test_eos_finish_frees_after_the_wasted_row():
    core, runner = make(True, num_blocks=8, block_size=4)
    core.add_request(Request("r4", PROMPTS[4], SamplingParams(max_tokens=12), eos_token_ids=(EOS,)))
    outs = []
    while core.has_unfinished_requests():
        outs += core.step()
        runner.check_in_flight_blocks()
    assert [o.new_token_ids[0] for o in outs] == [89, 76, 18, EOS]
    assert outs[-1].finish_reason == "stop"
    assert len(runner.steps) == 5  # the row after EOS was computed ...
    assert core.scheduler.kv_cache_manager.num_used_blocks == 0  # ... and its blocks freed after it


@pytest.mark.parametrize(
    "sampling",
    [
        {"repetition_penalty": 1.3},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logprobs": 2},
        {"prompt_logprobs": 1},
        {"n": 2},
    ],
)
def test_requests_needing_host_tokens_run_synchronously(sampling):
    core, runner = make(True)
    core.add_request(
        Request(
            "x", [5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True, **sampling), eos_token_ids=(EOS,)
        )
    )
    while core.has_unfinished_requests():
        core.step()
    assert core.num_async_steps == 0 and runner.num_overlapped == 0
    assert core.num_sync_steps == 6


def test_a_synchronous_request_in_the_batch_blocks_async_steps_only_while_it_runs():
    core, runner = make(True)
    plain = requests(max_tokens=12, ignore_eos=True)[:2]
    penalised = Request(
        "p", [9, 9], SamplingParams(max_tokens=3, repetition_penalty=1.2), eos_token_ids=(EOS,)
    )
    results = run(core, runner, [*plain, penalised])
    assert results["r0"] == (reference(PROMPTS[0], 12), "length")
    assert results["p"] == (reference([9, 9], 3), "length")
    # prefill + 2 steps with "p" decoding run synchronously; then 9 decodes, one from idle
    assert core.num_sync_steps == 4 and core.num_async_steps == 8


def test_layer_streaming_hook_forces_synchronous_steps():
    core, runner = make(True)
    seen: list[int] = []
    core.before_execute = lambda seqs: seen.append(len(seqs))
    assert run(core, runner, requests()) == expected()
    assert core.num_async_steps == 0 and len(seen) == core.num_sync_steps == 12


def test_prefilled_request_joins_while_a_step_is_in_flight():
    """Decode worker: a reservation turned into a running request between two async steps."""
    results = {}
    for mode in (False, True):
        core, runner = make(mode)
        core.add_request(Request("a", PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True)))
        core.step()
        core.step()
        first = reference(PROMPTS[3], 1)[0]
        core.scheduler.reserve("b", len(PROMPTS[3]))
        runner.slots.update(  # "the KV transfer": b's prompt lands in its reserved blocks
            {
                runner.block_size * core.scheduler.get_block_table("b")[p // 4] + p % 4: t
                for p, t in enumerate(PROMPTS[3])
            }
        )
        b = Request("b", PROMPTS[3], SamplingParams(max_tokens=5, ignore_eos=True))
        core.scheduler.add_prefilled_request(b, first)
        results[mode] = run(core, runner, [])
        results[mode]["b"] = b.output_token_ids
        results[mode]["a"] = core.num_async_steps > 0
    assert results[True]["b"] == results[False]["b"] == reference(PROMPTS[3], 5)
    assert results[True]["a"] and not results[False]["a"]


def test_async_needs_a_runner_that_can_launch():
    with pytest.raises(ValueError, match="launch"):
        EngineCore(
            Scheduler(SchedulerConfig(), KVCacheManager(BlockPool(4, 4))),
            PagedFakeRunner(4),  # type: ignore[arg-type]  # execute only
            async_scheduling=True,
        )


# ---- the real model on CPU (bundled model, float32) ------------------------------


@pytest.fixture(scope="module")
def make_llm() -> Callable[..., Any]:
    from engine.llm import LLM
    from engine.worker_config import BUNDLED_MODEL_DIR

    def build(async_scheduling: bool, **kw: Any) -> LLM:
        return LLM(
            str(BUNDLED_MODEL_DIR), dtype="float32", device="cpu", async_scheduling=async_scheduling, **kw
        )

    return build


def _summary(outs) -> list[tuple]:
    return [
        (
            c.token_ids,
            c.finish_reason,
            c.text,
            [(lp.token_id, round(lp.logprob, 4)) for lp in c.logprobs or []],
        )
        for o in outs
        for c in o.outputs
    ]


def test_llm_async_equals_sync_on_the_real_model(make_llm, monkeypatch):
    preemptions = []
    original = Scheduler._preempt

    def counting(self: Scheduler, request: Request) -> None:
        preemptions.append(request.req_id)
        original(self, request)

    monkeypatch.setattr(Scheduler, "_preempt", counting)
    prompts = ["Once upon a time", [1, 2, 3], "The cat sat", [7] * 30, "Hello", [5, 6, 7, 8]]
    params = [
        SamplingParams(max_tokens=16, temperature=0.0),
        SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, seed=11),
        SamplingParams(max_tokens=20, temperature=0.7, top_k=20, seed=5, stop=[" the"]),
        SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[13]),
        SamplingParams(max_tokens=10, temperature=1.0, seed=2, min_p=0.1),
    ]
    results, cores = {}, {}
    for mode in (False, True):
        llm = make_llm(mode, num_kv_blocks=12, block_size=4, max_num_seqs=6, max_num_batched_tokens=16)
        results[mode] = _summary(llm.generate(prompts, params, use_tqdm=False))
        cores[mode] = llm.engine_core
        kv = llm.engine_core.scheduler.kv_cache_manager
        assert kv.num_used_blocks == 0 and kv.num_deferred_blocks == 0
    assert results[True] == results[False]
    assert cores[True].num_async_steps > 0 and cores[False].num_async_steps == 0
    assert preemptions, "no preemption happened"
    reasons = {r[1] for r in results[True]}
    assert reasons == {"stop", "length"}


def test_llm_async_with_synchronous_requests_mixed_in(make_llm):
    prompts = ["Once upon a time", [1, 2, 3], "A", "B"]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0),
        SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3),
        SamplingParams(max_tokens=10, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=6, temperature=0.8, seed=4, n=2),
    ]
    results = {}
    for mode in (False, True):
        llm = make_llm(mode, num_kv_blocks=64)
        results[mode] = _summary(llm.generate(prompts, params, use_tqdm=False))
        assert llm.engine_core.scheduler.kv_cache_manager.num_used_blocks == 0
    assert results[True] == results[False]


def test_worker_flag_round_trips(tmp_path):
    from cli.main import build_parser
    from cli.options import worker_config_from_args, worker_flags
    from engine.worker_config import WorkerConfig

    config = WorkerConfig(role="decode", model=tmp_path, async_scheduling=True)
    flags = worker_flags(config)
    assert "--async-scheduling" in flags
    args = build_parser().parse_args(["decode", *flags])
    assert worker_config_from_args(args, "decode").async_scheduling
    assert "--async-scheduling" not in worker_flags(WorkerConfig(role="decode", model=tmp_path))


# ---- pieces: host input build, device sampling, the runner's device-side feed ------------


def test_decode_host_inputs_write_block_tables_incrementally():
    from engine.cuda_graphs import DecodeHostInputs

    host = DecodeHostInputs(max_batch_size=4, max_blocks=4, block_size=4, pin_memory=False)
    a, b = [7, 2], [5]
    assert host.fill([11, 12], [5, 3], [a, b]) == 2  # widest context: position 5 -> 2 blocks
    assert host.i64[:, :2].tolist() == [[11, 12], [5, 3], [2 * 4 + 1, 5 * 4 + 3]]
    assert host.seq_lens[:2].tolist() == [6, 4]
    assert host.tables[:2, :2].tolist() == [[7, 2], [5, 0]]
    host.tables[0, 0] = 99  # not rewritten while row 0 keeps reading the same (grown) list
    a.append(3)
    assert host.fill([13, 14], [8, 2], [a, b]) == 3
    assert host.tables[:2, :3].tolist() == [[99, 2, 3], [5, 0, 0]]
    assert host.i64[2, :2].tolist() == [3 * 4 + 0, 5 * 4 + 2]
    # another list in the row (another request, or a copy-on-write) is written from its start
    assert host.fill([15, 16], [1, 8], [b, [7, 2, 6]]) == 3
    assert host.tables[:2, :3].tolist() == [[5, 2, 3], [7, 2, 6]]
    assert host.i64[2, :2].tolist() == [5 * 4 + 1, 6 * 4 + 0]


def test_decode_host_inputs_check_what_they_write():
    from engine.cuda_graphs import DecodeHostInputs

    host = DecodeHostInputs(max_batch_size=4, max_blocks=4, block_size=4, pin_memory=False)
    greedy = SamplingParams(temperature=0.0)
    ok = SequenceInput("ok", [3], 4, [0, 1], True, greedy)
    assert host.fill_decode([ok], num_blocks=2, max_model_len=16) == 2
    with pytest.raises(ValueError, match=r"^bad: block ids \[7\] outside the cache of 2 blocks"):
        host.fill_decode([ok, SequenceInput("bad", [3], 4, [1, 7], True, greedy)], 2, 16)
    with pytest.raises(ValueError, match=r"^long: 17 tokens exceed max_model_len 16"):
        host.fill_decode([ok, SequenceInput("long", [3], 16, [0, 1, 0, 1, 0], True, greedy)], 2, 16)


def test_copy_on_write_replaces_the_block_table_list():
    kv = KVCacheManager(BlockPool(8, 4))
    kv.allocate("p", 6)
    kv.fork("p", ["c0", "c1"])
    view = kv.block_table_view("c0")
    assert view == [0, 1]
    assert kv.copy_on_write("c0", 6) == (1, 2)
    assert kv.block_table_view("c0") == [0, 2] and kv.block_table_view("c0") is not view
    assert view == [0, 1]  # a reader's old list is untouched
    kv.allocate("c0", 9)
    assert kv.block_table_view("c0") == [0, 2, 3] == kv.get_block_table("c0")


def test_sample_ids_equals_sample_on_mixed_rows():
    import torch

    from engine.sampler import Sampler

    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=10, seed=3),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.05, seed=4),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.6, seed=5),
    ]
    seqs = [SequenceInput(f"r{i}", [1], 3, [0], True, p, output_index=i) for i, p in enumerate(params)]
    ids = Sampler(0).sample_ids(logits, seqs)
    assert ids is not None and ids.dtype == torch.int64
    assert ids.tolist() == Sampler(0).sample(logits, seqs)
    assert ids[0] == logits[0].argmax() and ids[3] == logits[3].argmax()
    with_logprobs = [dataclasses.replace(seqs[0], sampling=SamplingParams(logprobs=1))]
    assert Sampler(0).sample_ids(logits[:1], with_logprobs) is None


def test_runner_feeds_placeholders_from_the_previous_step(make_llm):
    """Eager path on CPU: a decode whose token is a placeholder equals one given the token."""
    llm = make_llm(False, num_kv_blocks=8, block_size=4)
    runner = llm.runner
    greedy = SamplingParams(temperature=0.0)
    prompts = [[0, 5, 6, 7, 8], [0, 9, 10]]
    tables = [[0, 1, 2], [3, 4]]
    first = runner.launch(
        [
            SequenceInput(f"r{i}", p, 0, t, True, greedy)
            for i, (p, t) in enumerate(zip(prompts, tables, strict=True))
        ]
    )
    fed = runner.launch(
        [
            SequenceInput("r1", [PLACEHOLDER_TOKEN_ID], 3, tables[1], True, greedy, 1, feed_row=1),
            SequenceInput("r0", [PLACEHOLDER_TOKEN_ID], 5, tables[0], True, greedy, 1, feed_row=0),
        ],
        first,
    )
    tokens = first.results()
    assert fed.sampled_ids is not None
    expected = runner.execute(
        [
            SequenceInput("r1", [tokens[1]], 3, tables[1], True, greedy, 1),
            SequenceInput("r0", [tokens[0]], 5, tables[0], True, greedy, 1),
        ]
    )
    assert fed.results() == expected
    with pytest.raises(ValueError, match="feed_row"):
        runner.launch(
            [SequenceInput("r0", [PLACEHOLDER_TOKEN_ID], 6, tables[0], True, greedy, 2, feed_row=0)]
        )


def test_host_overhead_benchmark_runs_both_modes(tmp_path):
    from bench.host_overhead import PARTS, main

    report = main(["--batch-sizes", "4", "--prompt-len", "40", "--output-len", "12", "--repeats", "1",
                   "--out", str(tmp_path / "out.json")])  # fmt: skip
    rows = {r["async_scheduling"]: r for r in report["results"]}
    assert rows[False]["async_steps"] == 0 and rows[True]["async_steps"] > 0
    for row in rows.values():
        assert row["batch_size"] == 4 and row["decode_steps"] > 0
        assert all(row[f"{part}_s"] >= 0 for part in PARTS) and row["total_s"] > 0
    assert (tmp_path / "out.json").is_file()


def test_prefix_cache_hits_are_the_same_with_async_scheduling():
    """Blocks are registered at the update of the step that computed them, in
    both modes, so a later request reuses the same cached prefix."""
    shared = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]  # three full blocks of 4
    results = {}
    for mode in (False, True):
        runner = AsyncPagedFake(4)
        pool = BlockPool(32, 4)
        runner.pool = pool
        config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
        kv = KVCacheManager(pool, enable_prefix_caching=True, model_id="m")
        core = EngineCore(Scheduler(config, kv), runner, async_scheduling=mode)
        sp = SamplingParams(max_tokens=9, ignore_eos=True)
        core.add_request(Request("a", [*shared, 7], sp))
        outs: list[EngineOutput] = []
        for _ in range(4):
            outs += core.step()
        core.add_request(Request("b", [*shared, 7, 7], sp))  # a's first 3 blocks are cached by now
        while core.has_unfinished_requests():
            outs += core.step()
            runner.check_in_flight_blocks()
        tokens = {r: [t for o in outs if o.req_id == r for t in o.new_token_ids] for r in "ab"}
        cached = {o.req_id: o.num_cached_tokens for o in outs if o.finished}
        results[mode] = (tokens, cached)
        assert kv.num_used_blocks == 0 and kv.num_deferred_blocks == 0
    assert results[True] == results[False]
    assert results[True][1] == {"a": 0, "b": 12}
    assert results[True][0]["b"] == reference([*shared, 7, 7], 9)
