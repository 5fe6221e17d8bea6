"""The text form of a structured-pruning request, as command lines take it: `mlp=0.25,heads=0.25`.

Parsed once at the edge (both CLIs) into the dict the JSON request carries; the request model
(pruning.config.StructureSpec) validates the values. No pydantic here: the client CLI uses it too.
"""

from __future__ import annotations

from typing import Any

FRACTIONS = ("layers", "mlp", "heads", "experts")
FLAGS = ("reconstruct", "layer_refit", "contiguous", "speed")
CHOICES = ("channel_score",)
INTEGERS = ("granule",)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_structure(text: str) -> dict[str, Any]:
    """`key=value[,key=value...]` -> a dict for the request's `structure` field.

    Keys: layers, mlp, heads, experts (fractions), reconstruct, layer_refit, contiguous (true/false),
    speed (true/false), granule (integer), channel_score (a name). A ValueError says what to write instead.
    """
    known = (*FRACTIONS, *FLAGS, *CHOICES, *INTEGERS)
    result: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"structure item {item!r}: expected key=value, e.g. 'mlp=0.25,heads=0.25'")
        if key not in known:
            raise ValueError(
                f"structure item {item!r}: unknown key {key!r}; expected one of {', '.join(known)}"
            )
        if key in result:
            raise ValueError(f"structure key {key!r} given twice")
        result[key] = _value(key, value)
    if not result:
        raise ValueError("structure is empty; e.g. 'layers=0.2' or 'mlp=0.25,heads=0.25'")
    return result


def _value(key: str, value: str) -> Any:
    if key in FLAGS:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError(f"structure {key}={value!r}: expected true or false")
    if key in CHOICES:
        return value
    try:
        return int(value) if key in INTEGERS else float(value)
    except ValueError:
        kind = "an integer" if key in INTEGERS else "a number such as 0.25"
        raise ValueError(f"structure {key}={value!r}: expected {kind}") from None
