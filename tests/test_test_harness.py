"""The test run's own settings (tests/conftest.py), checked where they take effect."""

from __future__ import annotations

import os

import httpx
import pytest

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


def test_workers_share_one_zygote_and_a_closed_connection_takes_its_servers_along(tmp_path):
    """Every worker's connection reaches the same forking process; when one closes (its
    worker finished or died), the servers it started are killed, the others' are not."""
    import signal

    from tests.support import ForkedProcess, ServerForker, process_env

    this_worker = ServerForker.get()
    if this_worker is None:
        pytest.skip("servers are fresh interpreters here (THAI_TEST_FORK_SERVERS=0)")
    other_worker = ServerForker()  # a second connection, as another worker's
    argv = ["0", "--bind", "127.0.0.1"]  # a process that runs until it is stopped
    kept = this_worker.start(process_env(), argv, tmp_path / "kept.log", module="http.server")
    taken = other_worker.start(process_env(), argv, tmp_path / "taken.log", module="http.server")

    def parent(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    try:
        assert parent(kept.pid) == parent(taken.pid) != os.getpid()
        other_worker.close()
        # the other connection is closed: ask through this one
        assert ForkedProcess(this_worker, taken.pid).wait(30) == -signal.SIGKILL
        assert kept.poll() is None
    finally:
        kept.kill()
        kept.wait(30)
        other_worker.close()
