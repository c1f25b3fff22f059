"""Parsed grammars: parsed once per model, cloned per request, freed with the model.

The clone checks below run llama.cpp's own grammar sampler: a token the grammar forbids gets
-inf from `llama_sampler_apply`, one it allows keeps its logit.
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

from pensieved.engine.grammar_cache import GrammarCache
from pensieved.engine.llama import Grammar, Vocab
from pensieved.errors import GrammarError

ABC = 'root ::= "abc"\n'


def token(vocab_model: Any, text: str) -> int:
    tokens = vocab_model.tokenize(text.encode(), add_bos=False, special=False)
    assert len(tokens) == 1, (text, tokens)
    return int(tokens[0])


def allows(grammar: Grammar, tok: int) -> bool:
    return grammar.allows(tok)


def accept(grammar: Grammar, tok: int) -> None:
    grammar.accept(tok)


def free(grammar: Grammar) -> None:
    grammar.close()


def test_parsed_once_and_every_clone_starts_fresh(vocab: Vocab, vocab_model: Any) -> None:
    cache = GrammarCache(vocab)
    a, b, c = (token(vocab_model, t) for t in "abc")
    parsed = cache.get(ABC, lazy=False)
    assert parsed is not None
    assert cache.get(ABC, lazy=False) is parsed
    assert cache.parses == 1
    first = parsed.clone()
    assert allows(first, a) and not allows(first, b)
    accept(first, a)
    accept(first, b)
    assert allows(first, c) and not allows(first, a)
    # The template is untouched by what its clones accepted.
    second = parsed.clone()
    assert allows(second, a) and not allows(second, c)
    free(first)
    free(second)
    cache.close()


def test_lazy_clones_wait_for_the_trigger(vocab: Vocab, vocab_model: Any) -> None:
    cache = GrammarCache(vocab)
    parsed = cache.get('root ::= "<tool_call>" "x"\n', lazy=True)
    assert parsed is not None and parsed.lazy
    assert cache.get('root ::= "<tool_call>" "x"\n', lazy=False) is not parsed
    y = token(vocab_model, "y")
    clone = parsed.clone()
    assert allows(clone, y)  # free text until `<tool_call>`
    for piece in vocab_model.tokenize(b"hi <tool_call>", add_bos=False, special=False):
        accept(clone, int(piece))
    assert not allows(clone, y)  # triggered: only "x" now
    fresh = parsed.clone()
    assert allows(fresh, y)  # the trigger state is per clone
    free(clone)
    free(fresh)
    cache.close()


def test_refusals_are_remembered(vocab: Vocab) -> None:
    cache = GrammarCache(vocab)
    bad = "root ::= undefined-rule\n"
    assert cache.get(bad, lazy=False) is None
    assert cache.get(bad, lazy=False) is None
    assert cache.parses == 1
    cache.close()


def test_eviction_keeps_grammars_that_requests_hold(vocab: Vocab, vocab_model: Any) -> None:
    cache = GrammarCache(vocab, capacity=2)
    held = cache.get(ABC, lazy=False)
    assert held is not None
    for text in ('root ::= "x"\n', 'root ::= "y"\n'):
        cache.get(text, lazy=False)
    assert len(cache) == 2
    clone = held.clone()  # evicted from the cache, still alive for the request holding it
    assert allows(clone, token(vocab_model, "a"))
    free(clone)
    assert cache.get(ABC, lazy=False) is not held  # parsed again once evicted
    assert cache.parses == 4
    del held
    gc.collect()
    cache.close()


def test_close_frees_everything_and_refuses_more(vocab: Vocab) -> None:
    cache = GrammarCache(vocab)
    parsed = cache.get(ABC, lazy=False)
    assert parsed is not None
    cache.close()
    with pytest.raises(GrammarError):
        parsed.clone()
    with pytest.raises(GrammarError):
        cache.get(ABC, lazy=False)


def test_threads_share_one_parse(vocab: Vocab) -> None:
    cache = GrammarCache(vocab)
    grammar = 'root ::= "t" [a-z]{1,40}\n'
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(grammar, lazy=False)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(r) for r in results}) == 1 and results[0] is not None
    assert cache.parses == 1
    clones = [results[0].clone() for _ in range(4)]
    for clone in clones:
        free(clone)
    cache.close()
