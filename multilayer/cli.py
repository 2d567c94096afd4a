"""The ``multilayer`` command: backends, check, stats, ping, bench, soak and hub."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

from .exceptions import ConfigurationError, MultilayerError
from .layer import DEFAULT_URL, ENV_URL, ChannelLayer, LayerStats
from .url import LayerURL

__all__ = ["main"]

T = TypeVar("T")


def _cmd_backends(_args: argparse.Namespace) -> int:
    from .plugins import installed_backends

    rows = [("scheme", "plugin", "extra", "status")]
    for info in installed_backends():
        status = "ok" if info.available else f"unavailable: {info.problem}"
        rows.append((info.scheme, info.target, info.extra or "-", status))
    widths = [max(len(row[i]) for row in rows[:]) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)),
            row[3],
        )
    return 0


class _Collector:
    """pytest plugin recording each conformance test's outcome and duration."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _name(nodeid: str) -> str:
        path, _, test = nodeid.partition("::")
        return f"{Path(path).name}::{test.partition('[')[0]}"

    def pytest_runtest_logreport(self, report: Any) -> None:
        name = self._name(report.nodeid)
        entry = self.tests.setdefault(name, {"name": name, "outcome": "passed", "duration": 0.0})
        entry["duration"] = round(entry["duration"] + report.duration, 3)
        if report.skipped:
            entry["outcome"] = "skipped"
            entry["reason"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        elif report.failed:
            entry["outcome"] = "failed"
            entry["error"] = str(report.longrepr)[-2000:]


def _broker_info(url: str) -> tuple[str | None, dict[str, str], dict[str, bool], str]:
    layer = ChannelLayer(url)

    async def probe() -> str | None:
        try:
            backend = await layer._state().ready()
            return await backend.broker_version()
        finally:
            await layer.close()

    broker = asyncio.run(asyncio.wait_for(probe(), 60))
    cls = layer.backend_class
    return broker, cls.versions(), cls.capabilities.as_dict(), f"{cls.__module__}:{cls.__name__}"


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cmd_check(args: argparse.Namespace) -> int:
    import pytest

    url = args.url or os.environ.get(ENV_URL) or DEFAULT_URL
    parsed = LayerURL.parse(url)
    ChannelLayer(url)  # a bad URL or a missing backend fails here, with its own message
    collector = _Collector()
    pytest_args = [
        "-c",
        os.devnull,
        "--rootdir",
        str(Path(__file__).parent),
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "multilayer.conformance",
        "--multilayer-url",
        url,
        "-q" if not args.verbose else "-v",
        "-W",
        "error::pytest.PytestUnraisableExceptionWarning",
        # This command imported multilayer before pytest started, so pytest cannot rewrite
        # the asserts of the plugin module (the conformance tests' own are still rewritten)
        # and would say so to every user of an installed wheel.
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
    ]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        pytest_args += ["-p", "multilayer.conformance.plugin"]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    if args.restart_command:
        pytest_args += ["--multilayer-restart-command", args.restart_command]
    started = datetime.datetime.now(datetime.timezone.utc)
    code = pytest.main(pytest_args, plugins=[collector])
    tests = list(collector.tests.values())
    summary = {
        outcome: sum(1 for test in tests if test["outcome"] == outcome)
        for outcome in ("passed", "failed", "skipped")
    }
    print(f"\nmultilayer check {parsed.sanitized()}")
    width = max((len(test["name"]) for test in tests), default=10)
    for test in tests:
        extra = f"  {test.get('reason', '')}" if test["outcome"] == "skipped" else ""
        print(
            f"  {test['name'].ljust(width)}  {test['outcome']:7}  {test['duration']:6.2f}s{extra}"
        )
    print(f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped")
    if args.json or args.record:
        broker, libraries, capabilities, backend = _broker_info(url)
        record = {
            "scheme": parsed.scheme,
            "backend": backend,
            "url": LayerURL(parsed.scheme, parsed.hosts, None, None, parsed.path).render(),
            "broker_version": broker,
            "versions": {
                "multilayer": _package_version("multilayer"),
                "python": platform.python_version(),
                "channels": _package_version("channels"),
                "msgpack": _package_version("msgpack"),
                **libraries,
            },
            "capabilities": capabilities,
            "date": started.isoformat(timespec="seconds"),
            "summary": summary,
            "tests": tests,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        if args.record:
            from .conformance.records import write_record

            if summary["failed"] or code not in (0,):
                print("not recording: the run did not pass", file=sys.stderr)
                return 1
            print(f"recorded {write_record(Path(args.record_dir), record)}")
    return 0 if code == 0 and not summary["failed"] else 1


class _Unreachable(Exception):
    """The broker did not answer, or refused us: one line for the operator."""


async def _bounded(what: str, url: LayerURL, call: Awaitable[T], timeout: float) -> T:
    """Await ``call`` within ``timeout`` seconds; any failure becomes :class:`_Unreachable`.

    The message names the sanitized URL and never holds the password, even where a
    client library's own error repeats it.
    """
    try:
        return await asyncio.wait_for(call, timeout)
    except asyncio.TimeoutError:
        reason = f"no answer within {timeout:g}s"
    except ConfigurationError:
        raise
    except Exception as error:  # client libraries raise anything; the operator gets one line
        reason = str(error) or type(error).__name__
        cause = error.__cause__
        if cause is not None and str(cause) not in reason:
            reason += f" ({str(cause) or type(cause).__name__})"
    if url.password:
        reason = reason.replace(url.password, "***")
    raise _Unreachable(f"{what} {url.sanitized()}: {reason}")


def _count_table(name: str, count: str, counts: Mapping[str, int], empty: str) -> list[str]:
    names = sorted(counts)
    width = max([len(each) for each in names] + [len(name)])
    lines = [f"  {name.ljust(width)}  {count:>8}"]
    lines += [f"  {each.ljust(width)}  {counts[each]:>8}" for each in names]
    return lines if names else [*lines, f"  {empty}"]


def _format_stats(stats: LayerStats) -> str:
    lines = [f"multilayer stats {stats.url}  prefix={stats.prefix}  {time.strftime('%H:%M:%S')}"]
    if stats.unknown:
        lines.append(f"  ({stats.unknown})")
    if stats.queues is not None:
        lines += _count_table("queue", "waiting", stats.queues, "(no message waiting)")
    if stats.groups is not None:
        lines += _count_table("group", "members", stats.groups, "(no group)")
    # The traffic counters are this command's own (all zero): only reconnects say anything.
    lines.append(f"  broker connections lost and made again by this command: {stats.reconnects}")
    return "\n".join(lines)


def _layer_for(args: argparse.Namespace) -> ChannelLayer:
    url = args.url or os.environ.get(ENV_URL) or DEFAULT_URL
    return ChannelLayer(url) if args.prefix is None else ChannelLayer(url, prefix=args.prefix)


def _extra(module: str, extra: str) -> Any:
    """Import ``module`` of the optional ``extra``, or stop saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigurationError(
            f"{error.name or module} is not installed: pip install 'multilayer[{extra}]'"
        ) from error


def _cmd_stats(args: argparse.Namespace) -> int:
    layer = _layer_for(args)
    clear = "\033[H\033[2J" if sys.stdout.isatty() and not args.prometheus else ""
    render = _format_stats
    if args.prometheus:
        metrics = _extra("multilayer.metrics", "prometheus")

        def render(stats: LayerStats) -> str:
            text: str = metrics.broker_text(layer.url.scheme, stats)
            return text.rstrip("\n")

    async def run() -> int:
        try:
            while True:
                try:
                    stats = await _bounded(
                        "cannot read stats of", layer.url, layer.stats(), args.timeout
                    )
                except _Unreachable as error:
                    if args.watch is None:
                        raise
                    print(f"{clear}multilayer: {error}", flush=True)
                else:
                    print(clear + render(stats), flush=True)
                if args.watch is None:
                    return 0
                await asyncio.sleep(args.watch)
                if not clear:
                    print(flush=True)
        finally:
            # A close failing after the broker went away has nothing to add.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(layer.close(), args.timeout)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


def _cmd_ping(args: argparse.Namespace) -> int:
    layer = _layer_for(args)
    url = layer.url

    async def run() -> int:
        try:
            started = time.perf_counter()
            backend = await _bounded("cannot connect to", url, layer._backend(), args.timeout)
            channel = await _bounded(
                "cannot connect to", url, layer.new_channel("ping"), args.timeout
            )
            connected = time.perf_counter() - started
            broker = await _bounded("cannot ask", url, backend.broker_version(), args.timeout)
            print(
                f"multilayer ping {url.sanitized()}: connected in {connected * 1000:.1f} ms"
                + (f" ({broker})" if broker else "")
            )
            times = []
            for number in range(args.count):
                started = time.perf_counter()
                await _bounded(
                    "cannot send to", url, layer.send(channel, {"ping": number}), args.timeout
                )
                reply = await _bounded("no reply from", url, layer.receive(channel), args.timeout)
                times.append(time.perf_counter() - started)
                if reply != {"ping": number}:
                    raise _Unreachable(f"{url.sanitized()} returned {reply!r} for ping {number}")
            millis = [value * 1000 for value in times]
            print(
                f"{args.count} round trips (send + receive on {channel}): "
                f"min {min(millis):.2f} ms, median {statistics.median(millis):.2f} ms, "
                f"max {max(millis):.2f} ms"
            )
            return 0
        finally:
            # A close failing after the broker went away has nothing to add.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(layer.close(), args.timeout)

    return asyncio.run(run())


def _cmd_bench(args: argparse.Namespace) -> int:
    import secrets

    from .bench import LayerContender, NotApplicable, format_report, load_contender, run_bench
    from .bench.room import RoomOptions

    url = args.url
    capacity = max(args.n * 2, 1000)
    ChannelLayer(url)
    plot = _extra("multilayer.bench.plot", "plot") if args.plot else None
    # The room (r) runs the layer as deployed: default capacity, its own prefix. memory://
    # cannot join separate daphne processes, so there it does not apply.
    room_layer = (
        None
        if LayerURL.parse(url).scheme == "memory"
        else {
            "BACKEND": "multilayer.ChannelLayer",
            "CONFIG": {"url": url, "prefix": f"benchroom{secrets.token_hex(3)}"},
        }
    )
    contenders: list[Any] = [
        LayerContender("multilayer", lambda: ChannelLayer(url, capacity=capacity), room_layer)
    ]
    for name in args.vs:
        try:
            contenders.append(load_contender(name, url, capacity))
        except NotApplicable as why:
            print(f"skipping {name}: {why}", file=sys.stderr)

    def progress(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    results = asyncio.run(
        run_bench(
            contenders,
            n=args.n,
            repeat=args.repeat,
            scenarios=args.scenarios,
            progress=progress,
            room=RoomOptions(
                servers=args.servers, clients=args.clients, rounds=args.rounds, burst=args.burst
            ),
        )
    )
    sizes = [f"n={args.n}"] if set(args.scenarios) - {"r"} else []
    if "r" in args.scenarios:
        sizes.append(
            f"room: {args.servers} servers, {args.clients} clients,"
            f" {args.rounds} rounds, burst {args.burst}"
        )
    title = (
        f"multilayer bench {LayerURL.parse(url).sanitized()}  {'  '.join(sizes)}"
        f"  medians of {args.repeat}"
    )
    names = [c.name for c in contenders]
    print(title)
    print(format_report(results, names))
    if plot is not None:
        plot.plot_bench(results, names, title, Path(args.plot))
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return int(text)


def _cmd_soak(args: argparse.Namespace) -> int:
    from .bench.soak import format_soak, soak

    plot = _extra("multilayer.bench.plot", "plot") if args.plot else None

    def progress(row: Any) -> None:
        print(
            f"  {row.end:>6}s  ops {row.operations}  delivered {row.delivered}  "
            f"p99 {row.p99_ms} ms  RSS {row.rss_kib / 1024:.1f} MiB",
            file=sys.stderr,
            flush=True,
        )

    report = asyncio.run(
        soak(
            args.url,
            args.duration,
            channels=args.channels,
            rate=args.rate,
            churn=args.churn,
            interval=args.interval,
            progress=progress,
        )
    )
    print(format_soak(report))
    if plot is not None:
        plot.plot_soak(report, Path(args.plot))
    return 0 if report.ok else 1


def _add_soak(commands: Any) -> None:
    soak = commands.add_parser(
        "soak", help="sustained traffic with channel churn: losses, duplicates, p99, memory"
    )
    soak.add_argument("url")
    soak.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    soak.add_argument("--channels", type=int, default=1000, help="process-specific channels")
    soak.add_argument("--rate", type=float, default=200.0, help="sends + group_sends per second")
    soak.add_argument("--churn", type=float, default=20.0, help="channels replaced per second")
    soak.add_argument("--interval", type=float, default=10.0, help="seconds per report row")
    soak.add_argument("--plot", metavar="FILE.png", help="also draw the rows as a chart")
    soak.set_defaults(run=_cmd_soak)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multilayer", description="Channel layers for Django Channels on any broker."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    backends = commands.add_parser("backends", help="list installed URL schemes")
    backends.set_defaults(run=_cmd_backends)
    check = commands.add_parser("check", help="run the conformance suite against a URL")
    check.add_argument("url", nargs="?", help=f"layer URL (default ${ENV_URL} or {DEFAULT_URL})")
    check.add_argument("--json", metavar="FILE", help="write the results as JSON")
    check.add_argument(
        "--record", action="store_true", help="write conformance_runs/<scheme>.json and the matrix"
    )
    check.add_argument("--record-dir", default="conformance_runs", help=argparse.SUPPRESS)
    check.add_argument("-k", dest="keyword", help="only tests matching this pytest expression")
    check.add_argument(
        "--restart-command",
        metavar="COMMAND",
        help="shell command that restarts the broker empty (for the restart test)",
    )
    check.add_argument("-v", "--verbose", action="store_true")
    check.set_defaults(run=_cmd_check)
    url_help = f"layer URL (default ${ENV_URL} or {DEFAULT_URL})"
    stats = commands.add_parser("stats", help="queue depths and group sizes under a prefix")
    stats.add_argument("url", nargs="?", help=url_help)
    stats.add_argument("--prefix", help="layer prefix (default: the URL's, else asgi)")
    output = stats.add_mutually_exclusive_group()
    output.add_argument(
        "--watch",
        nargs="?",
        type=_positive_float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    output.add_argument(
        "--prometheus",
        action="store_true",
        help="print once in Prometheus' text format (for a node-exporter textfile)",
    )
    stats.add_argument(
        "--timeout", type=_positive_float, default=10.0, help="seconds to wait for the broker"
    )
    stats.set_defaults(run=_cmd_stats)
    ping = commands.add_parser("ping", help="connect and time send + receive round trips")
    ping.add_argument("url", nargs="?", help=url_help)
    ping.add_argument("--prefix", help="layer prefix (default: the URL's, else asgi)")
    ping.add_argument("-n", "--count", type=_positive_int, default=10, help="round trips")
    ping.add_argument(
        "--timeout", type=_positive_float, default=10.0, help="seconds to wait for the broker"
    )
    ping.set_defaults(run=_cmd_ping)
    bench = commands.add_parser("bench", help="benchmark against peers on the same broker")
    bench.add_argument("url")
    bench.add_argument("--vs", action="append", default=[], metavar="PEER", help="peer to compare")
    bench.add_argument("-n", type=int, default=2000, help="messages per scenario run")
    bench.add_argument("--repeat", type=int, default=3, help="repetitions (medians reported)")
    bench.add_argument(
        "--scenarios", default="abcd", help="subset of a, b, c, d, r (r: the chat room)"
    )
    room = bench.add_argument_group("chat room (r)")
    room.add_argument("--servers", type=_positive_int, default=2, help="daphne processes")
    room.add_argument("--clients", type=_positive_int, default=200, help="WebSocket clients")
    room.add_argument("--rounds", type=_positive_int, default=50, help="fan-out latency rounds")
    room.add_argument("--burst", type=_positive_int, default=100, help="messages in the burst")
    bench.add_argument(
        "--plot", metavar="FILE.png", help="also draw ours against each peer as a chart"
    )
    bench.set_defaults(run=_cmd_bench)
    _add_soak(commands)
    # Listed for --help only: main() hands "hub ..." to the plugin's own parser untouched.
    from .plugins import command_names

    for name in command_names():
        commands.add_parser(name, help=f"a plugin's command (multilayer {name} --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``multilayer`` console script."""
    from .plugins import command_names, load_command

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in command_names():
        try:
            command = load_command(argv[0])
        except MultilayerError as error:
            print(f"multilayer: {error}", file=sys.stderr)
            return 2
        return command(argv[1:])
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except _Unreachable as error:
        print(f"multilayer: {error}", file=sys.stderr)
        return 1
    except MultilayerError as error:
        print(f"multilayer: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
