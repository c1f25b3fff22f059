"""What the XML-style dialects share: how a value is written inside its tags."""

from __future__ import annotations

import json
from typing import Any


def param_text(value: Any) -> str:
    """A parameter's value as the templates write it: strings raw, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
