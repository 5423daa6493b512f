"""Host time per decode step (CPU): what the GPU waits for between steps.

The engine runs with a do-nothing executor (:class:`InstantExecutor`: checks
the inputs and builds them with the CUDA-graph path's numpy code,
:class:`engine.cuda_graphs.DecodeHostInputs`, then "samples" fixed token ids
at once), so every measured second is host Python: the scheduler, the input
build, ``update_from_output`` and the ``LLM`` bookkeeping (incremental
detokenisation with the bundled tokenizer, stop-string matching). Batches of
``B`` prompts of ``--prompt-len`` tokens (1k context, as the GPU profile in
``bench/engine_throughput.py``) each decode ``--output-len`` tokens; per
decode step (every request decoding) the median over steps of:

- ``schedule``: ``Scheduler.schedule`` / ``schedule_ahead``;
- ``input_build``: the executor's ``launch`` (input checks + numpy build);
- ``update``: ``Scheduler.update_from_output``;
- ``core_other``: the rest of ``EngineCore.step`` (in-flight bookkeeping);
- ``llm_bookkeeping``: ``LLM`` work between two ``step`` calls;
- ``total``: period between consecutive ``step`` calls.

Times are CPU seconds of the engine thread (``time.thread_time``) by default:
on a shared machine they do not count time the thread waited for a core;
``--clock wall`` uses ``time.perf_counter``.

Synchronous steps put ``total`` on the GPU's critical path every step.
Asynchronous scheduling launches step N + 1 before step N's results are
applied, so the GPU waits only for ``max(0, total - gpu_step_s)``
(``gpu_idle_s`` below, for the 7.5 ms batch-64 step of Llama-3-8B on an H200,
``docs/performance.md``). On CPU nothing overlaps: this measures the host work,
not the overlap.

Example::

    python -m bench.host_overhead --batch-sizes 1 64 --output-len 96
    python -m bench.host_overhead --profile 64   # cProfile of the async batch-64 run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from engine.batch import SequenceInput
from engine.block_pool import BlockPool
from engine.cuda_graphs import DecodeHostInputs
from engine.engine_core import EngineCore
from engine.kv_cache_manager import KVCacheManager
from engine.llm import LLM
from engine.model_runner import check_inputs
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.worker_config import BUNDLED_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "host_overhead_cpu.json"
PARTS = ("schedule", "input_build", "update", "core_other", "llm_bookkeeping", "total")
#: GPU time of a batch-64 decode step, Llama-3-8B shape on an H200 (docs/performance.md).
GPU_STEP_S = 7.5e-3
BLOCK_SIZE = 16
MAX_MODEL_LEN = 4096


class InstantStep:
    """A finished step: its ids are known at once."""

    def __init__(self, values: list[int | None]) -> None:
        self.values = values

    def results(self) -> list[int | None]:
        return self.values


class InstantExecutor:
    """A do-nothing :class:`engine.engine_core.AsyncModelExecutor`: builds the inputs as
    the CUDA-graph path does, on CPU buffers, and samples ``token_ids[output_index % len]``.

    Args:
        token_ids: the ids it "samples" in turn.
        num_blocks: KV blocks (input checks).
        max_batch_size: most sequences of a decode step.
    """

    def __init__(self, token_ids: Sequence[int], num_blocks: int, max_batch_size: int) -> None:
        self.token_ids = list(token_ids)
        self.num_blocks = num_blocks
        self.host = DecodeHostInputs(max_batch_size, -(-MAX_MODEL_LEN // BLOCK_SIZE), BLOCK_SIZE, False)

    def launch(self, seqs: list[SequenceInput], previous: InstantStep | None = None) -> InstantStep:
        if all(len(s.token_ids) == 1 for s in seqs):  # as ModelRunner.launch on the CUDA-graph path
            self.host.fill_decode(seqs, self.num_blocks, MAX_MODEL_LEN)
        else:
            check_inputs(seqs, self.num_blocks, BLOCK_SIZE, MAX_MODEL_LEN)
        tokens = self.token_ids
        return InstantStep([tokens[s.output_index % len(tokens)] if s.sample else None for s in seqs])

    def execute(self, seqs: list[SequenceInput]) -> list[int | None]:
        return self.launch(seqs).results()

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        raise AssertionError("no forks in this benchmark")


class StepClock:
    """Wraps the core's and scheduler's methods to time each part of every step."""

    def __init__(self, core: EngineCore, executor: InstantExecutor, clock: Callable[[], float]) -> None:
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = {}
        self._last_return = 0.0
        self._clock = clock
        scheduler = core.scheduler
        self._wrap(scheduler, "schedule", "schedule")
        self._wrap(scheduler, "schedule_ahead", "schedule")
        self._wrap(scheduler, "update_from_output", "update")
        self._wrap(executor, "launch", "input_build")
        step = core.step
        self.batch_sizes: list[int] = []

        def timed_step() -> Any:
            start = clock()
            outputs = step()
            end = clock()
            parts = self._current
            self._current = {}
            inner = sum(parts.values())
            parts["core_other"] = end - start - inner
            if self._last_return:
                parts["llm_bookkeeping"] = start - self._last_return
                parts["total"] = (
                    end - self._last_return
                )  # one period: bookkeeping of the previous outputs + step
            self._last_return = end
            self.steps.append(parts)
            self.batch_sizes.append(len(outputs))
            return outputs

        core.step = timed_step  # type: ignore[method-assign]

    def _wrap(self, owner: Any, name: str, part: str) -> None:
        method = getattr(owner, name)

        clock = self._clock

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return method(*args, **kwargs)
            finally:
                self._current[part] = self._current.get(part, 0.0) + clock() - start

        setattr(owner, name, timed)


def build_llm(
    batch_size: int, prompt_len: int, output_len: int, async_scheduling: bool
) -> tuple[LLM, InstantExecutor]:
    """The bundled model's ``LLM`` (its tokenizer and bookkeeping) around a core with
    an :class:`InstantExecutor` and a block pool for the whole batch."""
    llm = LLM(BUNDLED_MODEL_DIR, dtype="float32", device="cpu", num_kv_blocks=1)
    assert llm.tokenizer is not None
    text = (
        "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends. "
    )
    num_blocks = batch_size * -(-(prompt_len + output_len) // BLOCK_SIZE) + 8
    executor = InstantExecutor(llm.tokenizer.encode(text)[1:], num_blocks, batch_size)
    config = SchedulerConfig(
        max_num_seqs=batch_size,
        max_num_batched_tokens=batch_size * prompt_len,
        max_model_len=MAX_MODEL_LEN,
    )
    scheduler = Scheduler(config, KVCacheManager(BlockPool(num_blocks, BLOCK_SIZE)))
    llm.engine_core = EngineCore(scheduler, executor, async_scheduling=async_scheduling)
    return llm, executor


CLOCKS: dict[str, Callable[[], float]] = {"thread": time.thread_time, "wall": time.perf_counter}


def measure(
    batch_size: int, prompt_len: int, output_len: int, async_scheduling: bool, clock: str = "thread"
) -> dict[str, Any]:
    """Median seconds per decode step of each part (see the module docstring)."""
    llm, executor = build_llm(batch_size, prompt_len, output_len, async_scheduling)
    vocab = llm.model_config.vocab_size
    prompts = [[(7 * i + 13 * j) % vocab for j in range(prompt_len)] for i in range(batch_size)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, stop=["\n\n\n"])
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    timer = StepClock(llm.engine_core, executor, CLOCKS[clock])
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    decode = [
        s for s, n in zip(timer.steps, timer.batch_sizes, strict=True) if n == batch_size and "total" in s
    ]
    decode = decode[2:]  # the first outputs follow the prefill step
    medians = {part: statistics.median(s.get(part, 0.0) for s in decode) for part in PARTS}
    core = llm.engine_core
    return {
        "batch_size": batch_size,
        "async_scheduling": async_scheduling,
        "clock": clock,
        "decode_steps": len(decode),
        "async_steps": core.num_async_steps,
        "sync_steps": core.num_sync_steps,
        **{f"{part}_s": value for part, value in medians.items()},
        "gpu_step_s": GPU_STEP_S,
        "gpu_idle_s": max(0.0, medians["total"] - GPU_STEP_S) if async_scheduling else medians["total"],
    }


def profile(batch_size: int, prompt_len: int, output_len: int) -> str:
    """cProfile of one asynchronous run (top 25 functions by own time)."""
    llm, _ = build_llm(batch_size, prompt_len, output_len, async_scheduling=True)
    vocab = llm.model_config.vocab_size
    prompts = [[(7 * i + 13 * j) % vocab for j in range(prompt_len)] for i in range(batch_size)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
    return stream.getvalue()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-len", type=int, default=1024, help="tokens per prompt")
    parser.add_argument("--output-len", type=int, default=96, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (the median run is kept)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="thread", help="engine-thread CPU or wall time"
    )
    parser.add_argument(
        "--profile", type=int, metavar="B", help="print a cProfile of the async run at batch B"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help="JSON output")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.prompt_len < 1 or args.output_len < 8 or args.repeats < 1:
        parser.error("--batch-sizes, --prompt-len and --repeats must be >= 1, --output-len >= 8")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print the table, write the JSON and return it."""
    args = parse_args(argv)
    if args.profile is not None:
        print(profile(args.profile, args.prompt_len, args.output_len))
        return {}
    rows = []
    for batch_size in args.batch_sizes:
        for async_scheduling in (False, True):
            runs = [
                measure(batch_size, args.prompt_len, args.output_len, async_scheduling, args.clock)
                for _ in range(args.repeats)
            ]
            rows.append(sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2])
    report = {
        "benchmark": "host_overhead",
        "command": " ".join(["python -m bench.host_overhead", *(argv if argv is not None else sys.argv[1:])]),
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "environment": {"python": platform.python_version(), "machine": platform.machine(), "cpu": _cpu()},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows)
    Console().print(f"wrote {args.out}")
    return report


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="host time per decode step (median, ms)")
    for column in ("batch", "mode", *PARTS, "GPU idle at 7.5 ms step"):
        table.add_column(column, justify="right")
    ms: Callable[[float], str] = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
    for r in rows:
        table.add_row(
            str(r["batch_size"]),
            "async" if r["async_scheduling"] else "sync",
            *(ms(r[f"{part}_s"]) for part in PARTS),
            ms(r["gpu_idle_s"]),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
