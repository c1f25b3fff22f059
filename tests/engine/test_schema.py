"""Schema normalising: what the converter is given, and what is loosened on the way."""

from __future__ import annotations

import pytest

from pensieved.engine.schema import MAX_REPETITION, _anchor, normalise


@pytest.mark.parametrize(
    ("pattern", "anchored"),
    [
        ("^[a-z]+$", "^[a-z]+$"),
        ("[a-z]+", "^[a-z]+$"),
        ("a|b", "^(a|b)$"),
        ("^.*$", None),
        ("^[a-z*./]{1,24}$", "^[a-z*./]{1,24}$"),
        ("[ -~]+", None),
        ("\\d+", None),
        ('[^"]+', None),
        ("\\s+", None),
        ("(?=x)y", None),
        ("(bad", None),
    ],
)
def test_patterns_are_anchored_or_refused(pattern: str, anchored: str | None) -> None:
    assert _anchor(pattern) == anchored


def test_bounds_up_to_the_limit_stay_enforced() -> None:
    out, loosened = normalise({"type": "string", "minLength": 1, "maxLength": MAX_REPETITION})
    assert (out["minLength"], out["maxLength"], loosened) == (1, MAX_REPETITION, [])
    out, _ = normalise({"type": "string", "minLength": 1, "maxLength": MAX_REPETITION + 1})
    assert out["minLength"] == 1 and "maxLength" not in out
    out, _ = normalise({"type": "array", "items": {"type": "string"}, "maxItems": 256})
    assert out["maxItems"] == 256
    out, _ = normalise({"type": "string", "pattern": "^[a-z]{2,256}x{3}$"})
    assert out["pattern"] == "^[a-z]{2,256}x{3}$"
    out, loosened = normalise({"type": "string", "pattern": "^[{]{9999}\\{9999}a{3,9999}$"})
    # Only real quantifiers count: not a `{` in a class or escaped; the minimum is kept.
    assert out["pattern"] == "^[{]{0,}\\{9999}a{3,}$"
    assert len(loosened) == 2
    out, _ = normalise({"type": "integer", "minimum": 0, "maximum": 9007199254740991})
    assert out["x-range"] == [0, 9007199254740991]
