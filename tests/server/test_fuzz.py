"""Schemathesis against the live server's OpenAPI schema: valid and invalid requests generated for
every operation; none may get a 5xx. Bounded: a few examples per operation and mode (~120 requests)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from shears.client.launch import ServerProcess

EXAMPLES = 5


def test_no_server_errors(idle_server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{idle_server.url}/openapi.json")
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            def call(case: schemathesis.Case) -> None:
                nonlocal calls
                response = case.call(base_url=idle_server.url, timeout=30)
                calls += 1
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: "
                        f"{response.text[:300]} (curl: {case.as_curl_command()})"
                    )

            try:
                call()
            except Unsatisfiable:  # nothing to make invalid (e.g. /healthz has no parameters)
                continue
    print(f"{calls} generated requests")
    assert calls >= 50
    assert failures == []
    assert "Traceback" not in idle_server.log_tail(100_000)
