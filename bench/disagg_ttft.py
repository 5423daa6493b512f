"""Time to first token of the disaggregated path, broken down by stage, and greedy
tokens checked against a colocated run of the same model.

It starts ``tandem serve`` twice on the same model and seed: first disaggregated
(one prefill and one decode worker, ``--kv-transport`` as given; on one GPU both
share it, on several ``tandem serve`` puts them on different GPUs), then colocated
(one worker that prefills and decodes). Against the disaggregated stack it drives
the workers' own RPCs, as the router does, one request at a time, timing:

- **reserve**: ``DecodeWorker.Reserve`` (the decode worker's blocks, the queue a
  request meets before prefill when nothing else runs);
- **engine queue**: the prompt's wait in the prefill engine's queue until a step
  first scheduled it (``PrefillResponse.engine_queue_seconds``, reported by the worker
  from its scheduler's timestamps; near 0 here, one request at a time);
- **prefill**: the prompt's compute, from that first schedule to its first token
  (``PrefillResponse.engine_prefill_seconds``);
- **transfer, exposed**: the rest of the ``Prefill`` call after the worker's first
  token (the call's time minus ``PrefillResponse.prefill_seconds``, the worker's
  wall time to it), i.e. KV transfer not hidden behind compute plus one gRPC round
  trip; ``transfer_seconds`` is the whole transfer, overlapped or not;
- **first decode step**: ``Decode`` call to its first message (the decode worker
  commits the transferred blocks and runs one step).

TTFT is reserve + the ``Prefill`` call (the router sends the first token as soon
as ``Prefill`` returns). Every request's tokens (first token plus the decode
stream) must equal the colocated worker's ``Generate`` stream for the same prompt.

Usage (one or more GPUs, Llama-3-8B shape with seeded random weights)::

    python -m bench.disagg_ttft --shape llama3-8b --device cuda --dtype bfloat16 \\
        --prompt-lens 128 2048 8184 --kv-transport auto --out bench/results/disagg_ttft_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from bench.engine_throughput import SHAPES, write_config_only_checkpoint
from engine.security import bearer_metadata
from engine.security_config import INTERNAL_TOKEN_ENV
from engine.worker_config import BUNDLED_MODEL_DIR
from tandem.v1 import generation_pb2, worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def serve(
    args: argparse.Namespace, mode_flags: list[str], run_dir: Path, token: str
) -> Iterator[dict[str, Any]]:
    """Run ``tandem serve`` with ``mode_flags``; yields its cluster file's content."""
    cluster = run_dir / "cluster.json"
    cluster.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "cli.main", "serve", *mode_flags,
        "--model", str(args.model), "--device", args.device, "--dtype", args.dtype,
        "--load-format", args.load_format, "--seed", "0", "--cluster-file", str(cluster),
        "--max-model-len", str(args.max_model_len), "--kv-cache-memory-gb", str(args.kv_cache_memory_gb),
        "--run-dir", str(run_dir / "logs"), *args.serve_args,
    ]  # fmt: skip
    env = {**os.environ, INTERNAL_TOKEN_ENV: token, "PYTHONUNBUFFERED": "1"}
    with (run_dir / "serve.log").open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while not cluster.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tandem serve did not start; see {run_dir / 'serve.log'}")
            time.sleep(0.5)
        yield json.loads(cluster.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def worker(cluster: dict[str, Any], kind: str) -> str:
    """The gRPC address of the cluster's first ``kind`` process."""
    return next(p["grpc_address"] for p in cluster["processes"] if p["kind"] == kind)


def sampling(max_tokens: int) -> generation_pb2.SamplingParams:
    return generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def disaggregated_request(
    prefill: worker_pb2_grpc.PrefillWorkerStub,
    decode: worker_pb2_grpc.DecodeWorkerStub,
    prompt: list[int],
    max_tokens: int,
    metadata: Any,
) -> dict[str, Any]:
    """One request through Reserve, Prefill and Decode; its stage times (seconds) and tokens."""
    rid = f"ttft-{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    reserved = decode.Reserve(
        worker_pb2.ReserveRequest(
            request_id=rid, num_prompt_tokens=len(prompt), max_tokens=max_tokens, lease_ms=60_000
        ),
        metadata=metadata,
        timeout=120,
    )
    t1 = time.perf_counter()
    prefilled = prefill.Prefill(
        worker_pb2.PrefillRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=sampling(max_tokens),
            destination=reserved.destination,
        ),
        metadata=metadata,
        timeout=120,
    )
    t2 = time.perf_counter()
    stream = decode.Decode(
        worker_pb2.DecodeRequest(
            request_id=rid,
            reservation_id=reserved.destination.reservation_id,
            epoch=reserved.destination.epoch,
            prompt_token_ids=prompt,
            first_token_id=prefilled.first_token_id,
            sampling=sampling(max_tokens),
        ),
        metadata=metadata,
        timeout=120,
    )
    tokens = [prefilled.first_token_id]
    t3 = None
    for msg in stream:
        t3 = t3 or time.perf_counter()
        tokens += list(msg.token_ids)
    assert t3 is not None, "the decode stream sent nothing"
    return {
        "reserve_s": t1 - t0,
        "engine_queue_s": prefilled.engine_queue_seconds,
        "prefill_s": prefilled.engine_prefill_seconds,
        "transfer_s": prefilled.transfer_seconds,
        "transfer_exposed_s": (t2 - t1) - prefilled.prefill_seconds,
        "ttft_s": t2 - t0,
        "first_decode_step_s": t3 - t2,
        "kv_bytes": prefilled.kv_bytes_sent,
        "tokens": tokens,
    }


def colocated_tokens(
    stub: worker_pb2_grpc.DecodeWorkerStub, prompt: list[int], max_tokens: int, metadata: Any
) -> list[int]:
    """The colocated worker's greedy tokens for ``prompt``."""
    request = worker_pb2.LocalGenerateRequest(
        request_id=f"colo-{secrets.token_hex(4)}", prompt_token_ids=prompt, sampling=sampling(max_tokens)
    )
    return [t for msg in stub.Generate(request, metadata=metadata, timeout=300) for t in msg.token_ids]


def prompts(lengths: list[int], count: int, vocab_size: int) -> dict[int, list[list[int]]]:
    """``count`` distinct pseudo-random prompts per length (ids in ``[2, vocab_size)``):
    no request finds another's blocks in the prefix cache, so every prefill is cold."""
    import random

    rng = random.Random(0)
    return {n: [[rng.randrange(2, vocab_size) for _ in range(n)] for _ in range(count)] for n in lengths}


def median_row(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = (
        "reserve_s",
        "engine_queue_s",
        "prefill_s",
        "transfer_s",
        "transfer_exposed_s",
        "ttft_s",
        "first_decode_step_s",
    )
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"kv_bytes": runs[0]["kv_bytes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint dir (default: the bundled model)"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), help="config-only checkpoint of this shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default=None, help="default: dummy with --shape, else auto")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[16, 64, 200])
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="default: longest prompt + max tokens"
    )
    parser.add_argument("--kv-cache-memory-gb", type=float, default=0.25)
    parser.add_argument("--kv-transport", default="auto")
    parser.add_argument(
        "--compare-whole",
        action="store_true",
        help="also run with --kv-transfer-layers-per-message 0 (the whole prompt's KV after the forward)",
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `tandem serve` flags"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tandem-ttft-"))
    if args.shape:
        args.model = write_config_only_checkpoint(args.shape, work / args.shape)
        args.load_format = args.load_format or "dummy"
    args.model = args.model or BUNDLED_MODEL_DIR
    args.load_format = args.load_format or "auto"
    args.max_model_len = args.max_model_len or max(args.prompt_lens) + args.max_tokens
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    token = secrets.token_urlsafe(16)
    metadata = bearer_metadata(token)
    by_len = prompts(args.prompt_lens, args.repeats + 1, vocab)  # the first of each length warms up
    disagg_flags = ["--prefill-workers", "1", "--decode-workers", "1", "--kv-transport", args.kv_transport]
    variants: dict[str, list[str]] = {"default": []} | (
        {"whole-prompt": ["--kv-transfer-layers-per-message", "0"]} if args.compare_whole else {}
    )
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for variant, flags in variants.items():
        with (
            serve(args, [*disagg_flags, *flags], work, token) as cluster,
            grpc.insecure_channel(worker(cluster, "prefill")) as p_channel,
            grpc.insecure_channel(worker(cluster, "decode")) as d_channel,
        ):
            p_stub, d_stub = (
                worker_pb2_grpc.PrefillWorkerStub(p_channel),
                worker_pb2_grpc.DecodeWorkerStub(d_channel),
            )
            for n, batch in by_len.items():
                runs = [disaggregated_request(p_stub, d_stub, p, args.max_tokens, metadata) for p in batch]
                results[variant, n] = runs[1:]
    with (
        serve(args, ["--colocated", "--decode-workers", "1"], work, token) as cluster,
        grpc.insecure_channel(worker(cluster, "colocated")) as channel,
    ):
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        reference = {
            n: [colocated_tokens(stub, p, args.max_tokens, metadata) for p in batch[1:]]
            for n, batch in by_len.items()
        }
    rows = []
    print("| KV sending | prompt tokens | reserve ms | engine queue ms | prefill ms | transfer ms (exposed) "
          "| first decode step ms | TTFT ms | KV MiB | tokens = colocated |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (variant, n), runs in results.items():
        row = median_row(runs)
        same = [r["tokens"] for r in runs] == reference[n]
        rows.append({"variant": variant, "prompt_tokens": n, **row, "tokens_equal_colocated": same})
        print(
            f"| {variant} | {n} | {row['reserve_s'] * 1e3:.1f} | {row['engine_queue_s'] * 1e3:.2f} | "
            f"{row['prefill_s'] * 1e3:.1f} | "
            f"{row['transfer_s'] * 1e3:.1f} ({row['transfer_exposed_s'] * 1e3:.1f}) | "
            f"{row['first_decode_step_s'] * 1e3:.1f} | {row['ttft_s'] * 1e3:.1f} | "
            f"{row['kv_bytes'] / 2**20:.1f} | {same} |"
        )
    report = {
        "model": args.shape or str(args.model),
        "device": args.device,
        "dtype": args.dtype,
        "kv_transport": args.kv_transport,
        "serve_args": args.serve_args,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["tokens_equal_colocated"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
