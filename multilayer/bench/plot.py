"""Charts of ``multilayer bench`` and ``multilayer soak`` runs as PNG files (``--plot``).

matplotlib's object API only (no pyplot): no display, no global figure state, so the
commands draw the same on a laptop and on a headless CI machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import StrMethodFormatter

from . import METRICS, Result
from .soak import SoakReport

__all__ = ["plot_bench", "plot_soak"]

#: Ours first, then the peers, in the order of the table's columns.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
BETTER, WORSE = "#1a7f37", "#b42318"


def _unit(metric: str) -> str:
    """The y-axis label of ``metric``: what the METRICS label counts, in full words."""
    if metric in ("a", "b") or metric.endswith("msgs"):
        return "messages per second"
    if metric.endswith("calls"):
        return "group_send calls per second"
    if metric in ("c50", "c99", "r50", "r99"):
        return "milliseconds"
    return {
        "rfull": "% of rounds",
        "rburst": "deliveries per second",
        "rlost": "deliveries",
        "rdup": "deliveries",
    }[metric]


def _value_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _draw_metric(axes: Axes, metric: str, values: list[float | None], names: Sequence[str]) -> None:
    label, higher = METRICS[metric]
    axes.set_title(
        f"{label}\n({'higher' if higher else 'lower'} is better)", fontsize=9, loc="left"
    )
    axes.set_ylabel(_unit(metric), fontsize=8)
    axes.tick_params(labelsize=7)
    axes.set_xticks([])
    ours = values[0]
    top = max((value for value in values if value), default=1.0)
    axes.set_ylim(0, top * 1.3)
    if top >= 1000:
        axes.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    for index, value in enumerate(values):
        if value is None:
            axes.text(index, 0, "n/a", ha="center", va="bottom", fontsize=7, color="#555555")
            continue
        axes.bar(index, value, color=COLORS[index % len(COLORS)], width=0.7)
        text, color = _value_text(value), "black"
        if index and ours and value:
            ratio = ours / value
            text += f"\n{ratio:.2f}x"
            color = BETTER if (ratio >= 1) == higher else WORSE
        axes.text(
            index, value, text, ha="center", va="bottom", fontsize=7, color=color, weight="bold"
        )
    axes.set_xlim(-0.6, len(names) - 0.4)


def plot_bench(
    results: dict[str, dict[str, Result]], names: Sequence[str], title: str, path: Path
) -> Figure:
    """Draw each metric of ``results`` as bars, ours (``names[0]``) against each peer, with
    ours/peer on every peer bar, green where ours is better; save it as PNG to ``path``."""
    rows = [
        (metric, [per[name].median(metric) for name in names])
        for scenario, per in results.items()
        for metric in METRICS
        if metric.startswith(scenario)
    ]
    rows = [(metric, values) for metric, values in rows if any(values)]
    columns = min(4, max(1, len(rows)))
    lines = max(1, -(-len(rows) // columns))
    # At least 9 inches wide: the title and the legend must fit above and below one panel.
    figure = Figure(figsize=(max(3.2 * columns, 9.0), 2.6 * lines + 1.3), layout="constrained")
    figure.suptitle(title, fontsize=10)
    grid = figure.subplots(lines, columns, squeeze=False)
    cells = [axes for line in grid for axes in line]
    for axes, (metric, values) in zip(cells, rows, strict=False):
        _draw_metric(axes, metric, values, names)
    for axes in cells[len(rows) :]:
        axes.set_visible(False)
    figure.legend(
        handles=[
            Patch(color=COLORS[index % len(COLORS)], label=name) for index, name in enumerate(names)
        ],
        loc="outside lower center",
        ncols=min(len(names), 5),
        fontsize=8,
        title=f"ratios on the peer bars: {names[0]}/peer (green: {names[0]} better)",
        title_fontsize=8,
    )
    figure.savefig(path, dpi=110)
    return figure


def plot_soak(report: SoakReport, path: Path) -> Figure:
    """Draw p50/p99 latency, deliveries per second and resident memory over a soak run;
    save it as PNG to ``path``."""
    rows = report.intervals
    ends = [row.end for row in rows]
    starts = [0.0, *ends[:-1]]
    figure = Figure(figsize=(8, 7.5), layout="constrained")
    verdict = f"lost {report.lost}, duplicates {report.duplicates}, unexpected {report.unexpected}"
    figure.suptitle(
        f"multilayer soak {report.url}: {report.duration:g} s, {report.channels} channels, "
        f"{verdict}",
        fontsize=10,
    )
    latency, deliveries, memory = figure.subplots(3, 1, sharex=True)
    latency.plot(ends, [row.p99_ms for row in rows], marker="o", label="p99")
    latency.plot(ends, [row.p50_ms for row in rows], marker="o", label="p50")
    latency.set_ylabel("delivery latency (ms)")
    latency.legend(fontsize=8, loc="best")
    deliveries.plot(
        ends,
        [
            row.delivered / (end - start) if end > start else 0.0
            for row, start, end in zip(rows, starts, ends, strict=True)
        ],
        marker="o",
        color=COLORS[2],
    )
    deliveries.set_ylabel("deliveries per second")
    memory.plot(ends, [row.rss_kib / 1024 for row in rows], marker="o", color=COLORS[3])
    memory.set_ylabel("resident memory (MiB)")
    memory.set_xlabel("seconds since the start of the run (end of each interval)")
    for axes in (latency, deliveries, memory):
        # From zero, with room above the highest point: a flat line stays readable as flat.
        highest = max((y for line in axes.get_lines() for y in line.get_ydata()), default=0.0)
        axes.set_ylim(0, float(highest) * 1.15 or 1.0)
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return figure
