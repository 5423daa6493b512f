"""``tandem bench`` as a subprocess against a real stack (``tandem serve`` on a tiny
checkpoint): the JSON accounts for every request, percentiles are ordered, goodput
never exceeds throughput, the PNGs are written, and Ctrl-C writes a partial report."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.stack import REPO, Stack
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LATENCIES = ("ttft_s", "tpot_s", "itl_s", "e2e_latency_s")


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model = make_tiny_llama(tmp_path_factory.mktemp("bench") / "model", seed=2)
    s = Stack(model, tmp_path_factory.mktemp("bench_stack"), redis_server.url).start()
    yield s
    assert s.stop() == 0


def bench_cmd(stack: Stack, *argv: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "bench", "--target", f"127.0.0.1:{stack.port}", "--no-progress",
            *argv]  # fmt: skip


def check_run(run: dict[str, Any], *, prompt_len: int, output_len: int) -> None:
    """Every request accounted for and completed exactly; percentiles ordered; goodput <= throughput."""
    assert run["completed"] + run["failed"] + run["cancelled"] == run["num_requests"] == len(run["requests"])
    assert (run["completed"], run["failed"], run["cancelled"]) == (run["num_requests"], 0, 0)
    assert sorted(q["index"] for q in run["requests"]) == list(range(run["num_requests"]))
    for q in run["requests"]:
        assert (q["status"], q["code"], q["prompt_len"], q["output_tokens"]) == (
            "completed", "OK", prompt_len, output_len)  # fmt: skip
        assert 0 <= q["send_time_s"] < q["token_times_s"][0] <= q["token_times_s"][-1] <= q["end_time_s"]
    for key in LATENCIES:
        summary = run[key]
        assert 0 <= summary["p50"] <= summary["p90"] <= summary["p99"], key
    assert run["total_output_tokens"] == output_len * run["num_requests"]
    assert 0 <= run["goodput"] <= run["request_throughput"]
    assert run["output_token_throughput"] == pytest.approx(output_len * run["request_throughput"])


def test_rate_run(stack: Stack, tmp_path: Path) -> None:
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    cmd = bench_cmd(stack, "--request-rate", "4", "--num-requests", "12", "--input-len", "32", "--output-len", "8",
                    "--slo-ttft", "10", "--slo-tpot", "5", "--out-json", str(out), "--plots-dir", str(plots))  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["model"]["vocab_size"] == 512 and doc["model"]["max_model_len"] == 256
    (run,) = doc["runs"]
    assert (run["mode"], run["request_rate"], run["num_requests"]) == ("rate", 4.0, 12)
    check_run(run, prompt_len=32, output_len=8)
    assert run["slo_attainment"] == 1.0 and run["goodput"] == run["request_throughput"] > 0
    assert (plots / "latency_cdf.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (plots / "goodput_vs_rate.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "goodput (req/s)" in result.stdout


def test_sweep_with_shared_prefix(stack: Stack, tmp_path: Path) -> None:
    out, plots = tmp_path / "sweep.json", tmp_path / "plots"
    cmd = bench_cmd(stack, "--sweep-rates", "4", "8", "--num-requests", "6", "--shared-prefix-groups", "2",
                    "--shared-prefix-len", "32", "--input-len", "16", "--output-len", "8", "--slo-ttft", "0.001",
                    "--out-json", str(out), "--plots-dir", str(plots))  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert [run["request_rate"] for run in doc["runs"]] == [4.0, 8.0]
    for run in doc["runs"]:
        check_run(run, prompt_len=48, output_len=8)
        assert run["goodput"] == 0.0  # a 1 ms TTFT objective is never met on CPU
        assert run["slo_attainment"] == 0.0
    assert doc["sweep"]["max_rate_meeting_attainment"] is None
    for name in ("latency_cdf.png", "goodput_vs_rate.png"):
        assert (plots / name).read_bytes()[:8] == PNG_SIGNATURE


def test_ctrl_c_cancels_in_flight_and_writes_partial_report(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "partial.json"
    cmd = bench_cmd(stack, "--request-rate", "8", "--num-requests", "40", "--input-len", "32",
                    "--output-len", "200", "--out-json", str(out))  # fmt: skip
    decode = stack.processes("decode")[0]
    used_before = stack.metric(decode, "tandem_kv_blocks_used")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while stack.metric(decode, "tandem_kv_blocks_used") <= used_before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a few requests are decoding
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert run["interrupted"] is True
    assert run["completed"] + run["failed"] + run["cancelled"] == run["num_requests"] == len(run["requests"])
    assert run["cancelled"] >= 1 and run["num_requests"] < 40
    cancelled = [q for q in run["requests"] if q["status"] == "cancelled"]
    assert all(q["code"] == "CANCELLED" and len(q["token_times_s"]) < 200 for q in cancelled)
    assert "(interrupted)" in stdout
    # The deployment still serves a whole run afterwards.
    again = subprocess.run(bench_cmd(stack, "--concurrency", "2", "--num-requests", "2", "--input-len", "8",
                                     "--output-len", "4"), cwd=REPO, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "2 / 2" in again.stdout
