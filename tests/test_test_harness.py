"""The test run's own settings (tests/conftest.py), checked where they take effect."""

from __future__ import annotations

import httpx

from tests.conftest import TEST_HTTP_TIMEOUT, TEST_TLS_CONTEXT


def test_an_http_call_without_its_own_timeout_waits_for_a_busy_machine():
    assert TEST_HTTP_TIMEOUT.read >= 60
    with httpx.Client() as client:
        assert client.timeout == TEST_HTTP_TIMEOUT
    # a call given its own timeout keeps it (the timeout tests rely on that)
    with httpx.Client(timeout=0.3) as client:
        assert client.timeout.read == 0.3
    for function in (httpx.get, httpx.post, httpx.stream.__wrapped__):
        assert function.__kwdefaults__["timeout"] is TEST_HTTP_TIMEOUT


def test_http_clients_share_one_tls_context_unless_given_their_own():
    """A client without a `verify` of its own reuses the run's context instead of building one
    (pool internals: httpx 0.28 keeps the context on the connection pool)."""
    def context_of(client):
        return client._transport._pool._ssl_context

    with httpx.Client() as first, httpx.Client() as second:
        assert context_of(first) is TEST_TLS_CONTEXT and context_of(second) is TEST_TLS_CONTEXT
    with httpx.HTTPTransport(local_address="127.0.0.1") as transport:
        assert transport._pool._ssl_context is TEST_TLS_CONTEXT
    with httpx.Client(verify=False) as unverified:  # the TLS tests pass their own
        assert context_of(unverified) is not TEST_TLS_CONTEXT
    assert TEST_TLS_CONTEXT.verify_mode.name == "CERT_REQUIRED"
