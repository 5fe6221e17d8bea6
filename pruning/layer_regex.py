"""Regexes over layer names (`ignore`, `overrides`), compiled with RE2: matching takes linear time.

Python's `re` backtracks: `(.|.)*X` against a 40-character layer name runs for ages while holding
the GIL, so a request could stall a worker (and its heartbeat) for as long as it likes. RE2 has no
backtracking, and refuses what needs it (backreferences, lookaround) when the request is parsed.
"""

from __future__ import annotations

from typing import Any

import re2

MAX_LENGTH = 512  # characters of one regex
MAX_COUNT = 256  # regexes in `ignore`, and in `overrides`

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error goes back to the user, not to stderr
_OPTIONS.max_mem = 8 << 20  # a pattern whose program is larger than this fails to compile


def compile_layer_regex(rx: str, field: str) -> Any:
    """The compiled regex (its `search` as re's); a ValueError that says what to write otherwise."""
    try:
        return re2.compile(rx, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(
            f"{field}: {rx!r} is not a regular expression this server runs ({reason}); layer regexes use "
            "RE2 syntax: no backreferences or lookaround"
        ) from exc
