"""The chat example (examples/chat) the way it is deployed: separate OS processes on a broker.

Per ``--multilayer-url`` of a networked backend, one module-wide set of processes: two
daphne servers on free loopback ports and one ``runworker chat-announce``, all on the
same layer URL with a fresh prefix. Real WebSocket clients (``websockets``) connect to
both servers. Every test uses its own room, so the tests share the processes safely.

The browser test drives the chat page in headless Chromium, one tab per daphne server,
over Redis; it leaves screenshots in ``test-artifacts/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from multilayer import ChannelLayer, LayerURL
from multilayer.plugins import load_backend
from tests.support.brokers import free_port, require_binary, require_module

websockets_client = require_module("websockets.asyncio.client")

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
#: Bound of every single wait for a message, and of each test's whole body.
EVENT_TIMEOUT = 20.0
TEST_TIMEOUT = 60.0
START_TIMEOUT = 30.0
#: Bounds of a chat's teardown: its processes' exit after SIGTERM, then after SIGKILL,
#: and the flush of its prefix.
STOP_TIMEOUT = 10.0
KILL_TIMEOUT = 10.0
FLUSH_TIMEOUT = 20.0


def with_prefix(url: str, prefix: str) -> str:
    """``url`` with the layer option ``prefix`` added to its query."""
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


class Service:
    """One process of the chat example, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def failure(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.name} {what}; its log:\n{self.log.read_text()[-3000:]}")

    def wait_listening(self, port: int, deadline: float) -> None:
        """Wait until the process accepts connections on ``port``, or raise with its log."""
        while True:
            if self.process.poll() is not None:
                raise self.failure(f"exited with {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            if time.monotonic() > deadline:
                raise self.failure(f"did not listen on 127.0.0.1:{port}")
            time.sleep(0.05)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def reap(self, deadline: float) -> None:
        """Wait until ``deadline`` for the process to exit after ``terminate()``, then
        kill it; return once it is gone."""
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(KILL_TIMEOUT)

    def stop(self) -> None:
        self.terminate()
        self.reap(time.monotonic() + STOP_TIMEOUT)


class Chat:
    """Two daphne servers (``a``, ``b``) and optionally one worker on one layer URL."""

    def __init__(self, url: str, logs: Path, *, worker: bool) -> None:
        self.prefix = "chat" + secrets.token_hex(4)
        self.url = with_prefix(url, self.prefix)
        env = {
            **os.environ,
            "MULTILAYER_URL": self.url,
            "DJANGO_SETTINGS_MODULE": "examples.chat.settings",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.services: list[Service] = []
        self.ports: dict[str, int] = {}
        try:
            for name in ("a", "b"):
                port = self.ports[name] = free_port()
                argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
                argv.append("examples.chat.asgi:application")
                self.services.append(Service(f"daphne {name}", argv, env, logs / f"{name}.log"))
            self.worker: Service | None = None
            if worker:
                argv = [sys.executable, "-m", "django", "runworker", "chat-announce"]
                self.worker = Service("runworker", argv, env, logs / "worker.log")
                self.services.append(self.worker)
            deadline = time.monotonic() + START_TIMEOUT
            for service, port in zip(self.services[:2], self.ports.values(), strict=True):
                service.wait_listening(port, deadline)
        except BaseException:
            self.stop()
            raise

    def pid(self, server: str) -> int:
        return self.services["ab".index(server)].pid

    def http(self, server: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[server]}{path}"

    def ws(self, server: str, room: str, user: str) -> Any:
        """A websockets client connection to ``room`` on ``server`` (an async context)."""
        address = f"ws://127.0.0.1:{self.ports[server]}/ws/chat/{room}/?user={user}"
        return websockets_client.connect(address, open_timeout=EVENT_TIMEOUT)

    def check_alive(self) -> None:
        for service in self.services:
            if service.process.poll() is not None:
                raise service.failure(f"exited with {service.process.returncode}")

    def stop(self) -> None:
        # Signalled together and waited for against one deadline: each daphne takes
        # seconds to shut down on a loaded machine, and one after the other they added up.
        for service in self.services:
            service.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for service in self.services:
            service.reap(deadline)

        async def flush() -> None:
            layer = ChannelLayer(self.url)
            try:
                await asyncio.wait_for(layer.flush(), FLUSH_TIMEOUT)
            except asyncio.TimeoutError:
                raise AssertionError(
                    f"flushing {layer.url.sanitized()} took over {FLUSH_TIMEOUT}s"
                ) from None
            finally:
                await asyncio.wait_for(layer.close(), 10)

        asyncio.run(flush())


def run(body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body()`` in a new event loop, bounded by TEST_TIMEOUT."""

    async def bounded() -> T:
        return await asyncio.wait_for(body(), TEST_TIMEOUT)

    return asyncio.run(bounded())


async def next_event(ws: Any, **expected: Any) -> dict[str, Any]:
    """The next event on ``ws`` whose fields include ``expected``; others are skipped."""

    async def find() -> dict[str, Any]:
        while True:
            event: dict[str, Any] = json.loads(await ws.recv())
            if expected.items() <= event.items():
                return event

    try:
        return await asyncio.wait_for(find(), EVENT_TIMEOUT)
    except asyncio.TimeoutError:
        raise AssertionError(f"no event with {expected} within {EVENT_TIMEOUT}s") from None


def room() -> str:
    return "room-" + secrets.token_hex(4)


def post(url: str, fields: dict[str, str]) -> tuple[int, str]:
    """POST a form to ``url``; the status and body, also for HTTP errors."""
    data = urllib.parse.urlencode(fields).encode()
    try:
        with urllib.request.urlopen(url, data=data, timeout=EVENT_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def chat(layer_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chat]:
    scheme = LayerURL.parse(layer_url).scheme
    if not load_backend(scheme).capabilities.multiprocess:
        pytest.skip(
            f"{scheme}: capabilities.multiprocess is false (one process only; "
            "tests/test_django.py runs the chat in one process)"
        )
    cluster = Chat(layer_url, tmp_path_factory.mktemp(f"chat-{scheme}"), worker=True)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_messages_cross_processes_both_ways(chat: Chat) -> None:
    here = room()

    async def body() -> None:
        async with chat.ws("a", here, "alice") as alice, chat.ws("b", here, "bob") as bob:
            await alice.send(json.dumps({"text": "hello from a"}))
            got = await next_event(bob, kind="message", text="hello from a")
            assert got == {
                "kind": "message",
                "user": "alice",
                "text": "hello from a",
                "process": chat.pid("a"),
            }
            await next_event(alice, kind="message", text="hello from a")

            await bob.send(json.dumps({"text": "hello from b"}))
            got = await next_event(alice, kind="message", text="hello from b")
            assert (got["user"], got["process"]) == ("bob", chat.pid("b"))
            await next_event(bob, kind="message", text="hello from b")

    run(body)
    chat.check_alive()


def scrape(url: str, prefix: str) -> dict[str, float]:
    """The samples of the layer prefix ``prefix`` at ``url``, a server's /metrics."""
    parser = require_module("prometheus_client.parser")
    with urllib.request.urlopen(url, timeout=EVENT_TIMEOUT) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("prefix") == prefix
    }


def test_each_server_counts_its_part_at_metrics(chat: Chat) -> None:
    here = room()
    before = {server: scrape(chat.http(server, "/metrics"), chat.prefix) for server in "ab"}

    async def body() -> None:
        async with chat.ws("a", here, "alice") as alice, chat.ws("b", here, "bob") as bob:
            await alice.send(json.dumps({"text": "counted"}))
            await next_event(bob, kind="message", text="counted")

    run(body)
    after = {server: scrape(chat.http(server, "/metrics"), chat.prefix) for server in "ab"}

    def moved(server: str, name: str) -> float:
        return after[server][name] - before[server].get(name, 0)

    assert moved("a", "multilayer_group_sends_total") >= 1
    assert moved("b", "multilayer_messages_received_total") >= 1


async def group_members(url: str, group: str) -> int | None:
    """How many live members the broker counts in ``group``; None where it cannot tell."""
    layer = ChannelLayer(url)
    try:
        stats = await layer.stats()
    finally:
        await layer.close()
    return None if stats.groups is None else stats.groups.get(group, 0)


def test_disconnect_leaves_the_group(chat: Chat) -> None:
    here = room()
    group = f"chat-{here}"

    async def body() -> None:
        async with chat.ws("a", here, "alice") as alice, chat.ws("b", here, "carol") as carol:
            async with chat.ws("b", here, "bob") as bob:
                await bob.send(json.dumps({"text": "bye"}))
                await next_event(alice, text="bye")
                await next_event(carol, text="bye")
                before = await group_members(chat.url, group)
                assert before in (None, 3), f"{group} has {before} members, not 3"
            # The server sends "left" only after its group_discard returned.
            left = await next_event(alice, kind="left")
            assert (left["user"], left["process"]) == ("bob", chat.pid("b"))
            await next_event(carol, kind="left", user="bob")
            # Where the broker counts members, bob's channel is gone from the group (a
            # consumer that never discarded would still be counted until group_expiry).
            after = await group_members(chat.url, group)
            assert after in (None, 2), f"{group} has {after} members after bob left, not 2"

            await alice.send(json.dumps({"text": "still here?"}))
            await next_event(carol, text="still here?", process=chat.pid("a"))
            await next_event(alice, text="still here?")

            # Rejoining gives a new channel that receives each message once.
            async with chat.ws("b", here, "bob") as bob:
                await alice.send(json.dumps({"text": "welcome back"}))
                await next_event(bob, text="welcome back")
                await alice.send(json.dumps({"text": "marker"}))
                event = await next_event(bob, kind="message")
                assert event["text"] == "marker", f"bob got a second copy: {event}"

    run(body)


def test_view_sends_to_the_worker_which_posts_to_the_room(chat: Chat) -> None:
    assert chat.worker is not None
    here = room()

    async def body() -> None:
        async with chat.ws("a", here, "alice") as alice, chat.ws("b", here, "bob") as bob:
            for server in ("a", "b"):
                text = f"announced through {server}"
                status, reply = await asyncio.to_thread(
                    post, chat.http(server, f"/rooms/{here}/announce"), {"text": text}
                )
                assert status == 202, reply
                for ws in (alice, bob):
                    event = await next_event(ws, kind="announcement", text=text)
                    assert (event["user"], event["process"]) == ("announcer", chat.worker.pid)

    run(body)
    chat.check_alive()


def test_bad_input_gets_a_clear_error_and_the_room_goes_on(chat: Chat) -> None:
    here = room()

    async def body() -> None:
        status, reply = await asyncio.to_thread(post, chat.http("a", f"/rooms/{here}/announce"), {})
        assert status == 400 and "'text'" in reply, reply
        async with chat.ws("a", here, "alice") as alice, chat.ws("b", here, "bob") as bob:
            await alice.send(json.dumps({"no": "text"}))
            error = await next_event(alice, kind="error")
            assert "text" in error["error"]
            await alice.send(json.dumps({"text": "after the error"}))
            await next_event(bob, text="after the error")

    run(body)


def test_one_command_runs_the_example_on_memory(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MULTILAYER_URL", None)
    argv = [sys.executable, "-m", "examples.chat", "--port", str(port)]
    service = Service("python -m examples.chat", argv, env, tmp_path / "chat.log")
    try:
        service.wait_listening(port, time.monotonic() + START_TIMEOUT)
        address = f"ws://127.0.0.1:{port}/ws/chat/lobby/?user=solo"
        announce = f"http://127.0.0.1:{port}/rooms/lobby/announce"

        async def body() -> None:
            async with websockets_client.connect(address, open_timeout=EVENT_TIMEOUT) as ws:
                await ws.send(json.dumps({"text": "anyone?"}))
                await next_event(ws, kind="message", text="anyone?", process=service.pid)
                status, reply = await asyncio.to_thread(post, announce, {"text": "in-process"})
                assert status == 202, reply
                # memory:// is one process: the worker runs inside the server.
                await next_event(ws, kind="announcement", text="in-process", process=service.pid)

        run(body)
        assert "memory://" in service.log.read_text()
    finally:
        service.stop()


# -- the browser ------------------------------------------------------------------------

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def redis_chat(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chat]:
    urls: list[str] = request.config.getoption("--multilayer-url") or []
    redis = [url for url in urls if LayerURL.parse(url).scheme == "redis"]
    if not redis:
        pytest.skip("the browser test runs over Redis: give --multilayer-url redis://...")
    cluster = Chat(redis[0], tmp_path_factory.mktemp("chat-browser"), worker=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_browser_tabs_on_two_servers_chat(
    redis_chat: Chat, capsys: pytest.CaptureFixture[str]
) -> None:
    sync_api = require_module("playwright.sync_api")
    executable = require_binary("chromium")  # Debian's: /usr/bin/chromium
    here = room()
    ARTIFACTS.mkdir(exist_ok=True)
    shots = [ARTIFACTS / f"browser-chat-{server}.png" for server in ("a", "b")]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=EVENT_TIMEOUT * 1000
        )
        try:
            context = browser.new_context()
            context.set_default_timeout(EVENT_TIMEOUT * 1000)
            tabs = {}
            for server, user in (("a", "alice"), ("b", "bob")):
                tab = tabs[server] = context.new_page()
                tab.goto(redis_chat.http(server, f"/rooms/{here}/?user={user}"))
                sync_api.expect(tab.locator("#status")).to_have_text("connected")

            tabs["a"].fill("#text", "typed in tab a")
            tabs["a"].press("#text", "Enter")
            line = tabs["b"].locator("#log li", has_text="typed in tab a")
            sync_api.expect(line).to_contain_text("alice: typed in tab a")
            sync_api.expect(line).to_contain_text(f"process {redis_chat.pid('a')}")

            tabs["b"].fill("#text", "typed in tab b")
            tabs["b"].click("button")
            line = tabs["a"].locator("#log li", has_text="typed in tab b")
            sync_api.expect(line).to_contain_text(f"process {redis_chat.pid('b')}")
            for tab, shot in zip(tabs.values(), shots, strict=True):
                tab.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert all(shot.stat().st_size > 0 for shot in shots)
    with capsys.disabled():  # shown even when the test passes
        print(f"\nbrowser test screenshots: {', '.join(map(str, shots))}")
