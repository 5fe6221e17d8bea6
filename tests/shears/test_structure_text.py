"""`--structure` text: parsed once at both CLIs into the request's `structure` dict."""

from __future__ import annotations

import pytest

from shears.structure import parse_structure


def test_values_get_their_types() -> None:
    parsed = parse_structure(" mlp=0.25, heads=0.5 ,reconstruct=false,granule=128,channel_score=flap,")
    assert parsed == {
        "mlp": 0.25,
        "heads": 0.5,
        "reconstruct": False,
        "granule": 128,
        "channel_score": "flap",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("mlp", "expected key=value"),
        ("mlp=", "expected key=value"),
        ("depth=0.2", "unknown key 'depth'"),
        ("mlp=0.2,mlp=0.3", "given twice"),
        ("mlp=a lot", "a number"),
        ("granule=1.5", "an integer"),
        ("reconstruct=maybe", "true or false"),
    ],
)
def test_mistakes_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_structure(text)
