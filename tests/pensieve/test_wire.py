"""The control wire models: what an older or newer daemon's replies do to pensievectl."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pensieve.wire import ReloadResult, ValidateRequest


def test_a_reply_keeps_fields_this_version_does_not_know() -> None:
    # A newer daemon's field must reach `status --json` readers, not break the parse.
    raw = {
        "time": 1.5,
        "trigger": "control",
        "ok": True,
        "error": None,
        "changes": [{"key": "a.b", "old": 1, "new": 2, "action": "live", "since": 3}],
        "model_loading": False,
        "added_later": {"x": 1},
    }
    result = ReloadResult.model_validate(raw)
    assert result.changes[0].key == "a.b"
    assert json.dumps(result.model_dump(mode="json")) == json.dumps(raw)


def test_the_validate_request_refuses_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        ValidateRequest.model_validate({"path": "/x.json", "pth": "/y.json"})
