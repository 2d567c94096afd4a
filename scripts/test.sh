#!/usr/bin/env bash
# Install what the tests need, start the brokers that are not already running, run the tests.
#
# BACKENDS picks the backends the conformance suite (and every test taking
# --multilayer-url) runs against, from: memory redis sentinel amqp kafka zmq (default: all
# but sentinel). Their URLs: REDIS_URL, SENTINEL_URL, AMQP_URL, KAFKA_URL, ZMQ_URL.
# Redis and RabbitMQ are reused when they answer on their usual loopback ports and started
# otherwise (only when their URL points there); KAFKA_URL='{kafka}',
# ZMQ_URL='zmq://{hub}' and SENTINEL_URL='{redis-sentinel}' (the defaults) make the test
# session start an Apache Kafka node (from its Maven jars, resolved once into the local
# Maven repository), a ZeroMQ hub, a Redis and its Sentinel of its own on free ports,
# with the code of scripts/broker.sh (any URL '{KIND}' starts a broker of that kind, see
# conftest.py). With CI=true a broker that cannot be started is a failure, never a skip.
# MULTILAYER_SKIP_INSTALL=1 skips the pip install (the Docker test image has everything).
# docker-compose.yml's test services run this same script.
# Extra arguments go to pytest (for example: BACKENDS=redis scripts/test.sh -k redis -x).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BACKENDS=${BACKENDS:-memory redis amqp kafka zmq}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/15}
SENTINEL_URL=${SENTINEL_URL:-\{redis-sentinel\}}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}
KAFKA_URL=${KAFKA_URL:-\{kafka\}}
ZMQ_URL=${ZMQ_URL:-zmq://\{hub\}}

urls=()
for backend in $BACKENDS; do
  case "$backend" in
    memory) urls+=(--multilayer-url memory://) ;;
    redis) urls+=(--multilayer-url "$REDIS_URL") ;;
    sentinel) urls+=(--multilayer-url "$SENTINEL_URL") ;;
    amqp) urls+=(--multilayer-url "$AMQP_URL") ;;
    kafka) urls+=(--multilayer-url "$KAFKA_URL") ;;
    zmq) urls+=(--multilayer-url "$ZMQ_URL") ;;
    *)
      echo "error: unknown backend '$backend' in BACKENDS (memory redis sentinel amqp kafka zmq)" >&2
      exit 2 ;;
  esac
done
selected() { [[ " $BACKENDS " == *" $1 "* ]]; }
# Whether a URL names the default local port of its broker (then this script may start it).
local_url() { [[ "$1" =~ ^[a-z]+://([^@/]*@)?(127\.0\.0\.1|localhost):$2(/|$|\?) ]]; }

if [ "${MULTILAYER_SKIP_INSTALL:-}" != 1 ]; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[all,test,bench]'
fi

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

if selected redis && local_url "$REDIS_URL" 6379 && ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_port 6379 30 Redis
fi
if selected amqp && local_url "$AMQP_URL" 5672 && ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  rabbitmq-server -detached
  wait_port 5672 120 RabbitMQ
fi

# The browser test drives Debian's chromium (never a downloaded one: CI has no such download).
# Without it that one test skips, or fails under CI=true; the rest still runs.
if [ "${MULTILAYER_SKIP_INSTALL:-}" != 1 ]; then
  command -v chromium >/dev/null || apt_install chromium || true
fi

exec "$PYTHON" -m pytest "${urls[@]}" "$@"
