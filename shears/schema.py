"""The base of every request and settings model: unknown fields are an error, values are frozen.

Text must be valid Unicode: a lone UTF-16 surrogate (JSON's "\\ud800") cannot be written as UTF-8,
so a request holding one would break every later response that shows it. Numbers must be finite.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def _surrogate_at(value: Any, where: str) -> str | None:
    """The dotted location of the first string (or key) in `value` with a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "value"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and _surrogate_at(key, where) is not None:
                return f"{where or 'value'} (a key)"
            found = _surrogate_at(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _surrogate_at(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _surrogate_at(data, "")
        if where is not None:
            raise ValueError(
                f"{where}: the text holds a lone UTF-16 surrogate (such as \\ud800), which is not valid "
                "Unicode; send UTF-8 text"
            )
        return data
