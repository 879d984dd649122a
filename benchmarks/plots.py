"""PNG plots of benchmark runs, written to benchmarks/out/ beside the JSON (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "out"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(results: list[dict[str, Any]]) -> Path:
    """Dispatch throughput against the number of dispatch processes, beside the backends' bound."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    processes = [r["processes"] for r in results]
    ax.plot(processes, [r["msgs_per_s"] for r in results], "o-", label="measured")
    ax.plot(processes, [r["bound_msgs_per_s"] for r in results], "--", color="grey", label="bound (slots / latency)")
    ax.set(xlabel="dispatch processes", ylabel="messages / s", xticks=processes, title="Dispatch scaling")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, "scaling.png")


def plot_waits(series: dict[str, list[tuple[float, float]]], slo_s: dict[str, float]) -> Path:
    """Queue wait (enqueue → admission) of every admitted message per level, against when it arrived."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for level, points in series.items():
        if points:
            ax.scatter([t for t, _ in points], [w for _, w in points], s=4, label=f"{level} (SLO {slo_s[level]:g}s)")
    ax.set(xlabel="seconds since the overload began", ylabel="queue wait (s)", yscale="log")
    ax.set_title("Queue wait per level at 2x capacity")
    ax.legend(markerscale=3)
    ax.grid(alpha=0.3)
    return _save(fig, "overload_waits.png")


def _save(fig: Any, name: str) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path
