"""multilayer.metrics: what a Prometheus scrape of the process and `stats --prometheus` show."""

from __future__ import annotations

import asyncio
import gc
import secrets
import time

import pytest

from multilayer import ChannelFull, ChannelLayer
from multilayer.cli import main
from tests.support.brokers import require_module

prometheus_client = require_module("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from multilayer import metrics  # noqa: E402


def scrape(text: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape of the default registry (or of ``text``), by name and labels."""
    if text is None:
        text = prometheus_client.generate_latest().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_counters_of_every_layer_summed_by_scheme_and_prefix() -> None:
    prefix = "metrics" + secrets.token_hex(3)

    async def traffic() -> None:
        sender = ChannelLayer("memory://metrics-sum", prefix=prefix, capacity=2)
        receiver = ChannelLayer("memory://metrics-sum", prefix=prefix)
        for number in range(2):
            await sender.send("metrics.q", {"n": number})
        with pytest.raises(ChannelFull):
            await sender.send("metrics.q", {"n": 3})
        await sender.group_send("metrics-room", {"n": 5})
        inbox = await receiver.new_channel()
        await sender.send(inbox, {"n": 6})
        await receiver.send(inbox, {"n": 7})
        await asyncio.wait_for(receiver.receive(inbox), 5)
        samples = scrape()
        labels = {"scheme": "memory", "prefix": prefix}
        assert sample(samples, "multilayer_messages_sent_total", **labels) == 4
        assert sample(samples, "multilayer_messages_dropped_full_total", **labels) == 1
        assert sample(samples, "multilayer_group_sends_total", **labels) == 1
        assert sample(samples, "multilayer_messages_received_total", **labels) == 1
        # One pop of the process inbox took both messages; one waits in this process.
        assert sample(samples, "multilayer_messages_buffered", **labels) == 1
        # One send in SEND_SAMPLE per layer is timed, its first included: one of each.
        assert sample(samples, "multilayer_send_duration_seconds_count", **labels) == 2
        assert sample(samples, "multilayer_send_duration_seconds_bucket", le="+Inf", **labels) == 2
        assert sample(samples, "multilayer_send_duration_seconds_sum", **labels) > 0
        await sender.close()
        await receiver.flush()
        await receiver.close()

    asyncio.run(asyncio.wait_for(traffic(), 30))


def test_a_collected_layer_leaves_its_counts_behind() -> None:
    prefix = "metrics" + secrets.token_hex(3)

    async def traffic() -> None:
        layer = ChannelLayer("memory://metrics-gone", prefix=prefix)
        await layer.send("metrics.q", {"n": 1})
        await layer.flush()
        await layer.close()

    asyncio.run(asyncio.wait_for(traffic(), 30))
    gc.collect()
    labels = {"scheme": "memory", "prefix": prefix}
    samples = scrape()
    assert sample(samples, "multilayer_messages_sent_total", **labels) == 1
    assert sample(samples, "multilayer_messages_buffered", **labels) == 0


def test_labels_never_carry_the_url() -> None:
    layer = ChannelLayer("redis://:hunter2@127.0.0.1:1/0", prefix="metrics-secret")
    text = prometheus_client.generate_latest().decode()
    assert 'prefix="metrics-secret",scheme="redis"' in text
    assert "hunter2" not in text and "127.0.0.1" not in text
    del layer


def test_broker_view_is_opt_in_and_cached() -> None:
    prefix = "metrics" + secrets.token_hex(3)
    url = "memory://metrics-watch"
    names = {"multilayer_queue_messages", "multilayer_group_members"}
    assert not any(name in names and ("prefix", prefix) in labels for name, labels in scrape())

    async def fill() -> None:
        layer = ChannelLayer(url, prefix=prefix)
        await layer.send("metrics.waiting", {"n": 1})
        await layer.send("metrics.waiting", {"n": 2})
        await layer.group_add("metrics-room", "metrics.waiting")

    asyncio.run(fill())
    # An hour between requests: after the first answer, scrapes can only show that one.
    watch = metrics.watch_broker(url, prefix=prefix, every=3600)
    try:
        deadline = time.monotonic() + 10
        while watch.last is None and time.monotonic() < deadline:
            time.sleep(0.05)
        labels = {"scheme": "memory", "prefix": prefix}
        asyncio.run(ChannelLayer(url, prefix=prefix).send("metrics.waiting", {"n": 3}))
        for samples in (scrape(), scrape()):
            waiting = sample(
                samples, "multilayer_queue_messages", queue="metrics.waiting", **labels
            )
            assert waiting == 2
            assert sample(samples, "multilayer_group_members", group="metrics-room", **labels) == 1
            assert sample(samples, "multilayer_broker_stats_timestamp_seconds", **labels) > 0
    finally:
        watch.stop()
    assert not watch._thread.is_alive()
    assert not any(name in names and ("prefix", prefix) in labels for name, labels in scrape())


def test_stats_command_prints_the_text_format(capsys: pytest.CaptureFixture[str]) -> None:
    prefix = "metrics" + secrets.token_hex(3)
    url = "memory://metrics-cli"

    async def fill() -> None:
        layer = ChannelLayer(url, prefix=prefix)
        await layer.send("metrics.cli", {"n": 1})
        await layer.group_add("metrics-cli-room", "metrics.cli")

    asyncio.run(fill())
    assert main(["stats", url, "--prefix", prefix, "--prometheus", "--timeout", "10"]) == 0
    samples = scrape(capsys.readouterr().out)
    labels = {"scheme": "memory", "prefix": prefix}
    assert sample(samples, "multilayer_queue_messages", queue="metrics.cli", **labels) == 1
    assert sample(samples, "multilayer_group_members", group="metrics-cli-room", **labels) == 1


def test_stats_command_notes_what_the_broker_cannot_tell() -> None:
    from multilayer import LayerStats

    stats = LayerStats(
        url="amqp://127.0.0.1/",
        prefix="p",
        queues=None,
        groups=None,
        unknown="amqp:// cannot report queue depths or group sizes",
        buffered={},
        sent=0,
        group_sent=0,
        received=0,
        expired=0,
        dropped_full=0,
        reconnects=0,
    )
    text = metrics.broker_text("amqp", stats)
    assert text.startswith("# amqp:// cannot report queue depths or group sizes\n")
    assert set(scrape(text)) == {
        (
            "multilayer_broker_stats_timestamp_seconds",
            frozenset({("scheme", "amqp"), ("prefix", "p")}),
        )
    }
