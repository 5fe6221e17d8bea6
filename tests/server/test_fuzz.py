"""Schemathesis against the live server's OpenAPI schema: valid and invalid requests generated for
every operation; none may get a 5xx, and the store stays readable. Bounded: a few examples per
operation and mode (~200 requests), plus job requests carrying lone UTF-16 surrogates, which
schemathesis never generates itself (it cannot send them as UTF-8; JSON escapes them: "\\ud800")."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from shears.client.launch import ServerProcess

EXAMPLES = 5
SURROGATE_EXAMPLES = 15
# Every optional text field set, so that a lone surrogate can hide in each.
ADMISSIBLE = {
    "model": "smollm2-135m",
    "revision": "main",
    "method": "wanda",
    "sparsity": 0.5,
    "calibration": {"source": "builtin", "text_column": "text"},
    "evaluation": {"enabled": False, "source": "hf:wikitext:wikitext-2-raw-v1:test"},
    "ignore": ["(^|\\.)lm_head$"],
    "overrides": {"mlp\\.down_proj": 0.3},
}


def _bounded(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every string in a JSON value; a path ending in ("key", k) names a dict key."""
    found: list[tuple[Any, ...]] = []
    if isinstance(value, str):
        found.append(path)
    elif isinstance(value, dict):
        for key, item in value.items():
            found.append((*path, ("key", key)))
            found += _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _leaves(item, (*path, index))
    return found


def _with_surrogate(value: Any, path: tuple[Any, ...], surrogate: str) -> Any:
    """A copy of `value` whose string (or key) at `path` has a lone surrogate put in the middle."""
    if not path:
        return value[: len(value) // 2] + surrogate + value[len(value) // 2 :]
    head, rest = path[0], path[1:]
    if isinstance(head, tuple):  # a key
        key = head[1]
        return {(_with_surrogate(k, (), surrogate) if k == key else k): v for k, v in value.items()}
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _with_surrogate(value[head], rest, surrogate)
    return copy


def _check_store_readable(url: str, failures: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        listing = http.get("/v1/jobs", params={"limit": 200})
        if listing.status_code != 200:
            failures.append(f"GET /v1/jobs -> {listing.status_code} after the run: {listing.text[:300]}")
            return
        for job in listing.json()["jobs"]:
            answer = http.get(f"/v1/jobs/{job['id']}")
            if answer.status_code != 200:
                failures.append(f"GET /v1/jobs/{job['id']} -> {answer.status_code}")


def test_no_server_errors(idle_server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{idle_server.url}/openapi.json")
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @_bounded(EXAMPLES)
            def call(case: schemathesis.Case) -> None:
                response = case.call(base_url=idle_server.url, timeout=30)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: "
                        f"{response.text[:300]} (curl: {case.as_curl_command()})"
                    )

            try:
                call()
            except Unsatisfiable:  # nothing to make invalid (e.g. /healthz has no parameters)
                continue

    # An admissible job request (it would be queued) with one string or key turned into invalid
    # Unicode, at a drawn place: each must be refused (422) before anything is stored.
    @given(path=st.sampled_from(_leaves(ADMISSIBLE)), surrogate=st.characters(categories=["Cs"]))
    @_bounded(SURROGATE_EXAMPLES)
    def poisoned(path: tuple[Any, ...], surrogate: str) -> None:
        text = json.dumps(_with_surrogate(ADMISSIBLE, path, surrogate))  # ensure_ascii: "\\udXXX"
        response = http.post("/v1/jobs", content=text.encode(), headers={"Content-Type": "application/json"})
        statuses[response.status_code] += 1
        if response.status_code != 422:
            failures.append(
                f"POST /v1/jobs with a surrogate at {path} -> {response.status_code}: {text[:300]}"
            )

    with httpx.Client(base_url=idle_server.url, timeout=30) as http:
        assert http.post("/v1/jobs", json=ADMISSIBLE).status_code == 202  # so only the surrogate is wrong
        poisoned()
    _check_store_readable(idle_server.url, failures)
    calls = sum(statuses.values())
    print(f"{calls} generated requests; statuses: {dict(sorted(statuses.items()))}")
    assert calls >= 100
    assert failures == []
    assert "Traceback" not in idle_server.log_tail(100_000)
