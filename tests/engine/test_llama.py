"""The bindings module: llama.cpp's log lines reach ours, and the converter's rule table."""

from __future__ import annotations

import logging

import pytest

from pensieved.engine import llama
from pensieved.engine.llama import SchemaConverter


def test_warnings_and_errors_are_forwarded_with_their_continuations(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="pensieved.llama")
    llama._forward_llama_log(2, b"info line\n", None)
    llama._forward_llama_log(5, b"info continued\n", None)
    llama._forward_llama_log(3, b"a warning\n", None)
    llama._forward_llama_log(5, b"its continuation\n", None)
    llama._forward_llama_log(4, b"an error \xff\n", None)
    llama._forward_llama_log(5, b"\n", None)
    got = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        (logging.WARNING, "a warning"),
        (logging.WARNING, "its continuation"),
        (logging.ERROR, "an error \ufffd"),
    ]


def test_the_converter_rule_table_is_open_for_our_own_rules() -> None:
    converter = SchemaConverter()
    rule = converter.visit({"type": "object", "properties": {"n": {"type": "integer"}}}, "x")
    assert rule in converter.rules
    literal = converter.literal('"placeholder"')
    assert literal.startswith('"') and "placeholder" in literal
    added = converter.add_rule("x-int", '"1" | "2"')
    assert converter.rules[added] == '"1" | "2"'
    before = dict(converter.rules)
    converter.rules = {**before, "root": rule}
    grammar = converter.format()
    assert f"root ::= {rule}" in grammar and f"{added} ::= " in grammar
