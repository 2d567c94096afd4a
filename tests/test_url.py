"""Layer URL parsing, as a table of named cases."""

from __future__ import annotations

import pytest

from multilayer import ConfigurationError, LayerURL

CASES = {
    "bare scheme": ("memory://", "memory", (), None, None, "", {}),
    "named store": ("memory://chat", "memory", (("chat", None),), None, None, "", {}),
    "host port db": (
        "redis://localhost:6379/0",
        "redis",
        (("localhost", 6379),),
        None,
        None,
        "0",
        {},
    ),
    "credentials quoted": (
        "amqp://us%40er:p%3Ass%2Fw@rabbit:5672/%2F",
        "amqp",
        (("rabbit", 5672),),
        "us@er",
        "p:ss/w",
        "/",
        {},
    ),
    "password only": ("redis://:secret@h/1", "redis", (("h", None),), None, "secret", "1", {}),
    "ipv6": ("redis://[::1]:6380/2", "redis", (("::1", 6380),), None, None, "2", {}),
    "several hosts": (
        "redis://h1:6379,h2:6380,[::1]:6381/0",
        "redis",
        (("h1", 6379), ("h2", 6380), ("::1", 6381)),
        None,
        None,
        "0",
        {},
    ),
    "variant scheme": (
        "redis+sentinel://s1:26379,s2:26379/mymaster",
        "redis+sentinel",
        (("s1", 26379), ("s2", 26379)),
        None,
        None,
        "mymaster",
        {},
    ),
    "query options": (
        "redis://h/0?prefix=chat&capacity=500&expiry=30",
        "redis",
        (("h", None),),
        None,
        None,
        "0",
        {"prefix": "chat", "capacity": "500", "expiry": "30"},
    ),
    "ipc path": ("zmq+ipc:///tmp/hub.sock", "zmq+ipc", (), None, None, "tmp/hub.sock", {}),
    "upper-case scheme": ("KAFKA://broker:9092", "kafka", (("broker", 9092),), None, None, "", {}),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_parse(case: str) -> None:
    text, scheme, hosts, user, password, path, query = CASES[case]
    url = LayerURL.parse(text)
    assert (url.scheme, url.hosts, url.username, url.password, url.path, dict(url.query)) == (
        scheme,
        hosts,
        user,
        password,
        path,
        query,
    )


def test_render_round_trips() -> None:
    for text, *_ in CASES.values():
        url = LayerURL.parse(text)
        assert LayerURL.parse(url.render()) == url


def test_password_never_shown() -> None:
    url = LayerURL.parse("amqp://guest:hunter2@rabbit/vhost?heartbeat=10")
    for shown in (repr(url), str(url), url.sanitized()):
        assert "hunter2" not in shown
    assert url.sanitized() == "amqp://guest:***@rabbit/vhost?heartbeat=10"
    assert "hunter2" in url.render()


def test_secret_options_never_shown() -> None:
    url = LayerURL.parse("redis+sentinel://s1/0?sentinel_password=hunter2&service=m")
    assert url.sanitized() == "redis+sentinel://s1/0?sentinel_password=***&service=m"
    assert "hunter2" in url.render()


BAD = {
    "no scheme": ("localhost:6379", "has no scheme"),
    "bad port": ("redis://h:99999/0", "bad port for host 'h': it must be a number"),
    "port not a number": ("redis://h:abc/0", "bad port for host 'h'"),
    "bad port after credentials": ("redis://u:p@h:abc/0", "bad port 'abc' in layer URL"),
    "host with a space": ("redis://my host:6379/0", "bad host 'my host'"),
    "password with a slash": ("redis://:pa/ss@h/0", "percent-encode '/'"),
    "password with a hash": ("redis://:pa#ss@h/0", "percent-encode"),
    "password with a question mark": ("amqp://u:pa?ss@h/", "percent-encode"),
    "bad ipv6": ("redis://[::1/0", "bad IPv6 host"),
    "option twice": ("redis://h/0?capacity=1&capacity=2", "'capacity' appears twice"),
    "not a string": (b"redis://h", "must be a string"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_urls_are_named(case: str) -> None:
    text, message = BAD[case]
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[")):
        LayerURL.parse(text)  # type: ignore[arg-type]


def test_password_hidden_in_errors() -> None:
    with pytest.raises(ConfigurationError) as raised:
        LayerURL.parse("redis://user:hunter2@h:notaport/0")
    assert "hunter2" not in str(raised.value)
