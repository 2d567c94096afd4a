"""Run one test broker in the foreground: ``python -m tests.support.serve KIND``.

``scripts/broker.sh KIND`` runs this. It starts a broker of its own (one of
:data:`~tests.support.brokers.KINDS`) on free loopback ports, the way the tests and the
fault harness start theirs, prints its layer URL as the last line of standard output once
the broker answers, and stops it, with every process it started, on SIGTERM or SIGINT.
Its files and logs live in a temporary directory removed at exit. It never touches the
machine's shared brokers.

Exit status: 0 after a signal, 1 when the broker failed to start or died, 77 when a tool it
needs is not installed (the reason on standard error).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import pytest

from .brokers import KINDS, Broker

#: the exit status of a broker that cannot run here (automake's "skipped")
MISSING = 77


def _interrupt(number: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Serve the broker ``argv`` names until a signal; the exit status."""
    parser = argparse.ArgumentParser(
        prog="scripts/broker.sh",
        description="Run a test broker of its own on free loopback ports; print its layer URL.",
    )
    parser.add_argument("kind", choices=list(KINDS))
    kind: str = parser.parse_args(argv).kind
    # Both end it even while the broker is still starting. SIGINT is set too: a shell
    # starts background commands with it ignored, and Python then leaves it so.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    directory = Path(tempfile.mkdtemp(prefix=f"multilayer-{kind}-"))
    broker: Broker | None = None
    status = 1
    try:
        broker = KINDS[kind](directory)
        broker.start()
        print(broker.url, flush=True)
        while broker.running():
            time.sleep(0.2)
        print(f"{kind}: the broker exited; its files and logs: {directory}", file=sys.stderr)
    except KeyboardInterrupt:
        status = 0
    except pytest.skip.Exception as missing:
        print(f"{kind}: {missing.msg}", file=sys.stderr)
        status = MISSING
    except (pytest.fail.Exception, RuntimeError, OSError) as error:
        print(f"{kind}: {getattr(error, 'msg', error)}", file=sys.stderr)
        print(f"{kind}: its files and logs: {directory}", file=sys.stderr)
    finally:
        # A second signal must not cut the stopping short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if broker is not None:
            broker.stop()
    if status != 1:
        shutil.rmtree(directory, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
