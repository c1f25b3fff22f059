"""What an anthropic-protocol upstream receives."""

from __future__ import annotations

import json

from pensieved.api.forward import normalized_body


def test_billing_header_dropped_everything_else_kept() -> None:
    raw = {
        "model": "claude-opus-4-5",
        "max_tokens": 10,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2; cch=1;"},
            {
                "type": "text",
                "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}
        ],
        "metadata": {"user_id": "u1"},
    }
    body = normalized_body(json.dumps(raw).encode(), "qwen3-coder")
    assert body["model"] == "qwen3-coder"
    assert body["system"] == [raw["system"][1]]  # type: ignore[index]
    assert body["messages"] == raw["messages"] and body["metadata"] == raw["metadata"]
    only_billing = {**raw, "system": [raw["system"][0]]}  # type: ignore[index]
    assert "system" not in normalized_body(json.dumps(only_billing).encode(), "m")
