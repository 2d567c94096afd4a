#!/usr/bin/env bash
# Run one test broker of its own on free loopback ports, in the foreground:
#   scripts/broker.sh KIND     (scripts/broker.sh --help lists the kinds)
# The last line of standard output is its layer URL, printed once the broker answers;
# SIGTERM or Ctrl-C stops it and every process it started. The tests, the fault harness
# and the test session start their brokers with the same code (tests/support/brokers.py).
# It never touches the machine's shared Redis or RabbitMQ. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m tests.support.serve "$@"
