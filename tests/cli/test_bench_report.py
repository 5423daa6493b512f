"""``cli.bench.report``: metrics hand-computed on synthetic timings, table, JSON, Markdown."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from cli.bench import report
from cli.bench.report import Slo
from cli.bench.runner import RequestRecord, RunResult, RunSpec, Status

SPEC = RunSpec(request_rate=2.0, num_requests=6)


def record(index: int, send: float, tokens: list[float], end: float, status: Status = "completed",
           code: str = "OK", prompt_len: int = 10) -> RequestRecord:  # fmt: skip
    return RequestRecord(
        index,
        f"r{index}",
        prompt_len,
        4,
        None,
        send,
        tokens,
        end,
        status,
        code,  # type: ignore[arg-type]
    )


def records() -> list[RequestRecord]:
    """Three completed, two failed, one cancelled; dyadic times so sums are exact."""
    return [
        record(0, 0.0, [0.25, 0.5, 0.75, 1.0], 1.0),  # TTFT .25, TPOT .25, ITL .25 x3, E2E 1
        record(1, 0.5, [1.5, 1.5, 2.5], 2.75, prompt_len=20),  # TTFT 1, TPOT .5, ITL 0 and 1, E2E 2.25
        record(2, 1.0, [1.125], 1.25, prompt_len=30),  # TTFT .125, no TPOT, E2E .25
        record(3, 1.0, [1.5], 2.0, "failed", "DEADLINE_EXCEEDED"),
        record(4, 2.0, [], 2.0, "failed", "UNAVAILABLE"),
        record(5, 3.0, [3.5], 3.75, "cancelled", "CANCELLED"),
    ]


def test_per_request_metrics() -> None:
    r0, r1, r2 = records()[:3]
    assert (report.ttft(r0), report.tpot(r0), report.itls(r0)) == (0.25, 0.25, [0.25, 0.25, 0.25])
    assert (report.ttft(r1), report.tpot(r1), report.itls(r1)) == (1.0, 0.5, [0.0, 1.0])
    assert (report.ttft(r2), report.tpot(r2), report.itls(r2)) == (0.125, None, [])


def test_summarize() -> None:
    assert report.summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert report.summarize([2.0]) == {"mean": 2.0, "p50": 2.0, "p90": 2.0, "p99": 2.0}
    # numpy's linear interpolation: p90 of 11 values 0..10 is 9, p99 is 9.9.
    got = report.summarize([float(v) for v in range(11)])
    assert got == {"mean": 5.0, "p50": 5.0, "p90": 9.0, "p99": pytest.approx(9.9, abs=1e-12)}


def test_run_report_counts_throughput_goodput() -> None:
    result = RunResult(SPEC, records(), duration_s=4.0, interrupted=False)
    run = report.run_report(result, Slo(ttft_s=0.5, tpot_s=0.25))
    assert {k: run[k] for k in ("mode", "request_rate", "concurrency", "label", "num_requests", "completed",
                                "failed", "failed_by_code", "cancelled")} == {
        "mode": "rate", "request_rate": 2.0, "concurrency": None, "label": "rate 2/s", "num_requests": 6,
        "completed": 3, "failed": 2, "failed_by_code": {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1},
        "cancelled": 1,
    }  # fmt: skip
    assert run["total_input_tokens"] == 60
    assert run["total_output_tokens"] == 8
    assert run["request_throughput"] == 0.75  # 3 completed / 4 s
    assert run["output_token_throughput"] == 2.0  # 8 tokens / 4 s
    # r0 meets both SLOs, r1 misses TTFT (1.0 > 0.5), r2 has one token so only TTFT applies.
    assert run["goodput"] == 0.5
    assert run["slo_attainment"] == 2 / 6
    assert run["slo"] == {"ttft_s": 0.5, "tpot_s": 0.25}


def test_run_report_latency_summaries() -> None:
    run = report.run_report(RunResult(SPEC, records(), 4.0, False), Slo())
    approx = pytest.approx
    # TTFT [.25, 1, .125]; TPOT [.25, .5]; ITL [.25, .25, .25, 0, 1]; E2E [1, 2.25, .25].
    assert run["ttft_s"] == {
        "mean": approx(1.375 / 3),
        "p50": 0.25,
        "p90": approx(0.85),
        "p99": approx(0.985),
    }
    assert run["tpot_s"] == {"mean": 0.375, "p50": 0.375, "p90": approx(0.475), "p99": approx(0.4975)}
    assert run["itl_s"] == {"mean": approx(0.35), "p50": 0.25, "p90": approx(0.7), "p99": approx(0.97)}
    assert run["e2e_latency_s"] == {
        "mean": approx(3.5 / 3),
        "p50": 1.0,
        "p90": approx(2.0),
        "p99": approx(2.225),
    }
    # Without SLOs every completed request counts.
    assert run["goodput"] == run["request_throughput"] == 0.75
    assert run["slo_attainment"] == 0.5


def test_slo_edges() -> None:
    r0, r1, r2, r3, _, r5 = records()
    assert Slo(ttft_s=0.25, tpot_s=0.25).met_by(r0)  # bounds are inclusive
    assert not Slo(ttft_s=0.24).met_by(r0)
    assert not Slo(tpot_s=0.24).met_by(r0)
    assert Slo(tpot_s=0.4).met_by(r1) is False and Slo(tpot_s=0.5).met_by(r1)
    assert Slo(ttft_s=1.0, tpot_s=1e-9).met_by(r2)  # a single token has no TPOT
    assert not Slo().met_by(r3) and not Slo().met_by(r5)  # failed and cancelled never count


def test_request_json_and_document_are_strict_json() -> None:
    run = report.run_report(RunResult(SPEC, records(), 4.0, True), Slo(ttft_s=0.5))
    assert run["interrupted"] is True
    by_status = [
        (q["index"], q["status"], q["code"], q["ttft_s"], q["e2e_latency_s"]) for q in run["requests"]
    ]
    assert by_status == [
        (0, "completed", "OK", 0.25, 1.0), (1, "completed", "OK", 1.0, 2.25), (2, "completed", "OK", 0.125, 0.25),
        (3, "failed", "DEADLINE_EXCEEDED", None, None), (4, "failed", "UNAVAILABLE", None, None),
        (5, "cancelled", "CANCELLED", None, None),
    ]  # fmt: skip
    unsent = RequestRecord(9, "r9", 1, 1)  # never got a send time
    assert report.request_json(unsent)["send_time_s"] is None
    doc = report.document(
        "127.0.0.1:1", {"model_name": "m"}, {"seed": 0}, [run], report.sweep_summary([run], 0.9)
    )
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text)["schema"] == "tandem-bench/1"


def test_concurrency_run_label_and_infinite_rate() -> None:
    run = report.run_report(RunResult(RunSpec(concurrency=4, num_requests=1), [], 0.0, False), Slo())
    assert (run["mode"], run["label"], run["request_rate"], run["concurrency"]) == (
        "concurrency", "concurrency 4", None, 4)  # fmt: skip
    assert (run["request_throughput"], run["goodput"], run["slo_attainment"]) == (0.0, 0.0, None)
    burst = report.run_report(
        RunResult(RunSpec(request_rate=math.inf, num_requests=1), [], 1.0, False), Slo()
    )
    assert (burst["mode"], burst["label"], burst["request_rate"]) == ("rate", "rate inf/s", None)


def test_sweep_summary_is_distserve_goodput() -> None:
    runs = [
        {"request_rate": r, "slo_attainment": a}
        for r, a in ((1.0, 1.0), (2.0, 0.95), (4.0, 0.5), (8.0, 0.92))
    ]
    assert report.sweep_summary(runs, 0.9) == {"attainment_target": 0.9, "max_rate_meeting_attainment": 8.0}
    assert report.sweep_summary(runs, 0.93)["max_rate_meeting_attainment"] == 2.0
    assert report.sweep_summary(runs[2:3], 0.9)["max_rate_meeting_attainment"] is None
    assert report.sweep_summary([{"request_rate": None, "slo_attainment": 1.0}], 0.9)[
        "max_rate_meeting_attainment"] is None  # fmt: skip


def test_markdown_and_rich_table() -> None:
    run = report.run_report(RunResult(SPEC, records(), 4.0, False), Slo(ttft_s=0.5, tpot_s=0.25))
    assert report.markdown_table([run]).splitlines() == [
        "| run | completed / sent | req/s | output tok/s | goodput (req/s) | SLO attainment "
        "| TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        "| rate 2/s | 3 / 6 | 0.75 | 2.00 | 0.50 | 33.3% | 250.0 / 850.0 / 985.0 | 375.0 / 475.0 / 497.5 |",
    ]
    out = io.StringIO()
    report.print_table([run], Console(file=out, width=120))
    text = out.getvalue()
    assert "rate 2/s" in text
    assert "2 (DEADLINE_EXCEEDED 1, UNAVAILABLE 1)" in text
    assert "TTFT p90 (ms)" in text and "850.0" in text
