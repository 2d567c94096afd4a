"""Settings shared by every test module under tests/."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def collect_garbage_after_each_test() -> Iterator[None]:
    """Collect reference cycles before the next test starts.

    An unclosed socket or transport left in a cycle is only reported (as an unraisable
    ResourceWarning, an error here) when a full collection happens to run, which without
    this is in some later, unrelated test. Collecting here reports it against the test
    that leaked it.
    """
    yield
    gc.collect()
