#!/usr/bin/env bash
# Install what the tests need, start the brokers that are not already running, run every test.
#
# Redis and RabbitMQ are reused when they answer on their usual loopback ports and started
# otherwise; Tansu (Kafka) and the ZeroMQ hub are started by the test session itself on free
# ports. With CI=true a broker that cannot be started is a failure, never a skip.
# Extra arguments go to pytest (for example: scripts/test.sh -k redis -x).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/15}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}

"$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[all,test,bench]'

port_open() { "$PYTHON" - "$1" <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

wait_port() {  # port, seconds, name
  for _ in $(seq "$2"); do port_open "$1" && return 0; sleep 1; done
  echo "error: $3 did not come up on 127.0.0.1:$1" >&2
  return 1
}

apt_install() {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "error: install $* (Debian/Ubuntu: apt-get install $*)" >&2
    return 1
  fi
}

if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_port 6379 30 Redis
fi
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  rabbitmq-server -detached
  wait_port 5672 120 RabbitMQ
fi

# The browser test drives Debian's chromium (never a downloaded one: CI has no such download).
# Without it that one test skips, or fails under CI=true; the rest still runs.
command -v chromium >/dev/null || apt_install chromium || true

exec "$PYTHON" -m pytest \
  --multilayer-url memory:// \
  --multilayer-url "$REDIS_URL" \
  --multilayer-url "$AMQP_URL" \
  --multilayer-url 'kafka://{tansu}' \
  --multilayer-url 'zmq://{hub}' \
  "$@"
