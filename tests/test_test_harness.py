"""The test run's own settings (tests/conftest.py), checked where they take effect."""

from __future__ import annotations

import httpx

from tests.conftest import TEST_HTTP_TIMEOUT


def test_an_http_call_without_its_own_timeout_waits_for_a_busy_machine():
    assert TEST_HTTP_TIMEOUT.read >= 60
    with httpx.Client() as client:
        assert client.timeout == TEST_HTTP_TIMEOUT
    # a call given its own timeout keeps it (the timeout tests rely on that)
    with httpx.Client(timeout=0.3) as client:
        assert client.timeout.read == 0.3
    for function in (httpx.get, httpx.post, httpx.stream.__wrapped__):
        assert function.__kwdefaults__["timeout"] is TEST_HTTP_TIMEOUT
