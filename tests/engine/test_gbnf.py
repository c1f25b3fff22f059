"""GBNF text: integer ranges mean what they say, and the size checks see what llama.cpp sees."""

from __future__ import annotations

import re

import pytest

from pensieved.engine.gbnf import (
    MAX_GRAMMAR_BYTES,
    MAX_GRAMMAR_DEPTH,
    MAX_GRAMMAR_RULES,
    GrammarSize,
    grammar_problem,
    grammar_size,
    integer_range_rule,
)


def _as_regex(rule: str) -> str:
    """The GBNF subset integer_range_rule emits, as a Python regex."""
    return re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), rule).replace(" ", "")


@pytest.mark.parametrize(
    ("low", "high"),
    [(1, 2000), (0, 0), (-15, 7), (5, None), (None, -3), (None, 42), (37, 1234), (-100, -7)],
)
def test_integer_ranges_match_exactly(low: int | None, high: int | None) -> None:
    pattern = re.compile(_as_regex(integer_range_rule(low, high)))
    for n in range(-2500, 2500):
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(pattern.fullmatch(str(n))) == inside, n
    assert not pattern.fullmatch("007")
    if high is None:
        assert pattern.fullmatch("123456789012")


def test_grammar_size_skips_literals_classes_and_comments() -> None:
    text = (
        'root ::= "(((\\"(((" [(\\](] x # ((((\n'
        'x ::= ( "a" ( "b" )? )* [0-9]{2,5} [a]{3} [b]{1,} [c]{0,9999}\n'
    )
    # Rules: two ::=, two groups, ? and *, {2,5} three, {3} none, {1,} one, and {0,9999} one
    # (llama.cpp takes an upper bound over 2000 as unbounded).
    assert grammar_size(text) == GrammarSize(len(text.encode()), depth=2, rules=11)


def nested_grammar(depth: int) -> str:
    return "root ::= " + '("a" ' * depth + ")?" * depth + "\n"


def test_grammar_problem_on_deep_huge_and_repetition_heavy_grammars() -> None:
    assert grammar_problem(nested_grammar(MAX_GRAMMAR_DEPTH)) is None
    deep = grammar_problem(nested_grammar(MAX_GRAMMAR_DEPTH + 1))
    assert deep is not None and "deep" in deep
    assert "deep" in (grammar_problem(nested_grammar(100_000)) or "")  # small enough, too deep
    # The shape of the grammar, what `maxLength: 524288` used to become.
    assert grammar_problem(nested_grammar(524_288)) is not None
    huge = 'root ::= "' + "x" * MAX_GRAMMAR_BYTES + '"\n'
    assert "bytes" in (grammar_problem(huge) or "")
    wide = "root ::= " + " ".join(f'("{i}"){{0,1999}}' for i in range(60)) + "\n"
    assert grammar_size(wide).rules > MAX_GRAMMAR_RULES
    assert "rules" in (grammar_problem(wide) or "")
