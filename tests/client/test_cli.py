"""`shears submit` builds the request JSON without knowing the server's methods or their options."""

from __future__ import annotations

import pytest

from shears.cli import build_parser
from shears.client.cli import _request_from_args


def _submit(*argv: str) -> dict:
    return _request_from_args(build_parser().parse_args(["submit", "m", *argv]))


def test_submit_sets_any_field_by_its_path() -> None:
    request = _submit(
        "--method", "sparsegpt", "--pattern", "2:4",
        "--set", "sparsegpt.refine_iterations=0", "--set", "true_sequential=true", "--set", "revision=main",
    )  # fmt: skip
    assert request["sparsity"] == 0.5 and request["sparsegpt"] == {"refine_iterations": 0}
    assert request["true_sequential"] is True and request["revision"] == "main"
    # A method the client has never heard of is the server's to judge.
    assert _submit("--method", "newer-method", "--sparsity", "0.3")["method"] == "newer-method"
    for bad in (["--pattern", "2-4"], ["--sparsity", "0.5", "--set", "novalue"]):
        with pytest.raises(SystemExit):
            _submit("--method", "wanda", *bad)
