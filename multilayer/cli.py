"""The ``multilayer`` command: backends, check, bench, soak and hub."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .exceptions import MultilayerError
from .layer import DEFAULT_URL, ENV_URL, ChannelLayer
from .url import LayerURL

__all__ = ["main"]


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
    ]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        pytest_args += ["-p", "multilayer.conformance.plugin"]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
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
            from .records import write_record

            if summary["failed"] or code not in (0,):
                print("not recording: the run did not pass", file=sys.stderr)
                return 1
            print(f"recorded {write_record(Path(args.record_dir), record)}")
    return 0 if code == 0 and not summary["failed"] else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import LayerContender, NotApplicable, format_report, load_contender, run_bench

    url = args.url
    capacity = max(args.n * 2, 1000)
    ChannelLayer(url)
    contenders: list[Any] = [
        LayerContender("multilayer", lambda: ChannelLayer(url, capacity=capacity))
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
            contenders, n=args.n, repeat=args.repeat, scenarios=args.scenarios, progress=progress
        )
    )
    print(
        f"multilayer bench {LayerURL.parse(url).sanitized()}  n={args.n}  medians of {args.repeat}"
    )
    print(format_report(results, [c.name for c in contenders]))
    return 0


def _cmd_soak(args: argparse.Namespace) -> int:
    from .bench.soak import format_soak, soak

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
    check.add_argument("-v", "--verbose", action="store_true")
    check.set_defaults(run=_cmd_check)
    bench = commands.add_parser("bench", help="benchmark against peers on the same broker")
    bench.add_argument("url")
    bench.add_argument("--vs", action="append", default=[], metavar="PEER", help="peer to compare")
    bench.add_argument("-n", type=int, default=2000, help="messages per scenario run")
    bench.add_argument("--repeat", type=int, default=3, help="repetitions (medians reported)")
    bench.add_argument("--scenarios", default="abcd", help="subset of a, b, c, d")
    bench.set_defaults(run=_cmd_bench)
    _add_soak(commands)
    # Listed for --help only: main() hands "hub ..." to the hub's own parser untouched.
    commands.add_parser("hub", help="run a ZeroMQ hub (multilayer hub --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``multilayer`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hub"]:
        from .backends.zmqhub import main as hub_main

        code: int = hub_main(argv[1:])
        return code
    args = _parser().parse_args(argv)
    try:
        code = args.run(args)
    except MultilayerError as error:
        print(f"multilayer: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
