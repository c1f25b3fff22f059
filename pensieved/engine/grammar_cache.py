"""Grammars llama.cpp parsed once per model, handed to each request as a copy.

Parsing the grammar of Claude Code's tool set takes tens of milliseconds, and Claude Code
sends the same tools on every turn. So each model keeps the grammar samplers it parsed (the
templates, never sampled with) in a small LRU keyed by grammar text and laziness, and a request
gets `llama_sampler_clone` of its template. llama.cpp's grammar clone
(`llama_grammar_clone_impl` in llama-grammar.cpp) copies the parsed rules and parse stacks
and the lazy-trigger state (patterns, the awaiting flag, the buffer) and re-points the stacks
at the copied rules; nothing is reparsed, and since a template stays in its initial state,
every clone starts where a fresh parse would.

Only text that passed `grammar_problem` reaches llama.cpp's parser: a grammar past its limits
can overflow the parser's stack, which no exception handler catches.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import OrderedDict

from pensieved.engine.gbnf import grammar_problem
from pensieved.engine.llama import Grammar, Vocab
from pensieved.engine.tools import TOOL_CALL_OPEN
from pensieved.errors import GrammarError

log = logging.getLogger("pensieved.engine")

# Parsed grammars kept per model. Each distinct tool set, tool_choice and output schema is one;
# a Claude Code session uses two or three (its tools with `auto`, the title request's schema),
# so this holds several sessions' worth; Claude Code's tool set is ~8,000 rules.
MAX_PARSED = 16


def parse_grammar(vocab: Vocab, grammar: str, *, lazy: bool) -> Grammar | None:
    """A grammar sampler for `grammar` (lazy: from the first `<tool_call>` on), or None when
    llama.cpp refuses it (it says why on stderr). The caller closes it."""
    problem = grammar_problem(grammar)
    if problem is not None:  # callers check first; this keeps the parser safe regardless
        log.warning("not parsing a grammar past the limits: %s", problem)
        return None
    patterns = [re.escape(TOOL_CALL_OPEN)] if lazy else None
    return Grammar.parse(vocab, grammar, lazy_patterns=patterns)


class ParsedGrammar:
    """A parsed grammar sampler, to be cloned; freed when unreferenced or its model closes
    (the template's own finalizer frees it when it is collected)."""

    def __init__(self, template: Grammar, text: str, lazy: bool) -> None:
        self.text = text
        self.lazy = lazy
        self._template: Grammar | None = template
        self._lock = threading.Lock()

    def clone(self) -> Grammar:
        """A fresh grammar sampler in its initial state; the caller owns it."""
        with self._lock:
            if self._template is None:
                raise GrammarError("the model this grammar was parsed for has been unloaded")
            copy = self._template.clone()
        if copy is None:
            raise GrammarError("llama.cpp could not copy a parsed grammar")
        return copy

    def free(self) -> None:
        with self._lock:
            if self._template is not None:
                self._template.close()
                self._template = None


class GrammarCache:
    """A model's parsed grammars. Prompt preparation (worker threads) parses and looks up;
    the decode thread clones; `close` frees them all before the model goes."""

    def __init__(self, vocab: Vocab, capacity: int = MAX_PARSED) -> None:
        self._vocab = vocab
        self._capacity = capacity
        self._lock = threading.Lock()
        # None: llama.cpp refused that grammar (remembered, so it is not parsed every turn).
        self._entries: OrderedDict[tuple[str, bool], ParsedGrammar | None] = OrderedDict()
        # Evicted entries live on while a prepared request holds them; close() frees those too.
        self._live: weakref.WeakSet[ParsedGrammar] = weakref.WeakSet()
        self._parsing: dict[tuple[str, bool], threading.Lock] = {}
        self._closed = False
        self.parses = 0  # for tests and the benchmark: how often llama.cpp parsed

    def get(self, grammar: str, *, lazy: bool) -> ParsedGrammar | None:
        """The parsed `grammar`, parsing it on first use; None if llama.cpp refuses it."""
        key = (grammar, lazy)
        with self._lock:
            found, parsed = self._lookup(key)
            if found:
                return parsed
            # One parse per grammar, however many requests bring it at once (subagents); other
            # grammars' look-ups need not wait for it.
            parsing = self._parsing.setdefault(key, threading.Lock())
        with parsing:
            with self._lock:
                found, parsed = self._lookup(key)
                if found:
                    return parsed
            template = parse_grammar(self._vocab, grammar, lazy=lazy)
            parsed = ParsedGrammar(template, grammar, lazy) if template is not None else None
            with self._lock:
                self.parses += 1
                self._parsing.pop(key, None)
                if self._closed:
                    if parsed is not None:
                        parsed.free()
                    self._check_open()
                self._entries[key] = parsed
                if parsed is not None:
                    self._live.add(parsed)
                while len(self._entries) > self._capacity:
                    self._entries.popitem(last=False)  # freed once no request holds it
        return parsed

    def _lookup(self, key: tuple[str, bool]) -> tuple[bool, ParsedGrammar | None]:
        self._check_open()
        if key not in self._entries:
            return False, None
        self._entries.move_to_end(key)
        return True, self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def _check_open(self) -> None:
        if self._closed:
            raise GrammarError("the model was unloaded while preparing this request")

    def close(self) -> None:
        """Free every parsed grammar (before the model, whose vocabulary they point at)."""
        with self._lock:
            self._closed = True
            live = list(self._live)
            self._entries.clear()
        for parsed in live:
            parsed.free()
