"""PNG plots of bench runs, drawn with matplotlib's Agg backend (no display needed).

- ``latency_cdf.png``: empirical CDFs of TTFT, TPOT, ITL and end-to-end latency (ms),
  one line per run.
- ``goodput_vs_rate.png`` (when some run has a finite request rate): request
  throughput and goodput (requests/s) against the offered request rate, with the SLO
  attainment (%) on a second axis.

Both read the run objects of :func:`cli.bench.report.run_report`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LATENCY_CDF = "latency_cdf.png"
GOODPUT_VS_RATE = "goodput_vs_rate.png"
_PANELS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_latency_s", "end-to-end latency"))


def write_plots(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Writes the plots that apply to ``runs`` into ``out_dir`` (created); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_latency_cdfs(runs, out_dir / LATENCY_CDF)]
    if any(run["request_rate"] is not None for run in runs):
        paths.append(plot_goodput_vs_rate(runs, out_dir / GOODPUT_VS_RATE))
    return paths


def latency_values(run: dict[str, Any], key: str) -> list[float]:
    """Seconds of one latency (``ttft_s``, ``tpot_s``, ``itl_s``, ``e2e_latency_s``) of a
    run's completed requests; ITL is every gap between consecutive tokens."""
    done = [r for r in run["requests"] if r["status"] == "completed" and r["token_times_s"]]
    if key == "itl_s":
        return [b - a for r in done for a, b in itertools.pairwise(r["token_times_s"])]
    return [r[key] for r in done if r[key] is not None]


def plot_latency_cdfs(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """2x2 empirical CDFs (x in ms, y the fraction of values <= x); returns ``path``."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, _PANELS, strict=True):
        for run in runs:
            values = np.sort(np.asarray(latency_values(run, key))) * 1000
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=run["label"])
        ax.set(
            title=title, xlabel="ms", ylabel="fraction of requests" if key != "itl_s" else "fraction of gaps"
        )
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.suptitle("tandem bench: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_goodput_vs_rate(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """Throughput and goodput against offered rate, SLO attainment on the right axis."""
    plt = _pyplot()
    points = sorted((r for r in runs if r["request_rate"] is not None), key=lambda r: r["request_rate"])
    rates = [r["request_rate"] for r in points]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(rates, rates, ":", color="grey", label="offered rate")
    ax.plot(rates, [r["request_throughput"] for r in points], "o-", label="request throughput")
    ax.plot(rates, [r["goodput"] for r in points], "s-", label="goodput")
    ax.set(xlabel="request rate (req/s)", ylabel="req/s", title=_slo_title(points))
    ax.grid(alpha=0.3)
    right = ax.twinx()
    attainment = [100 * (r["slo_attainment"] or 0.0) for r in points]
    right.plot(rates, attainment, "^--", color="tab:red", label="SLO attainment")
    right.set(ylabel="SLO attainment (%)", ylim=(0, 105))
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slo_title(runs: Sequence[dict[str, Any]]) -> str:
    slo = runs[0]["slo"] if runs else {}
    parts = [f"{name} <= {1000 * slo[key]:g} ms" for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"))
             if slo.get(key) is not None]  # fmt: skip
    return "goodput vs rate" + (f" (SLO: {', '.join(parts)})" if parts else " (no SLO)")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
