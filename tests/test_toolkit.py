"""The backend toolkit: waking across threads, process-wide state, bounded waits, TLS options
and contexts."""

from __future__ import annotations

import asyncio
import gc
import ssl
import threading

import pytest

from multilayer.exceptions import ConfigurationError
from multilayer.options import Option, resolve_options
from multilayer.toolkit import (
    ProcessWide,
    Waiters,
    check_tls,
    tls_context,
    tls_options,
    wake,
    within,
)


def test_wake_from_another_thread_resolves_the_future() -> None:
    asyncio.run(asyncio.wait_for(_wake_from_another_thread_resolves_the_future(), 5))


async def _wake_from_another_thread_resolves_the_future() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    thread = threading.Thread(target=wake, args=(future,))
    thread.start()
    await asyncio.wait_for(future, 2)
    thread.join(2)


def test_wake_in_its_own_loop_sets_at_once_and_twice_is_harmless() -> None:
    asyncio.run(asyncio.wait_for(_wake_in_its_own_loop_sets_at_once_and_twice_is_harmless(), 5))


async def _wake_in_its_own_loop_sets_at_once_and_twice_is_harmless() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    wake(future)
    assert future.done()
    wake(future)


def test_wake_of_a_closed_loop_is_dropped_without_error() -> None:
    loop = asyncio.new_event_loop()
    future: asyncio.Future[None] = loop.create_future()
    loop.close()
    wake(future)  # from a thread whose loop is not the future's
    assert not future.done()


def test_waiters_wake_by_key_and_forget_discarded_futures() -> None:
    asyncio.run(asyncio.wait_for(_waiters_wake_by_key_and_forget_discarded_futures(), 5))


async def _waiters_wake_by_key_and_forget_discarded_futures() -> None:
    waiters = Waiters()
    first, second = waiters.add("a"), waiters.add("a")
    other = waiters.add("b")
    waiters.discard("b", other)
    assert "b" not in waiters
    assert waiters.wake_one("a")
    assert first.done() and not second.done()
    waiters.wake("a")
    assert second.done() and "a" not in waiters
    assert not waiters.wake_one("a")


def test_process_wide_keeps_state_while_a_user_holds_it() -> None:
    shared: ProcessWide[list[int]] = ProcessWide()
    one, two = object(), object()
    state = shared.use(("broker", "q"), one, list)
    assert shared.use(("broker", "q"), two, list) is state
    assert shared.users(("broker", "q")) == 2
    assert shared.under(("broker",)) == [state]
    assert shared.release(one) == []
    assert shared.get(("broker", "q")) is state
    assert shared.release(two) == [state]
    assert len(shared) == 0 and shared.get(("broker", "q")) is None


def test_process_wide_with_keep_outlives_its_users() -> None:
    shared: ProcessWide[dict[str, int]] = ProcessWide(keep=True)
    user = object()
    state = shared.use("store", user, dict)
    assert shared.release(user) == []
    assert shared.use("store", object(), dict) is state
    # Users are not counted, so a process making backends all its life keeps no trace.
    assert shared.users("store") == 0


class _Layer:
    """Stands for a layer: something weakly referable that outlives its backends."""


def test_process_wide_state_used_while_an_owner_lives_goes_when_the_last_is_collected() -> None:
    shared: ProcessWide[list[int]] = ProcessWide()
    first, second, backend = _Layer(), _Layer(), object()
    state = shared.use_while(("broker", "inbox"), first, list)
    assert shared.use_while(("broker", "inbox"), second, list) is state
    # Backends come and go (one per event loop); the owners keep the state.
    assert shared.use(("broker", "inbox"), backend, list) is state
    assert shared.release(backend) == []
    del first
    gc.collect()
    assert shared.get(("broker", "inbox")) is state
    del second
    gc.collect()
    assert shared.get(("broker", "inbox")) is None and len(shared) == 0
    # An owner made now, perhaps at a collected one's address, is an owner of its own.
    third = _Layer()
    assert shared.use_while(("broker", "inbox"), third, list) == []
    assert shared.users(("broker", "inbox")) == 1


SPECS = tls_options("rediss", aliases={"ssl_ca_certs": "ssl_cafile", "ssl_cert_reqs": "ssl_verify"})


def resolve(query: dict[str, str], scheme: str = "rediss", **given: object) -> dict[str, object]:
    return resolve_options(SPECS, query, given, where="rediss://h", scheme=scheme)


def test_within_never_loses_a_cancellation_arriving_with_the_result() -> None:
    """The answer and the cancel in one turn of the loop: the caller is cancelled (before
    Python 3.12, asyncio.wait_for returns the answer and the cancel is lost)."""

    async def body() -> None:
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(within(answer, 10))
        await asyncio.sleep(0)
        answer.set_result(1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(asyncio.wait_for(body(), 5))


def test_within_returns_raises_and_times_out_as_wait_for() -> None:
    async def fails() -> None:
        raise ValueError("inner")

    async def body() -> None:
        assert await within(asyncio.sleep(0, "done"), 1) == "done"
        assert await within(asyncio.sleep(0, "unbounded"), None) == "unbounded"
        with pytest.raises(ValueError, match="inner"):
            await within(fails(), 1)
        slow = asyncio.ensure_future(asyncio.sleep(10))
        with pytest.raises(asyncio.TimeoutError):
            await within(slow, 0.05)
        assert slow.cancelled(), "a timed-out awaitable is cancelled"

    asyncio.run(asyncio.wait_for(body(), 5))


def test_tls_aliases_set_the_shared_option_and_never_reach_the_backend() -> None:
    values = resolve({"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "none"})
    assert values["ssl_cafile"] == "/ca.pem" and values["ssl_verify"] is False
    assert "ssl_ca_certs" not in values and "ssl_cert_reqs" not in values
    assert resolve({"ssl_cert_reqs": "optional"})["ssl_verify"] is True


def test_an_option_and_its_alias_together_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="'ssl_cafile' and 'ssl_ca_certs'"):
        resolve({"ssl_cafile": "/a.pem", "ssl_ca_certs": "/b.pem"})


def test_a_keyword_overrides_the_url_even_through_an_alias() -> None:
    assert resolve({"ssl_ca_certs": "/url.pem"}, ssl_cafile="/kw.pem")["ssl_cafile"] == "/kw.pem"


def test_options_of_other_schemes_are_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match=r"'ssl_ca_certs' applies only to rediss://"):
        resolve({"ssl_ca_certs": "/ca.pem"}, scheme="redis")
    assert resolve({"ssl_verify": "true"}, scheme="redis")["ssl_verify"] is True  # the default


def test_scheme_bound_options_are_data_on_any_option() -> None:
    specs = {"service": Option(str, "mymaster", "master", schemes=("redis+sentinel",))}
    with pytest.raises(ConfigurationError, match="applies only to redis\\+sentinel://"):
        resolve_options(specs, {"service": "other"}, {}, where="redis://h", scheme="redis")


def test_tls_context_follows_the_options() -> None:
    strict = tls_context({})
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    loose = tls_context({"ssl_verify": False})
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    assert not tls_context({"ssl_check_hostname": False}).check_hostname
    with pytest.raises(ConfigurationError, match="ssl_keyfile needs ssl_certfile"):
        check_tls("amqps://h", {"ssl_keyfile": "/k.pem"})
