"""`multilayer bench|soak --plot`: what the charts say, and that the commands write them."""

from __future__ import annotations

from pathlib import Path

from multilayer.bench import METRICS, Result
from multilayer.bench.soak import Interval, SoakReport
from multilayer.cli import main
from tests.support.brokers import require_module

require_module("matplotlib")
from multilayer.bench.plot import BETTER, WORSE, _unit, plot_bench, plot_soak  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def texts(figure: object) -> dict[str, str]:
    """Every text drawn on the figure's axes, with its colour."""
    from matplotlib.colors import to_hex

    return {
        text.get_text(): to_hex(text.get_color())
        for axes in figure.axes  # type: ignore[attr-defined]
        for text in axes.texts
    }


def test_bench_chart_puts_ours_over_peer_on_each_bar(tmp_path: Path) -> None:
    results = {
        "b": {
            "multilayer": Result({"b": [2000.0, 1000.0, 3000.0]}),
            "peer": Result({"b": [1000.0]}),
            "broken": Result(skipped="failed: boom"),
        },
        "c": {
            "multilayer": Result({"c50": [2.0], "c99": [4.0]}),
            "peer": Result({"c50": [1.0], "c99": [8.0]}),
            "broken": Result(skipped="failed: boom"),
        },
    }
    path = tmp_path / "bench.png"
    figure = plot_bench(results, ["multilayer", "peer", "broken"], "a title", path)
    assert path.read_bytes().startswith(PNG)
    drawn = texts(figure)
    # Throughput: the median 2,000 against 1,000 is twice as good.
    assert drawn["2,000"] == "#000000" and drawn["1,000\n2.00x"] == BETTER
    # Latency: ours 2 ms against 1 ms is worse, 4 ms against 8 ms better.
    assert drawn["1\n2.00x"] == WORSE and drawn["8\n0.50x"] == BETTER
    assert drawn["n/a"]
    titles = [axes.get_title(loc="left") for axes in figure.axes if axes.get_visible()]
    assert titles == [
        "(b) process-specific msgs/s\n(higher is better)",
        "(c) ping-pong p50 ms\n(lower is better)",
        "(c) ping-pong p99 ms\n(lower is better)",
    ]
    assert [axes.get_ylabel() for axes in figure.axes if axes.get_visible()] == [
        "messages per second",
        "milliseconds",
        "milliseconds",
    ]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == [
        "multilayer",
        "peer",
        "broken",
    ]


def test_every_metric_has_a_unit() -> None:
    assert all(_unit(metric) for metric in METRICS)


def test_soak_chart_draws_each_interval(tmp_path: Path) -> None:
    report = SoakReport(
        "memory://",
        20,
        10,
        intervals=[
            Interval(
                end=10.0, operations=100, delivered=200, p50_ms=1, p99_ms=3, joined=5, rss_kib=2048
            ),
            Interval(
                end=20.0, operations=100, delivered=400, p50_ms=1, p99_ms=5, joined=9, rss_kib=4096
            ),
        ],
    )
    path = tmp_path / "soak.png"
    latency, deliveries, memory = plot_soak(report, path).axes
    assert path.read_bytes().startswith(PNG)
    assert [list(line.get_ydata()) for line in latency.get_lines()] == [[3, 5], [1, 1]]
    assert list(deliveries.get_lines()[0].get_ydata()) == [20.0, 40.0]
    assert list(memory.get_lines()[0].get_ydata()) == [2.0, 4.0]
    assert memory.get_ylabel() == "resident memory (MiB)"


def test_commands_write_the_charts(tmp_path: Path) -> None:
    bench, soak = tmp_path / "bench.png", tmp_path / "soak.png"
    argv = ["bench", "memory://", "--vs", "inmemory", "-n", "20", "--repeat", "1"]
    assert main([*argv, "--scenarios", "a", "--plot", str(bench)]) == 0
    assert bench.read_bytes().startswith(PNG)
    argv = ["soak", "memory://", "--duration", "1", "--interval", "0.5", "--channels", "5"]
    assert main([*argv, "--plot", str(soak)]) == 0
    assert soak.read_bytes().startswith(PNG)
