"""Reading one process's Prometheus ``/metrics`` in tests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape_metric(metrics_address: str, name: str) -> float:
    """The unlabelled sample ``name`` served at ``http://{metrics_address}/metrics``.

    Raises:
        KeyError: no unlabelled sample of that name.
    """
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise KeyError(f"{name} not exported at {metrics_address}")
