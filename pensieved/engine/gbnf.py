"""GBNF text: literals, integer ranges, and the limits llama.cpp's parser can take.

Every grammar is checked (`grammar_problem`) before llama.cpp sees it: its parser recurses per
nesting level on the thread's stack, and a stack overflow is a crash no handler catches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# What any grammar may be before llama.cpp parses it (`grammar_problem`).
# Nesting: llama.cpp's recursive descent parser takes ~450 bytes of stack per level of ( )
# (a 1 MB thread stack overflowed between 2,000 and 2,500 levels). 512 levels need ~230 KB,
# inside the smallest default thread stack we run on (512 KB, macOS); the deepest grammar the
# schema bounds allow is `schema.MAX_REPETITION` plus a few levels.
MAX_GRAMMAR_DEPTH = 512
# Size: parsing is linear but every request copies the parsed rules, and a parse failure
# makes llama.cpp print the whole text to stderr. Claude Code's 25 tools come to ~93 KB.
MAX_GRAMMAR_BYTES = 2_000_000
# Rules llama.cpp creates: one per named rule, group and `*`/`+`/`?`, and one per optional
# repetition of a GBNF `{m,n}` (llama-grammar.cpp expands those itself). Each is a vector
# copied into every request's grammar; Claude Code's tools need ~8,000.
MAX_GRAMMAR_RULES = 100_000
# llama.cpp treats a `{m,n}` upper bound above this as unbounded (MAX_REPETITION_THRESHOLD).
_LLAMA_REPETITION_THRESHOLD = 2000


_GBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_literal(text: str) -> str:
    """A GBNF string literal for `text`."""
    out = []
    for char in text:
        if char in _GBNF_ESCAPES:
            out.append(_GBNF_ESCAPES[char])
        elif ord(char) < 0x20 or char == "\x7f":
            out.append(f"\\x{ord(char):02X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _repetition_rules(match: re.Match[str]) -> int:
    """Rules llama.cpp adds for a GBNF `{m}`, `{m,}` or `{m,n}` (llama-grammar.cpp)."""
    if match.group(2) is None:
        return 0  # {m}: the item copied m times, no optional part
    high = match.group(3)
    if high and int(high) <= _LLAMA_REPETITION_THRESHOLD:
        return max(int(high) - int(match.group(1)), 0)  # one rule per optional repetition
    return 1  # unbounded: one recursive rule


@dataclass(frozen=True)
class GrammarSize:
    """What a GBNF text costs llama.cpp to parse."""

    byte_count: int
    depth: int  # deepest nesting of ( groups )
    rules: int  # rules llama.cpp creates for it


# The GBNF tokens that matter for its size: "literals" and [classes] (with their escapes) and
# # comments are matched whole, so brackets and operators inside them do not count.
_GBNF_TOKENS = re.compile(
    r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\r\n]*|::=|[()*+?]'
    r"|\{\s*(\d+)\s*(,\s*(\d*))?\s*\}"
)


def grammar_size(grammar: str) -> GrammarSize:
    """Measure `grammar` the way llama.cpp's parser will meet it (without parsing it)."""
    depth = deepest = rules = 0
    for match in _GBNF_TOKENS.finditer(grammar):
        token = match.group(0)
        first = token[0]
        if first == "(":
            depth += 1
            deepest = max(deepest, depth)
            rules += 1
        elif first == ")":
            depth -= 1
        elif first == "{":
            rules += _repetition_rules(match)
        elif first in "*+?:":
            rules += 1
    return GrammarSize(len(grammar.encode()), deepest, rules)


def grammar_problem(grammar: str) -> str | None:
    """Why llama.cpp must not parse `grammar` (too big, too deep, too many rules), or None."""
    if len(grammar) > MAX_GRAMMAR_BYTES:  # at least as many bytes: no need to scan it
        return f"the grammar is over {MAX_GRAMMAR_BYTES:,} bytes"
    size = grammar_size(grammar)
    if size.byte_count > MAX_GRAMMAR_BYTES:
        return f"the grammar is {size.byte_count:,} bytes (limit {MAX_GRAMMAR_BYTES:,})"
    if size.depth > MAX_GRAMMAR_DEPTH:
        return f"the grammar nests {size.depth:,} groups deep (limit {MAX_GRAMMAR_DEPTH:,})"
    if size.rules > MAX_GRAMMAR_RULES:
        return f"the grammar makes {size.rules:,} rules (limit {MAX_GRAMMAR_RULES:,})"
    return None


# ---- integer ranges as grammar -------------------------------------------------------------


def _digits_between(a: str, b: str) -> str:
    """GBNF matching every digit string of len(a) between a and b (same length, a <= b)."""
    if not a:
        return ""
    if a == b:
        return escape_literal(a)
    if a[0] == b[0]:
        return f'"{a[0]}" ({_digits_between(a[1:], b[1:])})'
    rest = len(a) - 1
    if a[1:] == "0" * rest and b[1:] == "9" * rest:
        return f"[{a[0]}-{b[0]}]" + " [0-9]" * rest
    parts = []
    parts.append(f'"{a[0]}" ({_digits_between(a[1:], "9" * rest)})' if rest else f'"{a[0]}"')
    if int(b[0]) - int(a[0]) > 1:
        parts.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}]" + " [0-9]" * rest)
    parts.append(f'"{b[0]}" ({_digits_between("0" * rest, b[1:])})' if rest else f'"{b[0]}"')
    return " | ".join(f"({p})" for p in parts)


_MAX_DIGITS = 16  # the converter's own integers stop at 16 digits


def _nonneg_range(low: int, high: int | None) -> str:
    """Non-negative integers in [low, high] (high None: unbounded), no leading zeros."""
    alternatives = []
    top = len(str(high)) if high is not None else len(str(low))
    if high is None and top < _MAX_DIGITS:
        alternatives.append(f"[1-9] [0-9]{{{top},{_MAX_DIGITS - 1}}}")
    for length in range(len(str(low)), top + 1):
        first = max(low, 10 ** (length - 1) if length > 1 else 0)
        last = min(high, 10**length - 1) if high is not None else 10**length - 1
        if first > last:
            continue
        alternatives.append(f"({_digits_between(str(first), str(last))})")
    return " | ".join(alternatives) if alternatives else '"0"'


def integer_range_rule(low: int | None, high: int | None) -> str:
    """A GBNF alternative matching exactly the integers in [low, high] (None: unbounded)."""
    parts = []
    if high is None or high >= 0:
        parts.append(_nonneg_range(max(low or 0, 0), high))
    if low is None or low < 0:
        neg_low = 1 if high is None or high >= 0 else -high
        neg_high = None if low is None else -low
        parts.append(f'"-" ({_nonneg_range(neg_low, neg_high)})')
    return " | ".join(f"({p})" for p in parts)
