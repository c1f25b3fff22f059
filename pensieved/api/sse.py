"""Server-sent events framing for the Messages stream."""

from __future__ import annotations

import json
from typing import Any


def event(data: dict[str, Any]) -> bytes:
    """One SSE event whose name is the payload's `type`, as Anthropic frames them."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {data['type']}\ndata: {payload}\n\n".encode()
