"""The text that wraps a tool call in the model's output.

A module of its own, importing nothing: the grammar cache needs the opening marker as its lazy
trigger, and importing it from tools.py would close a cycle back through types.py.
"""

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
