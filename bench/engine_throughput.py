"""Colocated throughput: Tandem's engine (``engine.LLM``) against transformers ``generate``.

Both run in this process on the same device and dtype, one after the other,
on the same batches of random token-id prompts of ``--prompt-len`` tokens, each
generating exactly ``--output-len`` tokens greedily (end-of-sequence ignored).
A batch is timed from submission to the last token (prefill included), after
one untimed warm-up run of the same batch, with ``torch.cuda.synchronize``
around the clock on CUDA. Throughput is output tokens per second; ``ratio`` is
engine / transformers.

The engine gets a KV cache sized for the largest batch, every sequence of a
batch runs at once (``max_num_seqs`` = largest batch) and prompts are
prefilled in chunks of ``--max-num-batched-tokens``. transformers runs each
batch as one ``generate`` call on a ``[batch, prompt_len]`` tensor (no padding
needed: every prompt has the same length).

Examples::

    python -m bench.engine_throughput --device cpu --batch-sizes 1 8 --prompt-len 64 --output-len 32
    python -m bench.engine_throughput --device cuda --dtype bfloat16 --load-format dummy \\
        --config-only-shape llama3-8b --batch-sizes 1 32 64 --prompt-len 512 --output-len 128

``--config-only-shape`` writes a config.json of a known model plus the bundled
tokenizer into a temporary directory and implies ``--load-format dummy``: the
engine builds seeded random weights, transformers random-initialises the same
shape (``from_config``), so no checkpoint download is needed. Results are
printed as a table and written as JSON (default ``bench/results/``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.table import Table

from engine.config import ModelConfig, resolve_dtype
from engine.llm import LLM
from engine.model_runner import resolve_device
from engine.sampling_params import SamplingParams
from engine.worker_config import BUNDLED_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

#: ``--config-only-shape`` choices: config.json of well-known models (architecture and shape only).
SHAPES: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B (Meta, 2024): 8.0 B parameters.
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 128256,
    },
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Measurement:
    """One engine on one batch: ``output_tokens`` generated in ``seconds`` (median of repeats)."""

    seconds: float
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def write_config_only_checkpoint(shape: str, out_dir: Path) -> Path:
    """Write ``SHAPES[shape]`` as config.json plus the bundled tokenizer into ``out_dir``.

    Raises:
        KeyError: unknown ``shape``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(SHAPES[shape], indent=2) + "\n")
    for name in _TOKENIZER_FILES:
        shutil.copy(BUNDLED_MODEL_DIR / name, out_dir / name)
    return out_dir


def random_prompts(batch_size: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``batch_size`` prompts of ``prompt_len`` ids drawn uniformly from ``[2, vocab_size)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (batch_size, prompt_len), generator=generator).tolist()


def time_batches(
    generate: Callable[[list[list[int]]], list[list[int]]],
    batches: dict[int, list[list[int]]],
    device: str,
    repeats: int,
) -> dict[int, tuple[Measurement, list[list[int]]]]:
    """Per batch: one untimed warm-up call of ``generate``, then the median of
    ``repeats`` timed calls, and the output token ids of the last call."""
    results = {}
    for batch_size, prompts in batches.items():
        generate(prompts)
        seconds = []
        outputs: list[list[int]] = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            outputs = generate(prompts)
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
        results[batch_size] = (Measurement(statistics.median(seconds), sum(len(o) for o in outputs)), outputs)
    return results


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run_engine(
    args: argparse.Namespace, model_dir: Path, dtype: str, batches: dict[int, list[list[int]]]
) -> dict[int, tuple[Measurement, list[list[int]]]]:
    """Time ``engine.LLM`` on every batch (one engine, KV cache sized for the largest batch);
    with ``--profile`` also fill ``args.profile_report`` (see :func:`profile_engine`)."""
    largest = max(batches)
    blocks_per_seq = -(-(args.prompt_len + args.output_len) // args.block_size)
    num_kv_blocks = largest * blocks_per_seq
    if args.profile:
        num_kv_blocks = max(num_kv_blocks, max(PROFILE_DECODE_BATCHES) * -(-1088 // args.block_size))
    llm = LLM(
        model_dir,
        dtype=dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=num_kv_blocks,
        max_num_seqs=largest,
        max_num_batched_tokens=args.max_num_batched_tokens,
        load_format=args.load_format,
        seed=args.seed,
        async_scheduling=args.async_scheduling,
    )
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    results = time_batches(generate, batches, args.device, args.repeats)
    if args.profile:
        args.profile_report = profile_engine(llm, args)
    return results


#: Batch sizes of the decode-step profile (1k-token context).
PROFILE_DECODE_BATCHES = (1, 64)


def profile_engine(llm: LLM, args: argparse.Namespace) -> dict[str, Any]:
    """Decode step time against the bandwidth floor, prefill FLOP rate against the
    matmul rate, and host time per decode step the GPU waits for (CUDA only).

    - Ceilings (same run): 1 GiB device copy bandwidth, 8192^3 bfloat16 matmul.
    - Decode: prompts of 1024 tokens, 32 greedy tokens; per decode step the GPU
      time (CUDA events from the graph launch, after the host builds the inputs,
      to the sampled tokens; median over steps); the
      floor is (non-embedding weight bytes + KV bytes read at the mean context
      of 1040 tokens) / copy bandwidth.
    - Host time not overlapped: median over decode steps of (period between
      consecutive step starts - GPU time of the step).
    - Each decode batch is measured twice: synchronous steps, then with
      asynchronous scheduling (``EngineCore.async_scheduling``: step N + 1 is
      launched before step N's tokens reach the host, so the scheduler and
      the detokenisation overlap the GPU); entries carry ``async_scheduling``.
    - Prefill: 8 prompts x 2048 tokens, one output token; model FLOPs
      (2 x non-embedding parameters per token + causal attention) over the GPU
      time of the prefill steps.
    """
    from bench.kernels import copy_bandwidth, matmul_flops

    runner = llm.runner
    bandwidth, matmul = copy_bandwidth(), matmul_flops()
    config = runner.model_config
    params = [(n, p) for n, p in runner.model.named_parameters() if "embed_tokens" not in n]  # type: ignore[attr-defined]
    weight_bytes = sum(p.numel() * p.element_size() for _, p in params)
    weight_params = sum(p.numel() for _, p in params)
    kv_bytes_per_token = runner.kv_cache_bytes_per_block // runner.block_size
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    report: dict[str, Any] = {
        "copy_bandwidth_bytes_per_s": bandwidth,
        "matmul_bf16_flops_per_s": matmul,
        "cuda_graphs": runner.graphs is not None,
        "cuda_graph_capture_s": runner.graphs.capture_seconds if runner.graphs else None,
        "cuda_graph_memory_bytes": runner.graphs.capture_memory_bytes if runner.graphs else None,
        "cuda_graph_batch_sizes": runner.graphs.batch_sizes if runner.graphs else None,
        "attention_backend": runner.attention_backend,
        "fused_ops": runner.fused_ops,
        "decode": [],
    }
    core = llm.engine_core
    for batch, async_scheduling in itertools.product(PROFILE_DECODE_BATCHES, (False, True)):
        core.async_scheduling = async_scheduling  # no step is in flight between generate calls
        prompts = random_prompts(batch, 1024, config.vocab_size, args.seed + 7)
        llm.generate(prompts, greedy, use_tqdm=False)  # warm-up
        runner.step_timings = []
        async_steps = core.num_async_steps
        llm.generate(prompts, greedy, use_tqdm=False)
        steps, runner.step_timings = runner.step_timings, None
        decode = [s for s in steps if s.decode and s.num_seqs == batch]
        gpu_s = statistics.median(s.gpu_s for s in decode)
        idle = [b.started_s - a.started_s - a.gpu_s for a, b in itertools.pairwise(decode)]
        floor_s = (weight_bytes + batch * 1040 * kv_bytes_per_token) / bandwidth
        report["decode"].append(
            {
                "batch_size": batch,
                "async_scheduling": async_scheduling,
                "async_steps": core.num_async_steps - async_steps,
                "context": 1040,
                "step_gpu_s": gpu_s,
                "step_wall_s": statistics.median(s.wall_s for s in decode),
                "prepare_s": statistics.median(s.prepare_s for s in decode),
                "host_not_overlapped_s": statistics.median(idle),
                "floor_s": floor_s,
                "ratio_to_floor": gpu_s / floor_s,
                "graph": all(s.graph for s in decode),
            }
        )
    prompts = random_prompts(8, 2048, config.vocab_size, args.seed + 8)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, one, use_tqdm=False)  # warm-up
    runner.step_timings = []
    llm.generate(prompts, one, use_tqdm=False)
    steps, runner.step_timings = runner.step_timings, None
    prefill_s = sum(s.gpu_s for s in steps if not s.decode)
    heads_dim = config.num_attention_heads * config.head_dim
    attention_flops = config.num_hidden_layers * 8 * 4 * heads_dim * 2048 * 2049 / 2
    flops = 2 * weight_params * 8 * 2048 + attention_flops
    report["prefill"] = {
        "prompts": 8,
        "prompt_len": 2048,
        "gpu_s": prefill_s,
        "steps": sum(not s.decode for s in steps),
        "flops": flops,
        "flops_per_s": flops / prefill_s,
        "ratio_to_matmul": flops / prefill_s / matmul,
    }
    return report


def run_transformers(
    args: argparse.Namespace, model_dir: Path, dtype: str, batches: dict[int, list[list[int]]]
) -> dict[int, tuple[Measurement, list[list[int]]]]:
    """Time transformers ``generate`` on every batch (random init of the shape under dummy load)."""
    torch_dtype = getattr(torch, dtype)
    if args.load_format == "dummy":
        config = transformers.AutoConfig.from_pretrained(model_dir)
        with torch.device(args.device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model = model.to(args.device).eval()
    # generate() fills unset fields from the model's own generation config, so the
    # end-of-sequence id is removed there too: every sequence runs output_len tokens.
    model.generation_config.eos_token_id = None
    generation_config = transformers.GenerationConfig(
        max_new_tokens=args.output_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        input_ids = torch.tensor(prompts, device=args.device)
        with torch.inference_mode():
            out = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config
            )
        return out[:, input_ids.shape[1] :].tolist()

    return time_batches(generate, batches, args.device, args.repeats)


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment(device: str) -> dict[str, Any]:
    """Machine and library versions recorded beside the numbers."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )
    info["tandem_commit"] = commit.stdout.strip() or None
    return info


def _cpu_model() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")  # Linux only
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL_DIR, help="checkpoint directory")
    parser.add_argument(
        "--config-only-shape",
        choices=sorted(SHAPES),
        help="benchmark this model shape with random weights (implies --load-format dummy)",
    )
    parser.add_argument("--load-format", choices=("auto", "safetensors", "dummy"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--output-len", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per batch (median reported)")
    parser.add_argument("--block-size", type=int, default=16, help="engine KV block size (tokens)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=8192, help="engine token budget per step"
    )
    parser.add_argument(
        "--engines", nargs="+", choices=("tandem", "transformers"), default=["tandem", "transformers"]
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of dummy weights")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--async-scheduling",
        action="store_true",
        help="time the engine with asynchronous scheduling (--profile measures both modes)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CUDA: also measure decode step vs bandwidth floor, prefill vs matmul rate, host overhead",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON output (default: bench/results/engine_throughput_<device>_<model>.json)",
    )
    args = parser.parse_args(argv)
    args.profile_report = None
    if args.profile and not resolve_device(args.device).startswith("cuda"):
        parser.error("--profile needs a CUDA device")
    if args.config_only_shape is not None:
        args.load_format = "dummy"
    if min(args.batch_sizes) < 1 or args.prompt_len < 1 or args.output_len < 1 or args.repeats < 1:
        parser.error("--batch-sizes, --prompt-len, --output-len and --repeats must be >= 1")
    args.device = resolve_device(args.device)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table, write the JSON and return it."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(args.device)  # before the runs: the load average is the one they started under
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        model_dir = args.model
        if args.config_only_shape is not None:
            model_dir = write_config_only_checkpoint(
                args.config_only_shape, Path(tmp) / args.config_only_shape
            )
        model_config = ModelConfig.from_pretrained(model_dir)
        dtype = resolve_dtype(args.dtype, model_config, args.device)
        batches = {
            b: random_prompts(b, args.prompt_len, model_config.vocab_size, args.seed + b)
            for b in sorted(set(args.batch_sizes))
        }
        runners = {"tandem": run_engine, "transformers": run_transformers}
        measured = {}
        for name in args.engines:  # one at a time: the models never share device memory
            measured[name] = runners[name](args, model_dir, dtype, batches)
            _free_memory(args.device)
    model_name = args.config_only_shape or model_config.name
    report = {
        "benchmark": "engine_throughput",
        "model": model_name,
        "load_format": args.load_format,
        "async_scheduling": args.async_scheduling,
        "device": args.device,
        "dtype": dtype,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "command": " ".join(
            ["python -m bench.engine_throughput", *(argv if argv is not None else sys.argv[1:])]
        ),
        "environment": env,
        "results": [_row(b, measured, args.load_format) for b in batches],
    }
    if args.profile_report is not None:
        report["profile"] = args.profile_report
    out = args.out or RESULTS_DIR / f"engine_throughput_{args.device.split(':')[0]}_{model_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    if args.profile_report is not None:
        Console().print_json(json.dumps(args.profile_report))
    Console().print(f"wrote {out}")
    return report


def _row(
    batch_size: int, measured: dict[str, dict[int, tuple[Measurement, list[list[int]]]]], load_format: str
) -> dict[str, Any]:
    row: dict[str, Any] = {"batch_size": batch_size}
    for name, results in measured.items():
        m = results[batch_size][0]
        row[name] = {**asdict(m), "output_tokens_per_s": m.output_tokens_per_s}
    if len(measured) == 2:
        tandem, hf = (measured[n][batch_size] for n in ("tandem", "transformers"))
        row["ratio"] = tandem[0].output_tokens_per_s / hf[0].output_tokens_per_s
        # Same weights only when both loaded the checkpoint (dummy: independent random inits).
        same = sum(a == b for a, b in zip(tandem[1], hf[1], strict=True)) / batch_size
        row["identical_outputs"] = same if load_format != "dummy" else None
    return row


def print_table(report: dict[str, Any]) -> None:
    """Render ``report["results"]`` with rich."""
    table = Table(
        title=f"{report['model']} {report['dtype']} on {report['device']}: "
        f"{report['prompt_len']} prompt + {report['output_len']} output tokens"
    )
    engines = [name for name in ("tandem", "transformers") if name in report["results"][0]]
    table.add_column("batch", justify="right")
    for name in engines:
        table.add_column(f"{name} s", justify="right")
        table.add_column(f"{name} tok/s", justify="right")
    if len(engines) == 2:
        table.add_column("ratio", justify="right")
        table.add_column("identical", justify="right")
    for row in report["results"]:
        cells = [str(row["batch_size"])]
        for name in engines:
            cells += [f"{row[name]['seconds']:.3f}", f"{row[name]['output_tokens_per_s']:.1f}"]
        if len(engines) == 2:
            same = row["identical_outputs"]
            cells += [f"{row['ratio']:.2f}", "n/a" if same is None else f"{same:.0%}"]
        table.add_row(*cells)
    Console().print(table)


if __name__ == "__main__":
    main()
