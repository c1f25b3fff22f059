"""The grammar checked after sampling picks what the grammar applied first would pick.

These run the bundled model (tiny) in-process: real logits, real llama.cpp grammars.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from pensieve.paths import bundled_model_path
from pensieved.engine.grammar_cache import GrammarCache, ParsedGrammar
from pensieved.engine.llama import ContextHandle, Vocab
from pensieved.engine.sampler import Sampler, _chain
from pensieved.engine.types import Sampling

# The model would rather write prose than this: the grammar refuses many first picks.
NUMBERS = 'root ::= "{\\"n\\": [" [0-9]+ ("," " "? [0-9]+)* "]}"\n'
GREEDY = Sampling(temperature=0.0)


@pytest.fixture(scope="module")
def llm() -> Iterator[Any]:
    import llama_cpp

    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled model is not installed")
    model = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def grammars(llm: Any) -> Iterator[GrammarCache]:
    cache = GrammarCache(Vocab(llm._model.vocab))
    yield cache
    cache.close()


def run(llm: Any, pick: Any, n: int = 40) -> list[int]:
    """Greedy-decode up to `n` tokens after a prose prompt, each picked by `pick(ctx)`."""
    llm.reset()
    llm.eval(llm.tokenize(b"Once upon a time, in a land far away,", add_bos=True))
    out: list[int] = []
    for _ in range(n):
        token = pick(ContextHandle(llm.ctx))
        out.append(token)
        if llm.token_eos() == token:
            break
        llm.eval([token])
    return out


def grammar_first(llm: Any, parsed: ParsedGrammar, sampling: Sampling) -> list[int]:
    chain = _chain(sampling, 7, parsed.clone())
    try:
        return run(llm, lambda ctx: chain.sample(ctx, -1))
    finally:
        chain.close()


def test_greedy_picks_the_same_tokens_as_grammar_first(llm: Any, grammars: GrammarCache) -> None:
    parsed = grammars.get(NUMBERS, lazy=False)
    assert parsed is not None
    sampler = Sampler(GREEDY, parsed, seed=7, n_vocab=llm.n_vocab())
    try:
        checked = run(llm, lambda ctx: sampler.sample(ctx, -1))
    finally:
        sampler.close()
    assert checked == grammar_first(llm, parsed, GREEDY)
    # Both ways of redrawing a refused pick ran: from the likeliest tokens, and (for a token
    # that is not among them) over the whole vocabulary.
    assert sampler.resampled > sampler.full > 0
    text = llm.detokenize(checked).decode()
    assert text.startswith('{"n": [')


def test_sampled_output_follows_the_grammar(llm: Any, grammars: GrammarCache) -> None:
    parsed = grammars.get(NUMBERS, lazy=False)
    assert parsed is not None
    sampler = Sampler(
        Sampling(temperature=1.0, top_p=0.95, top_k=40), parsed, seed=3, n_vocab=llm.n_vocab()
    )
    try:
        tokens = run(llm, lambda ctx: sampler.sample(ctx, -1), n=80)
    finally:
        sampler.close()
    text = llm.detokenize([t for t in tokens if t != llm.token_eos()]).decode()
    if tokens[-1] == llm.token_eos():
        assert isinstance(json.loads(text)["n"], list)
    else:
        assert text.startswith('{"n": [')


def test_a_lazy_grammar_leaves_free_text_alone(llm: Any, grammars: GrammarCache) -> None:
    parsed = grammars.get('root ::= "<tool_call>" [0-9]+\n', lazy=True)
    assert parsed is not None
    sampler = Sampler(GREEDY, parsed, seed=7, n_vocab=llm.n_vocab())
    free = _chain(GREEDY, 7)
    try:
        lazy = run(llm, lambda ctx: sampler.sample(ctx, -1))
        plain = run(llm, lambda ctx: free.sample(ctx, -1))
    finally:
        sampler.close()
        free.close()
    assert lazy == plain and sampler.resampled == 0


def test_no_grammar(llm: Any) -> None:
    sampler = Sampler(GREEDY, None, seed=1, n_vocab=llm.n_vocab())
    try:
        assert len(run(llm, lambda ctx: sampler.sample(ctx, -1), n=5)) == 5
    finally:
        sampler.close()
