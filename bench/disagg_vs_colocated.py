"""Disaggregated vs colocated serving on the same hardware, with ``tandem bench``.

For each mode this starts ``tandem serve`` (``--prefill-workers 1
--decode-workers 1``, or ``--colocated --decode-workers 2``: two processes
either way), waits for its cluster file, runs ``tandem bench --sweep-rates``
against it, and stops it. It writes one JSON with both reports, a Markdown table
and each mode's plots.

Usage (CPU, bundled model)::

    python -m bench.disagg_vs_colocated --rates 1 2 4 --duration 8

On GPUs add ``--device cuda --dtype bfloat16 --load-format dummy --model DIR``
(workers are spread over the visible GPUs by ``tandem serve``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.worker_config import BUNDLED_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "disaggregated": ["--prefill-workers", "1", "--decode-workers", "1"],
    "colocated": ["--colocated", "--decode-workers", "2"],
}


def serve(mode: str, args: argparse.Namespace, run_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``tandem serve`` in ``mode``; returns the process and the router port."""
    cluster = run_dir / f"{mode}.json"
    port = 50600 + list(MODES).index(mode)
    cmd = [
        sys.executable, "-m", "cli.main", "serve", *MODES[mode],
        "--model", str(args.model), "--device", args.device, "--dtype", args.dtype,
        "--load-format", args.load_format, "--port", str(port), "--cluster-file", str(cluster),
        *args.serve_args,
    ]  # fmt: skip
    log = (run_dir / f"{mode}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.startup_timeout
    while not cluster.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{mode} stack did not start; see {log.name}")
        time.sleep(0.5)
    return proc, port


def bench(mode: str, port: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run the rate sweep against the router on ``port``; returns the bench JSON."""
    report = out_dir / f"{mode}.json"
    cmd = [
        sys.executable, "-m", "cli.main", "bench", "--target", f"127.0.0.1:{port}",
        "--sweep-rates", *map(str, args.rates), "--duration", str(args.duration),
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot), "--seed", "0",
        "--no-progress", "--out-json", str(report),
    ]  # fmt: skip
    if importlib.util.find_spec("matplotlib") is not None:
        cmd += ["--plots-dir", str(out_dir / f"{mode}_plots")]
    subprocess.run(cmd, cwd=REPO, check=True)
    return dict(json.loads(report.read_text()))


def summary_rows(mode: str, report: dict[str, Any]) -> list[str]:
    """Markdown rows: one per rate."""
    rows = []
    for run in report["runs"]:
        ttft, tpot = run["ttft_s"], run["tpot_s"]
        rows.append(
            f"| {mode} | {run['request_rate']:g} | {run['completed']}/{run['num_requests']} | "
            f"{run['goodput']:.2f} | {run['request_throughput']:.2f} | "
            f"{ttft['p50'] * 1e3:.0f} / {ttft['p90'] * 1e3:.0f} / {ttft['p99'] * 1e3:.0f} | "
            f"{tpot['p50'] * 1e3:.1f} / {tpot['p90'] * 1e3:.1f} / {tpot['p99'] * 1e3:.1f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per rate")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--slo-ttft", type=float, default=0.5, help="seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.1, help="seconds")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--out-dir", type=Path, default=REPO / "bench" / "results" / "disagg_vs_colocated_cpu"
    )
    parser.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `tandem serve` flags"
    )
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tandem-dvc-") as tmp:
        for mode in MODES:
            proc, port = serve(mode, args, Path(tmp))
            try:
                reports[mode] = bench(mode, port, args, args.out_dir)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    table = [
        "| mode | rate (req/s) | completed | goodput (req/s) | throughput (req/s) | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, report in reports.items():
        table += summary_rows(mode, report)
    (args.out_dir / "summary.md").write_text("\n".join(table) + "\n")
    summary = {
        "command": sys.argv,
        "config": {k: str(v) for k, v in vars(args).items()},
        "modes": {m: r["runs"] for m, r in reports.items()},
    }
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
