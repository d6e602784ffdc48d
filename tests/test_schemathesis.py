"""Schemathesis against the app's own OpenAPI schema, on a real server with an API key.

Every operation gets generated requests, valid and invalid; each response must
not be a 5xx and must match the schema: documented status, content type,
headers and body. ``make test`` draws 10 cases per operation, ``make test-full`` 80; the
count is written to test-artifacts/schemathesis.json with the 5xx count.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.support import ARTIFACTS, start_server

KEY = "schemathesis-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
# positive_data_acceptance is left out on purpose: limits that depend on the
# server's settings (max_tokens, context length) refuse some schema-valid bodies.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          unsupported_method, ignored_auth]
EXAMPLES_PER_OPERATION = 10
EXAMPLES_PER_OPERATION_FULL = 80


@pytest.fixture(scope="module")
def keyed_api(model_env, tmp_path_factory):
    # Short generations keep the run bounded: max_tokens above 16 is a documented 400.
    env = {**model_env, "THAI_API_KEYS": KEY, "THAI_ENABLE_UI": "false",
           "THAI_MAX_TOKENS_LIMIT": "16", "THAI_ACCESS_LOG": "false",
           # ignored_auth probes a wrong key after each success: the wrong-key limit (tested in
           # test_attack_api) would soon answer the valid cases 429.
           "THAI_AUTH_FAILURES_PER_MINUTE": "0",
           # a text one character over its maxLength (1,000,000), \u-escaped, is 6-12 MB: the
           # body limit would answer 413, which the negative-data check does not expect
           "THAI_MAX_REQUEST_BYTES": str(16 * 1024 * 1024)}
    server = start_server(env, tmp_path_factory.mktemp("schemathesis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(keyed_api):
    return schemathesis.openapi.from_url(keyed_api.url + "/openapi.json", headers=AUTH)


@pytest.fixture(scope="module")
def tally() -> Counter:
    return Counter()


schema = schemathesis.pytest.from_fixture("api_schema")


def check_case(case, keyed_api, tally: Counter) -> None:
    response = case.call(base_url=keyed_api.url, headers=AUTH, timeout=60)
    tally["cases"] += 1
    tally["5xx"] += response.status_code >= 500
    tally[f"status_{response.status_code}"] += 1
    case.validate_response(response, checks=CHECKS)


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case, keyed_api, tally):
    check_case(case, keyed_api, tally)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION_FULL, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema_at_length(case, keyed_api, tally):
    check_case(case, keyed_api, tally)


def report(tally: Counter, keyed_api, per_operation: int) -> None:
    """Records the figures of the generated cases that ran before (``per_operation`` each),
    and checks none was a 5xx."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "schemathesis.json").write_text(json.dumps(dict(tally), indent=2, sort_keys=True))
    print(f"schemathesis: {tally['cases']} cases, {tally['5xx']} server errors: {dict(tally)}")
    assert tally["cases"] >= 5 * per_operation // 2, tally
    assert tally["5xx"] == 0, keyed_api.log()[-5000:]


def test_report_cases_and_server_errors(tally, keyed_api):
    report(tally, keyed_api, EXAMPLES_PER_OPERATION)


@pytest.mark.slow
def test_report_cases_and_server_errors_at_length(tally, keyed_api):
    report(tally, keyed_api, EXAMPLES_PER_OPERATION_FULL)
