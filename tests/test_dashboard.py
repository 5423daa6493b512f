"""The Grafana dashboard (dashboards/tandem.json): valid JSON whose every panel query
names only metrics that Tandem processes export, and that covers the latencies,
throughput, queues, KV usage, prefix hit rate and transfer bandwidth."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from engine.metrics import ProcessMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "tandem.json"
METRIC_NAME = re.compile(r"\btandem_[a-z0-9_]+\b")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def metric_names(expr: str) -> list[str]:
    """The ``tandem_*`` metric names of a PromQL expression (label values ignored)."""
    return METRIC_NAME.findall(QUOTED.sub('""', expr))


def exported_sample_names() -> set[str]:
    """Sample names (with _bucket/_sum/_count/_total suffixes) every role's registry exports."""
    names: set[str] = set()
    for role in ("router", "prefill", "decode"):
        metrics = ProcessMetrics(role)
        # Labelled families export no sample until a child exists: touch one of each.
        metrics.kv_transfer_bytes.labels(backend="tcp")
        metrics.kv_transfer_size.labels(backend="tcp")
        metrics.kv_transfer_seconds.labels(backend="tcp")
        metrics.requests.labels(code="OK")
        metrics.requests_finished.labels(finish_reason="stop")
        metrics.routing_decisions.labels(policy="prefix", reason="load")
        names |= {s.name for family in metrics.registry.collect() for s in family.samples}
    return names


def panel_queries() -> dict[str, list[str]]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}


def test_every_queried_metric_is_exported() -> None:
    exported = exported_sample_names()
    queried = {name for exprs in panel_queries().values() for e in exprs for name in metric_names(e)}
    assert queried, "no tandem_* metric in the dashboard"
    assert sorted(queried - exported) == []


def test_exported_names_include_the_issues_histograms() -> None:
    exported = exported_sample_names()
    for hist in ("time_to_first_token", "time_per_output_token", "inter_token_latency",
                 "e2e_request_latency", "request_queue"):  # fmt: skip
        for suffix in ("_bucket", "_sum", "_count"):
            assert f"tandem_{hist}_seconds{suffix}" in exported


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    queries = " ".join(e for exprs in panel_queries().values() for e in exprs)
    for needed in (
        "tandem_time_to_first_token_seconds_bucket",
        "tandem_time_per_output_token_seconds_bucket",
        "tandem_generation_tokens_total",  # throughput
        "tandem_request_queue_seconds_bucket",
        "tandem_requests_waiting",
        "tandem_kv_blocks_used",
        "tandem_prefix_cache_hit_tokens_total",
        "tandem_kv_transfer_size_bytes_sum",  # bandwidth
    ):
        assert needed in queries, needed
    titles = list(panel_queries())
    assert len(titles) == len(set(titles))


def test_metric_name_regex_sees_through_promql() -> None:
    expr = 'histogram_quantile(0.9, sum by (le) (rate(tandem_a_bucket{x="tandem_not"}[5m]))) / tandem_b'
    assert metric_names(expr) == ["tandem_a_bucket", "tandem_b"]
