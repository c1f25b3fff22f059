"""Picking a request's next token: its sampler chain, with the grammar checked after it.

A grammar placed first in llama.cpp's sampler chain is applied to every candidate of every
step: `llama_grammar_apply_impl` decodes each of the vocabulary's pieces (49,152 for the
bundled model) and matches it against the grammar's parse stacks, ~6 ms a token for Claude
Code's tools, a third of the bundled model's whole decode step on one CPU thread. So:

1. the chain samples without the grammar, and the grammar checks only the token picked
   (llama.cpp's own server does this, common/sampling.cpp); most steps end here;
2. a refused token is redrawn from the likeliest tokens the grammar allows: the grammar
   checks the 64 likeliest (then 1,024, then 8,192) and the chain samples among the ones it
   allows;
3. only when it allows none of those is the grammar applied to the whole vocabulary.

At temperature 0 every step picks the token grammar-first sampling would, the likeliest one
the grammar allows. At other temperatures an allowed token is kept as sampled and a refused
one is redrawn from the allowed ones among the likeliest, as if top-k were the shortlist's
size for that step.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

from pensieved.engine.grammar_cache import ParsedGrammar
from pensieved.engine.llama import internals, lib
from pensieved.engine.types import Sampling

# The likeliest tokens a refused pick is redrawn from (step 2 above), tried in turn: checking
# a candidate costs the grammar ~0.1 µs, and what it allows is nearly always among the first
# 64 for a model that knows the tool-call format (a tiny one spelling it out by rote needs the
# longer lists now and then).
SHORTLISTS = (64, 1024, 8192)

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _chain(sampling: Sampling, seed: int, grammar: Any = None) -> Any:
    """The sampler chain of `Llama._init_sampler`, after `grammar` (owned by it) if given."""
    chain = internals().LlamaSampler()
    if grammar is not None:
        lib().llama_sampler_chain_add(chain.sampler, grammar)
    if sampling.temperature == 0.0:
        chain.add_greedy()
    else:
        chain.add_top_k(sampling.top_k)
        chain.add_top_p(sampling.top_p, 1)
        chain.add_min_p(0.0, 1)
        chain.add_temp(sampling.temperature)
        chain.add_dist(seed)
    return chain


class Sampler:
    """One generation's sampling state; used by the decode thread only, closed once."""

    def __init__(
        self, sampling: Sampling, grammar: ParsedGrammar | None, *, seed: int, n_vocab: int
    ) -> None:
        llama = lib()
        self._llama = llama
        self._chain = _chain(sampling, seed)
        self._constrained: Any = None
        self._grammar: Any = None
        self.resampled = 0  # steps whose first pick the grammar refused
        self.full = 0  # of those, steps that needed the grammar over the whole vocabulary
        if grammar is None:
            return
        try:
            self._grammar = grammar.clone()
        except BaseException:
            self._chain.close()
            raise
        # Steps 2 and 3 (see the module docstring); the last one owns the grammar.
        self._constrained = _chain(sampling, seed, self._grammar)
        self._n_vocab = n_vocab
        self._data = (llama.llama_token_data * max(SHORTLISTS))()
        self._array = llama.llama_token_data_array(self._data, 1, -1, False)
        self._array_ref = ctypes.byref(self._array)
        self._view = np.frombuffer(self._data, dtype=_TOKEN_DATA)

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits at `index` of the last batch, accepted."""
        llama = self._llama
        token = int(llama.llama_sampler_sample(self._chain.sampler, ctx, index))
        if self._grammar is None:
            return token
        if self._check(token):
            llama.llama_sampler_accept(self._grammar, token)
            return token
        self.resampled += 1
        redrawn = self._from_shortlist(ctx, index)
        if redrawn is not None:
            llama.llama_sampler_accept(self._grammar, redrawn)
            return redrawn
        self.full += 1
        return int(llama.llama_sampler_sample(self._constrained.sampler, ctx, index))

    def _check(self, token: int) -> bool:
        """Whether the grammar allows `token` next (a lazy one not yet triggered allows all)."""
        data = self._data[0]
        data.id = token
        data.logit = 0.0
        self._reset(1)
        self._llama.llama_sampler_apply(self._grammar, self._array_ref)
        return not math.isinf(data.logit)

    def _from_shortlist(self, ctx: Any, index: int) -> int | None:
        """The chain's pick among the likeliest tokens the grammar allows; None if none."""
        llama = self._llama
        pointer = llama.llama_get_logits_ith(ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        for size in SHORTLISTS:
            if size >= self._n_vocab:
                break
            view = self._view[:size]
            view["id"] = np.argpartition(logits, -size)[-size:]
            view["logit"] = logits[view["id"]]
            view["p"] = 0.0
            self._reset(size)
            llama.llama_sampler_apply(self._grammar, self._array_ref)
            if not np.isinf(view["logit"]).all():
                llama.llama_sampler_apply(self._chain.sampler, self._array_ref)
                return int(self._data[self._array.selected].id)
        return None

    @property
    def grammar(self) -> Sampler | None:
        """This sampler as jump-forward reads its grammar (`allowed`, `advance`); None
        without a grammar."""
        return self if self._grammar is not None else None

    def allowed(self, candidates: np.ndarray) -> np.ndarray:
        """The candidates (at most the longest shortlist) the grammar allows next."""
        size = len(candidates)
        view = self._view[:size]
        view["id"] = candidates
        view["logit"] = 0.0
        view["p"] = 0.0
        self._reset(size)
        self._llama.llama_sampler_apply(self._grammar, self._array_ref)
        return np.array(view["id"][~np.isinf(view["logit"])])

    def advance(self, token: int) -> None:
        """Move the grammar over `token` as if it had been sampled (jump-forward)."""
        self._llama.llama_sampler_accept(self._grammar, token)

    def _reset(self, size: int) -> None:
        self._array.size = size
        self._array.selected = -1
        self._array.sorted = False

    def close(self) -> None:
        self._chain.close()
        if self._constrained is not None:
            self._constrained.close()  # frees the grammar it owns
            self._constrained = None
