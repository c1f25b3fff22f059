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

import numpy as np
import numpy.typing as npt

from pensieved.engine.grammar_cache import ParsedGrammar
from pensieved.engine.llama import Candidates, ContextHandle, Grammar, SamplerChain, logits_at
from pensieved.engine.types import Sampling

# The likeliest tokens a refused pick is redrawn from (step 2 above), tried in turn: checking
# a candidate costs the grammar ~0.1 µs, and what it allows is nearly always among the first
# 64 for a model that knows the tool-call format (a tiny one spelling it out by rote needs the
# longer lists now and then).
SHORTLISTS = (64, 1024, 8192)


def _chain(sampling: Sampling, seed: int, grammar: Grammar | None = None) -> SamplerChain:
    """The sampler chain of `Llama._init_sampler`, after `grammar` (owned by it) if given."""
    chain = SamplerChain()
    if grammar is not None:
        chain.add_grammar(grammar)
    if sampling.temperature == 0.0:
        chain.add_greedy()
    else:
        chain.add_top_k(sampling.top_k)
        chain.add_top_p(sampling.top_p, 1)
        chain.add_min_p(0.0, 1)
        chain.add_temperature(sampling.temperature)
        chain.add_dist(seed)
    return chain


class Sampler:
    """One generation's sampling state; used by the decode thread only, closed once."""

    def __init__(
        self, sampling: Sampling, grammar: ParsedGrammar | None, *, seed: int, n_vocab: int
    ) -> None:
        self._chain = _chain(sampling, seed)
        self._constrained: SamplerChain | None = None
        self._grammar: Grammar | None = None
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
        self._candidates = Candidates(max(SHORTLISTS))

    def sample(self, ctx: ContextHandle, index: int) -> int:
        """The next token from the logits at `index` of the last batch, accepted."""
        token = self._chain.sample(ctx, index)
        grammar = self._grammar
        if grammar is None:
            return token
        if grammar.allows(token):
            grammar.accept(token)
            return token
        self.resampled += 1
        redrawn = self._from_shortlist(grammar, ctx, index)
        if redrawn is not None:
            grammar.accept(redrawn)
            return redrawn
        self.full += 1
        assert self._constrained is not None  # made with the grammar
        return self._constrained.sample(ctx, index)

    def _from_shortlist(self, grammar: Grammar, ctx: ContextHandle, index: int) -> int | None:
        """The chain's pick among the likeliest tokens the grammar allows; None if none."""
        logits = logits_at(ctx, index, self._n_vocab)
        candidates = self._candidates
        for size in SHORTLISTS:
            if size >= self._n_vocab:
                break
            view = candidates.entries[:size]
            view["id"] = np.argpartition(logits, -size)[-size:]
            view["logit"] = logits[view["id"]]
            view["p"] = 0.0
            candidates.use(size)
            grammar.apply(candidates)
            if not np.isinf(view["logit"]).all():
                self._chain.apply(candidates)
                return candidates.selected()
        return None

    @property
    def grammar(self) -> GrammarState | None:
        """The grammar's state as jump-forward reads it; None without a grammar."""
        if self._grammar is None:
            return None
        return GrammarState(self._grammar, self._candidates)

    def close(self) -> None:
        self._chain.close()
        if self._constrained is not None:
            self._constrained.close()  # frees the grammar it owns
            self._constrained = None


class GrammarState:
    """A grammar as jump-forward reads it: what it allows next, a move over a token, and a
    copy to walk ahead on (used by the decode thread only, like its sampler)."""

    def __init__(self, grammar: Grammar, candidates: Candidates) -> None:
        self._grammar = grammar
        self._candidates = candidates  # scratch space, shared with the sampler

    def allowed(self, candidates: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
        """The candidates (at most the longest shortlist) the grammar allows next."""
        size = len(candidates)
        view = self._candidates.entries[:size]
        view["id"] = candidates
        view["logit"] = 0.0
        view["p"] = 0.0
        self._candidates.use(size)
        self._grammar.apply(self._candidates)
        return np.array(view["id"][~np.isinf(view["logit"])], dtype=np.int32)

    def advance(self, token: int) -> None:
        """Move the grammar over `token` as if it had been sampled."""
        self._grammar.accept(token)

    def fork(self) -> GrammarState | None:
        """A copy of the grammar in this state, freed when dropped (None if llama.cpp fails)."""
        copy = self._grammar.clone()
        return GrammarState(copy, self._candidates) if copy is not None else None
