"""``tandem bench`` end to end against the fake router of ``test_bench_runner``: options,
workloads as sent on the wire, JSON, plots, Ctrl-C in a subprocess, and no torch import."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.bench.plots import GOODPUT_VS_RATE, LATENCY_CDF
from cli.main import main
from engine.tokenizer import Tokenizer
from engine.worker_config import BUNDLED_MODEL_DIR
from tests.cli.test_bench_runner import FakeGeneration, fake_router
from tests.helpers.net import free_port

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Fake = tuple[FakeGeneration, str]


@pytest.fixture
def fake() -> Iterator[Fake]:
    with fake_router() as servicer_and_address:
        yield servicer_and_address


def bench(address: str, *argv: str) -> int:
    return main(["bench", "--target", address, "--no-progress", *argv])


def test_sweep_writes_json_markdown_and_plots(fake: Fake, tmp_path: Path, capsys) -> None:
    servicer, address = fake
    out, md, plots = tmp_path / "r" / "bench.json", tmp_path / "bench.md", tmp_path / "plots"
    code = bench(address, "--sweep-rates", "50", "inf", "--num-requests", "6", "--input-len", "8",
                 "--output-len", "3", "--slo-ttft", "2", "--slo-tpot", "1", "--seed", "4",
                 "--out-json", str(out), "--out-markdown", str(md), "--plots-dir", str(plots))  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert "NaN" not in out.read_text() and "Infinity" not in out.read_text()
    assert (doc["schema"], doc["target"]) == ("tandem-bench/1", address)
    assert doc["model"] == {"model_name": "fake", "architecture": "Fake", "max_model_len": 128,
                            "vocab_size": 100, "block_size": 16, "dtype": "float32"}  # fmt: skip
    assert doc["config"]["sweep_rates"] == [50.0, "inf"] and doc["config"]["seed"] == 4
    assert [run["label"] for run in doc["runs"]] == ["rate 50/s", "rate inf/s"]
    for run in doc["runs"]:
        assert (run["num_requests"], run["completed"], run["failed"], run["cancelled"]) == (6, 6, 0, 0)
        assert [q["output_tokens"] for q in run["requests"]] == [3] * 6
        assert run["goodput"] <= run["request_throughput"]
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_latency_s"):
            assert run[key]["p50"] <= run[key]["p90"] <= run[key]["p99"]
    assert doc["sweep"] == {"attainment_target": 0.9, "max_rate_meeting_attainment": 50.0}
    # Both rates sent the same 6 prompts.
    prompts = Counter(tuple(q.prompt_token_ids) for q in servicer.received)
    assert len(prompts) == 6 and set(prompts.values()) == {2}
    assert all(len(p) == 8 and max(p) < 100 for p in prompts)
    assert md.read_text().count("\n") == 4
    for name in (LATENCY_CDF, GOODPUT_VS_RATE):
        assert (plots / name).read_bytes()[:8] == PNG_SIGNATURE
    assert f"wrote {out}" in capsys.readouterr().out


def test_concurrency_with_shared_prefix(fake: Fake, tmp_path: Path) -> None:
    servicer, address = fake
    out, plots = tmp_path / "c.json", tmp_path / "plots"
    code = bench(address, "--concurrency", "2", "--num-requests", "8", "--shared-prefix-groups", "2",
                 "--shared-prefix-len", "20", "--input-len-dist", "uniform", "--input-len-range", "1", "5",
                 "--output-len", "2", "--out-json", str(out), "--plots-dir", str(plots))  # fmt: skip
    assert code == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["mode"], run["concurrency"], run["completed"]) == ("concurrency", 2, 8)
    assert {q["group"] for q in run["requests"]} == {0, 1}
    lengths = sorted(len(q.prompt_token_ids) for q in servicer.received)
    assert all(21 <= n <= 25 for n in lengths)
    assert len({tuple(q.prompt_token_ids[:20]) for q in servicer.received}) == 2
    assert sorted(p.name for p in plots.iterdir()) == [LATENCY_CDF]  # no rate, no goodput-vs-rate plot


def write_dataset(path: Path) -> list[tuple[str, str]]:
    pairs = [("tell me a story", "once upon a time there was a robot"), ("hi", "hello world"),
             ("numbers", "0 1 2 3 4 5 6 7 8 9 10 42 100")]  # fmt: skip
    rows = [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": g}]} for p, g in pairs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return pairs


def test_dataset_with_tokenizer(fake: Fake, tmp_path: Path, capsys) -> None:
    servicer, address = fake
    pairs = write_dataset(tmp_path / "d.jsonl")
    code = bench(
        address, "--request-rate", "inf", "--num-requests", "3", "--dataset", str(tmp_path / "d.jsonl")
    )
    assert code == 0
    tokenizer = Tokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    expected = {p: len(tokenizer.encode(g, add_special_tokens=False)) for p, g in pairs}
    assert {q.prompt: q.sampling.max_tokens for q in servicer.received} == expected
    assert all(not q.prompt_token_ids and q.sampling.ignore_eos for q in servicer.received)
    assert "dataset lengths are approximate" in capsys.readouterr().err  # fake vocab 100 != 4096


def test_dataset_without_tokenizer_counts_words(fake: Fake, tmp_path: Path, capsys) -> None:
    servicer, address = fake
    pairs = write_dataset(tmp_path / "d.jsonl")
    (tmp_path / "no_tokenizer").mkdir()
    code = bench(address, "--request-rate", "100", "--num-requests", "6", "--dataset", str(tmp_path / "d.jsonl"),
                 "--model", str(tmp_path / "no_tokenizer"))  # fmt: skip
    assert code == 0
    counts = Counter((q.prompt, q.sampling.max_tokens) for q in servicer.received)
    assert counts == {(p, len(g.split())): 2 for p, g in pairs}
    assert "counting whitespace-separated words" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input-len-dist", "uniform"], "--input-len-dist uniform needs --input-len-range LO HI"),
        (["--output-len-range", "1", "4"], "--output-len-range needs --output-len-dist uniform"),
        (["--shared-prefix-groups", "2"], "--shared-prefix-groups and --shared-prefix-len go together"),
        (["--dataset", "/nonexistent.jsonl"], "dataset not found"),
        (["--input-len", "100", "--output-len", "29"], "reach 129 tokens, over max_model_len=128"),
        (["--input-len-dist", "uniform", "--input-len-range", "9", "3"], "1 <= lo <= hi"),
    ],
)
def test_bad_options_exit_2(fake: Fake, argv: list[str], message: str, capsys) -> None:
    servicer, address = fake
    assert bench(address, "--request-rate", "1", "--num-requests", "1", *argv) == 2
    assert message in capsys.readouterr().err
    assert servicer.received == []


def test_parser_rejects_two_modes_and_bad_rates(capsys) -> None:
    for argv in (["--request-rate", "1", "--concurrency", "2"], [], ["--request-rate", "0"],
                 ["--sweep-rates"], ["--concurrency", "1", "--seed", "-1"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["bench", *argv])
        assert exit_.value.code == 2, argv
    assert "not allowed with argument" in capsys.readouterr().err


def run_script(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, check=False)  # fmt: skip


def test_help_and_unreachable_target_never_import_torch() -> None:
    script = f"""
import sys
from cli.main import main
try:
    main(["bench", "--help"])
except SystemExit as exit_:
    assert exit_.code == 0
code = main(["bench", "--target", "127.0.0.1:{free_port()}", "--request-rate", "1", "--no-progress"])
print("RESULT", code, sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
    result = run_script(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "RESULT 1 []"
    assert result.stderr.startswith("error: UNAVAILABLE: ")


def test_ctrl_c_cancels_and_writes_partial_report(fake: Fake, tmp_path: Path) -> None:
    servicer, address = fake
    servicer.itl_s = 0.1  # 100 tokens take 10 s
    out = tmp_path / "partial.json"
    cmd = [sys.executable, "-m", "cli.main", "bench", "--target", address, "--no-progress",
           "--sweep-rates", "10", "20", "--num-requests", "50", "--output-len", "100", "--input-len", "4",
           "--out-json", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(servicer.received) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    doc: dict[str, Any] = json.loads(out.read_text())
    (run,) = doc["runs"]  # the second sweep rate never ran
    assert run["interrupted"] is True
    # A call started just before Ctrl-C may be cancelled before the server sees it.
    assert run["num_requests"] in (len(servicer.received), len(servicer.received) + 1)
    assert len(servicer.received) >= 3
    assert run["cancelled"] == run["num_requests"] and run["completed"] == run["failed"] == 0
    assert "(interrupted)" in stdout
    deadline = time.monotonic() + 5
    while servicer.active and time.monotonic() < deadline:  # every stream was cancelled at the server
        time.sleep(0.05)
    assert servicer.active == 0
