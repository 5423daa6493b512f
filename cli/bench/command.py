"""``tandem bench``: options and entry point.

Steps:

1. Validate the options (exit 2 with ``error: ...`` on a bad combination).
2. Connect to ``--target`` and read ``GetModelInfo`` (vocabulary, ``max_model_len``);
   exit 1 with ``error: <CODE>: <details>`` when the router does not answer.
3. Build the workload (synthetic, shared-prefix or ``--dataset``) and check it fits
   ``max_model_len`` (exit 2 otherwise).
4. Run once (``--request-rate`` or ``--concurrency``) or once per ``--sweep-rates``
   rate, each run with the same requests (same ``--seed``), one progress bar each.
5. Print the table and write ``--out-json``, ``--out-markdown`` and ``--plots-dir``.

Ctrl-C (or SIGTERM) stops sending, cancels the calls in flight, skips the remaining
sweep rates, still writes the partial report, and exits 130. Torch-free: gRPC, numpy,
rich, tqdm and matplotlib are imported when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.bench import workload
from cli.security_options import add_client_options, client_security_from_args
from cli.validators import (
    model_dir,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from engine.worker_config import BUNDLED_MODEL_DIR

if TYPE_CHECKING:
    from cli.bench.runner import RunResult, RunSpec
    from tandem.v1 import generation_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_NUM_REQUESTS = 100
EXIT_INTERRUPTED = 130

EPILOG = """\
examples:
  tandem bench --request-rate 4 --num-requests 200 --input-len 128 --output-len 64
  tandem bench --concurrency 8 --duration 60 --slo-ttft 0.5 --slo-tpot 0.05
  tandem bench --sweep-rates 1 2 4 8 --duration 30 --plots-dir plots --out-json bench.json
  tandem bench --request-rate 2 --dataset sharegpt.jsonl --model /models/llama
  tandem bench --request-rate 4 --shared-prefix-groups 4 --shared-prefix-len 256 --input-len 32

Requests are sent with ignore_eos and max_tokens = the output length, so output lengths
are exact. Synthetic prompts are random token ids of the served vocabulary (from
GetModelInfo). --dataset reads ShareGPT-style JSONL ({"conversations": [{"from":
"human", "value": ...}, {"from": "gpt", "value": ...}]}): the first human turn is sent
as text, the first gpt turn's length in tokens (counted with --model's tokenizer, or in
whitespace-separated words when that directory has no tokenizer.json) is the output
length. Ctrl-C cancels the requests in flight and still writes the report."""


def request_rate(text: str) -> float:
    """Requests per second: a number > 0, or ``inf`` (send everything at once)."""
    return float("inf") if text.lower() in ("inf", "infinity") else positive_float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``tandem bench``."""
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, metavar="HOST:PORT", help="router address (default: %(default)s)"
    )
    load = parser.add_argument_group("load (exactly one)")
    mode = load.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--request-rate", type=request_rate, metavar="R", help="Poisson arrivals, R req/s (or inf)"
    )
    mode.add_argument(
        "--concurrency", type=positive_int, metavar="C", help="closed loop with C requests in flight"
    )
    mode.add_argument(
        "--sweep-rates", type=request_rate, nargs="+", metavar="R", help="one Poisson run per rate"
    )
    bounds = parser.add_argument_group("bounds (per run; whichever comes first)")
    bounds.add_argument(
        "--num-requests", type=positive_int, metavar="N",
        help=f"requests to send (default: {DEFAULT_NUM_REQUESTS} unless --duration is given)",
    )  # fmt: skip
    bounds.add_argument("--duration", type=positive_float, metavar="S", help="stop sending after S seconds")
    bounds.add_argument(
        "--drain-timeout", type=non_negative_float, default=60.0, metavar="S",
        help="seconds in-flight requests get after sending stops, then they are cancelled (default: 60)",
    )  # fmt: skip
    bounds.add_argument("--timeout", type=positive_float, metavar="S", help="deadline of each request")
    _add_workload_arguments(parser)
    slo = parser.add_argument_group("sampling and SLOs")
    slo.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T", help="0 is greedy")
    slo.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of arrivals, prompts and sampling (default: 0)"
    )
    slo.add_argument("--slo-ttft", type=positive_float, metavar="S", help="TTFT objective in seconds")
    slo.add_argument("--slo-tpot", type=positive_float, metavar="S", help="TPOT objective in seconds")
    slo.add_argument(
        "--slo-attainment", type=probability, default=0.9, metavar="F",
        help="fraction of requests that must meet the SLOs for a sweep rate to count (default: 0.9)",
    )  # fmt: skip
    out = parser.add_argument_group("output")
    out.add_argument("--out-json", type=Path, metavar="PATH", help="write the report as JSON")
    out.add_argument("--out-markdown", type=Path, metavar="PATH", help="write a Markdown summary table")
    out.add_argument(
        "--plots-dir", type=Path, metavar="DIR", help="write latency_cdf.png, goodput_vs_rate.png"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_options(parser)


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    for name, default in (("input", 128), ("output", 64)):
        group.add_argument(
            f"--{name}-len", type=positive_int, default=default, metavar="N",
            help=f"{name} tokens of a fixed-length request (default: {default})",
        )  # fmt: skip
        group.add_argument(
            f"--{name}-len-dist", choices=("fixed", "uniform"), default="fixed",
            help=f"fixed: --{name}-len; uniform: on --{name}-len-range (default: fixed)",
        )  # fmt: skip
        group.add_argument(
            f"--{name}-len-range", type=positive_int, nargs=2, metavar=("LO", "HI"),
            help=f"bounds (inclusive) of a uniform {name} length",
        )  # fmt: skip
    group.add_argument("--dataset", type=Path, metavar="FILE", help="ShareGPT-style JSONL of conversations")
    group.add_argument(
        "--model", type=model_dir, default=BUNDLED_MODEL_DIR, metavar="DIR",
        help="tokenizer used to count --dataset tokens (default: the bundled model)",
    )  # fmt: skip
    group.add_argument(
        "--shared-prefix-groups",
        type=positive_int,
        metavar="G",
        help="G random system prompts shared by requests",
    )
    group.add_argument(
        "--shared-prefix-len", type=positive_int, metavar="L", help="tokens of each shared prefix"
    )


def length_dist(args: argparse.Namespace, name: str) -> workload.LengthDist:
    """The ``--{name}-len*`` options as a distribution.

    Raises:
        ValueError: a uniform length without a range, or a range with a fixed length.
    """
    kind, span = getattr(args, f"{name}_len_dist"), getattr(args, f"{name}_len_range")
    if kind == "fixed":
        if span is not None:
            raise ValueError(f"--{name}-len-range needs --{name}-len-dist uniform")
        return workload.LengthDist.fixed(getattr(args, f"{name}_len"))
    if span is None:
        raise ValueError(f"--{name}-len-dist uniform needs --{name}-len-range LO HI")
    return workload.LengthDist("uniform", span[0], span[1])


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """One :class:`RunSpec` per run (one per sweep rate)."""
    from cli.bench.runner import RunSpec

    num = args.num_requests if args.num_requests or args.duration else DEFAULT_NUM_REQUESTS
    common: dict[str, Any] = dict(
        num_requests=num, duration_s=args.duration, drain_timeout_s=args.drain_timeout,
        request_timeout_s=args.timeout, temperature=args.temperature, seed=args.seed,
    )  # fmt: skip
    if args.concurrency is not None:
        return [RunSpec(concurrency=args.concurrency, **common)]
    rates = args.sweep_rates if args.sweep_rates else [args.request_rate]
    return [RunSpec(request_rate=rate, **common) for rate in rates]


def run(args: argparse.Namespace) -> int:
    """Runs the bench; returns 0, 1 (router unreachable), 2 (bad options) or 130 (interrupted)."""
    try:
        _check_options(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return asyncio.run(_bench(args))


def _check_options(args: argparse.Namespace) -> None:
    length_dist(args, "input")
    length_dist(args, "output")
    if (args.shared_prefix_groups is None) != (args.shared_prefix_len is None):
        raise ValueError("--shared-prefix-groups and --shared-prefix-len go together")
    if args.dataset is not None and args.shared_prefix_groups is not None:
        raise ValueError("--dataset and --shared-prefix-groups exclude each other")
    if args.dataset is not None and not args.dataset.is_file():
        raise ValueError(f"dataset not found: {str(args.dataset)!r}")


async def _bench(args: argparse.Namespace) -> int:
    import grpc

    from tandem.v1 import generation_pb2, generation_pb2_grpc

    stop = asyncio.Event()
    _install_signal_handlers(stop)
    results: list[RunResult] = []
    from engine.security import bearer_metadata, open_aio_channel

    security = client_security_from_args(args)
    async with open_aio_channel(args.target, security, bearer_metadata(args.auth_token)) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            info = await stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=30)
        except grpc.aio.AioRpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        try:
            make_requests = _workload_factory(args, info)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        for spec in run_specs(args):
            if stop.is_set():
                break
            results.append(await _one_run(stub, spec, make_requests, stop, progress=not args.no_progress))
    _write_outputs(args, info, results)
    return EXIT_INTERRUPTED if stop.is_set() else 0


async def _one_run(
    stub: Any,
    spec: RunSpec,
    make_requests: Callable[[], Iterator[workload.BenchRequest]],
    stop: asyncio.Event,
    *,
    progress: bool,
) -> RunResult:
    from tqdm import tqdm

    from cli.bench.runner import Runner

    label = f"concurrency {spec.concurrency}" if spec.concurrency else f"rate {spec.request_rate:g}/s"
    arrivals = workload.poisson_arrivals(spec.request_rate, spec.seed) if spec.request_rate else None
    with tqdm(total=spec.num_requests, desc=label, unit="req", disable=not progress, file=sys.stderr) as bar:
        runner = Runner(stub, spec, make_requests(), arrivals, stop, on_done=lambda record: bar.update())
        return await runner.run()


def _workload_factory(
    args: argparse.Namespace, info: generation_pb2.ModelInfo
) -> Callable[[], Iterator[workload.BenchRequest]]:
    """A function returning a fresh copy of the workload (the same requests for every run).

    Raises:
        ValueError: the dataset is unreadable or nothing fits, or lengths exceed ``max_model_len``.
    """
    if args.dataset is not None:
        count_prompt, count_output = _token_counters(args.model, info)
        conversations = workload.load_sharegpt(args.dataset, count_prompt, count_output)
        next(workload.dataset_requests(conversations, args.seed, info.max_model_len))  # raises when none fit
        return lambda: workload.dataset_requests(conversations, args.seed, info.max_model_len)
    input_len, output_len = length_dist(args, "input"), length_dist(args, "output")
    groups, prefix_len = args.shared_prefix_groups or 0, args.shared_prefix_len or 0
    longest = prefix_len + input_len.hi + output_len.hi
    if longest > info.max_model_len:
        raise ValueError(
            f"prefix + input + output lengths reach {longest} tokens, over max_model_len={info.max_model_len}"
        )
    return lambda: workload.synthetic_requests(
        args.seed, info.vocab_size, input_len, output_len, prefix_groups=groups, prefix_len=prefix_len
    )


def _token_counters(
    model: Path, info: generation_pb2.ModelInfo
) -> tuple[Callable[[str], int], Callable[[str], int]]:
    """(prompt counter, output counter): ``model``'s tokenizer, else whitespace words."""
    if not (model / "tokenizer.json").is_file():
        print(f"note: no tokenizer in {model}; counting whitespace-separated words", file=sys.stderr)
        return workload.whitespace_count, workload.whitespace_count
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model)
    if tokenizer.vocab_size != info.vocab_size:
        print(
            f"warning: tokenizer of {model} has {tokenizer.vocab_size} tokens, the served model "
            f"{info.vocab_size}; dataset lengths are approximate (pass --model)",
            file=sys.stderr,
        )
    return (lambda text: len(tokenizer.encode(text))), (lambda text: len(tokenizer.encode(text, False)))


def _install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set ``stop`` once; a second SIGINT interrupts as usual."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        stop.set()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_signal, signum)


def _write_outputs(
    args: argparse.Namespace, info: generation_pb2.ModelInfo, results: list[RunResult]
) -> None:
    from google.protobuf.json_format import MessageToDict

    from cli.bench import report

    slo = report.Slo(args.slo_ttft, args.slo_tpot)
    runs = [report.run_report(result, slo) for result in results]
    report.print_table(runs)
    config = {k: _jsonable(v) for k, v in vars(args).items() if k != "handler"}
    model = MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    doc = report.document(args.target, model, config, runs, report.sweep_summary(runs, args.slo_attainment))
    if args.out_json is not None:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.out_json}")
    if args.out_markdown is not None:
        args.out_markdown.parent.mkdir(parents=True, exist_ok=True)
        args.out_markdown.write_text(report.markdown_table(runs))
        print(f"wrote {args.out_markdown}")
    if args.plots_dir is not None:
        from cli.bench.plots import write_plots

        for path in write_plots(runs, args.plots_dir):
            print(f"wrote {path}")


def _jsonable(value: Any) -> Any:
    """An option's value for JSON: paths as strings, infinite rates as ``"inf"``."""
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return value
