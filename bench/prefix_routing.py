"""Prefix-aware routing against load-only routing on a shared-prefix workload.

For each routing policy (``prefix``, ``least-loaded``, ``round-robin``) this
starts a fresh ``tandem serve`` (its own Redis, ``--prefill-workers`` prefill
workers, one decode worker, CPU, float32, the bundled model unless ``--model``),
drives it with ``tandem bench --shared-prefix-groups G --shared-prefix-len L``
(the same requests for every policy: same ``--seed``), then reads every prefill
worker's ``tandem_prefill_tokens_total`` (prompt tokens actually computed) and
``tandem_prefix_cache_hit_tokens_total`` before stopping the stack. Results
(TTFT p50/p90 from the client side, tokens computed and reused, throughput) are
printed as a markdown table and written as JSON.

Example::

    python -m bench.prefix_routing --groups 8 --prefix-len 256 --input-len 32 \\
        --output-len 8 --num-requests 96 --request-rate 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "prefix_routing_cpu.json"
POLICIES = ("prefix", "least-loaded", "round-robin")


def metric_total(address: str, name: str) -> float:
    """Sum of every sample ``name`` exported on ``address``'s /metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def start_stack(
    args: argparse.Namespace, policy: str, run_dir: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """``tandem serve`` with ``--routing policy``; returns the process and its cluster file."""
    cluster_file = run_dir / "cluster.json"
    cmd = [
        sys.executable, "-m", "cli.main", "serve", "--model", str(args.model),
        "--device", "cpu", "--dtype", "float32", "--port", "0",
        "--prefill-workers", str(args.prefill_workers), "--decode-workers", "1",
        "--routing", policy, "--cluster-file", str(cluster_file), "--run-dir", str(run_dir / "logs"),
    ]  # fmt: skip
    with (run_dir / "serve.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not cluster_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"tandem serve did not start; see {run_dir / 'serve.log'}")
        time.sleep(0.2)
    return proc, json.loads(cluster_file.read_text())


def run_policy(args: argparse.Namespace, policy: str, run_dir: Path) -> dict[str, Any]:
    """One stack, one ``tandem bench`` run; the row of the results table."""
    proc, cluster = start_stack(args, policy, run_dir)
    try:
        out_json = run_dir / "bench.json"
        bench = [
            sys.executable, "-m", "cli.main", "bench", "--target", cluster["router"]["grpc_address"],
            "--model", str(args.model), "--request-rate", str(args.request_rate),
            "--num-requests", str(args.num_requests), "--shared-prefix-groups", str(args.groups),
            "--shared-prefix-len", str(args.prefix_len), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--seed", str(args.seed),
            "--out-json", str(out_json), "--no-progress",
        ]  # fmt: skip
        subprocess.run(bench, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        prefills = [p for p in cluster["processes"] if p["kind"] == "prefill"]
        computed = sum(metric_total(p["metrics_address"], "tandem_prefill_tokens_total") for p in prefills)
        reused = sum(
            metric_total(p["metrics_address"], "tandem_prefix_cache_hit_tokens_total") for p in prefills
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    (run,) = json.loads(out_json.read_text())["runs"]
    return {
        "policy": policy,
        "completed": run["completed"],
        "failed": run["failed"],
        "ttft_p50_s": run["ttft_s"]["p50"],
        "ttft_p90_s": run["ttft_s"]["p90"],
        "prefill_tokens_computed": int(computed),
        "prefix_cache_hit_tokens": int(reused),
        "output_token_throughput": run.get("output_token_throughput"),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| routing | requests (ok / failed) | TTFT p50 (ms) | TTFT p90 (ms) | prompt tokens computed | "
        "prompt tokens from cache |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['completed']} / {r['failed']} | {r['ttft_p50_s'] * 1000:.1f} | "
            f"{r['ttft_p90_s'] * 1000:.1f} | {r['prefill_tokens_computed']} | {r['prefix_cache_hit_tokens']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tandem-tiny")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--prefill-workers", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8, help="shared prefixes (system prompts)")
    parser.add_argument("--prefix-len", type=int, default=256, help="tokens of each shared prefix")
    parser.add_argument("--input-len", type=int, default=32, help="tokens after the prefix")
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--request-rate", type=float, default=4.0, help="requests per second (Poisson)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for policy in args.policies:
        with tempfile.TemporaryDirectory(prefix=f"tandem-prefix-{policy}-") as tmp:
            rows.append(run_policy(args, policy, Path(tmp)))
            print(f"{policy}: {rows[-1]}", flush=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    doc = {
        "benchmark": "prefix_routing",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "config": config,
        "results": rows,
        "markdown": markdown(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
