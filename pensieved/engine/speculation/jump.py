"""Jump-forward: what the grammar leaves no choice about, without a decode step per token.

After a token is sampled, the grammar's state is probed with the vocabulary's one-character
tokens (and the end-of-generation tokens). When it allows exactly one of them, that character
is forced: the grammar advances over it and the probe repeats. The forced text (a closing
quote and brace, the next required key, a tool-call envelope's fixed part) is tokenized and
goes into the next batch with the sampled token: one step instead of one per token. Only the
grammar's state is read, so it works for whatever a tool dialect's grammar spells out, JSON or
XML.

The forced text's tokens are a draft, verified like any other (`verified=True`): the model
may split the same text into other tokens than the tokenizer does, and a token it would not
have picked would change what it writes next. So the walk runs on a copy of the grammar, and
the output is the same as without jump-forward. Only where a rejected draft cannot be removed
from the KV cache (recurrent and hybrid memories) is the forced text appended unverified, the
grammar walked for real (`verified=False`): the same text, possibly other tokens.

Probing costs the grammar a check of about a hundred candidates per step (a few µs), and is
done only for requests with a grammar; the grammar is copied only when a character is forced.
The probe misses a forced character that is not a one-character token (non-ASCII), and stops
there; it takes a character as forced when the grammar allows it and no other one-character
token, so a grammar offering "a" or a non-ASCII alternative at the same point would be cut to
"a" (no tool schema built by grammar.py does).
"""

from __future__ import annotations

import string
import weakref
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from pensieved.engine.speculation.base import Proposal

# The longest forced text appended at once: a tool-call envelope with a long tool name fits.
MAX_FORCED_CHARS = 96


class Grammar(Protocol):
    """The grammar of a generation's sampler, as jump-forward reads and advances it."""

    def allowed(self, candidates: np.ndarray) -> np.ndarray:
        """The candidates the grammar allows next."""
        ...

    def advance(self, token: int) -> None:
        """Feed the grammar a token as if it had been sampled."""
        ...

    def fork(self) -> Grammar | None:
        """A copy in this state, to walk ahead on without moving this one (None: no copy)."""
        ...


class Vocabulary(Protocol):
    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def is_end_of_generation(self, token: int) -> bool: ...

    @property
    def eos_id(self) -> int: ...


class Probes:
    """A vocabulary's one-character tokens and its end of generation, as probe candidates."""

    def __init__(self, vocab: Vocabulary) -> None:
        chars: dict[int, str] = {}
        for char in string.printable:
            tokens = vocab.tokenize(char, special=False)
            if len(tokens) == 1 and vocab.token_bytes(tokens[0]) == char.encode():
                chars[tokens[0]] = char
        self.chars = chars
        ids = list(chars)
        if vocab.eos_id >= 0:
            ids.append(vocab.eos_id)
        self.ids = np.array(ids, dtype=np.int32)


_probes: weakref.WeakKeyDictionary[object, Probes] = weakref.WeakKeyDictionary()


def probes_for(vocab: Vocabulary) -> Probes:
    """The probes of a model's vocabulary, built once per loaded model."""
    found = _probes.get(vocab)
    if found is None:
        found = _probes[vocab] = Probes(vocab)
    return found


class JumpForward:
    """Forced text under a generation's grammar (see the module docstring)."""

    name = "jump"

    def __init__(self, grammar: Grammar, vocab: Vocabulary, *, verified: bool = True) -> None:
        self._grammar = grammar
        self._vocab = vocab
        self._probes = probes_for(vocab)
        self.verified = verified

    def _forced_char(self, grammar: Grammar) -> int | None:
        """The one-character token the grammar forces next, if it forces one."""
        allowed = grammar.allowed(self._probes.ids)
        if len(allowed) != 1 or int(allowed[0]) not in self._probes.chars:
            return None  # a choice, or the end of generation: nothing to force
        return int(allowed[0])

    def forced_text(self) -> str:
        """The text the grammar forces from here; the grammar walked is a copy when
        verified, the generation's own otherwise."""
        token = self._forced_char(self._grammar)
        if token is None:
            return ""
        grammar = self._grammar.fork() if self.verified else self._grammar
        if grammar is None:
            return ""
        chars = self._probes.chars
        text: list[str] = []
        while token is not None and len(text) < MAX_FORCED_CHARS:
            grammar.advance(token)
            text.append(chars[token])
            token = self._forced_char(grammar)
        return "".join(text)

    def propose(self, tokens: Sequence[int], k: int) -> Proposal | None:
        """The forced text's tokens: a draft of at most `k` when verified; otherwise forced
        (appended as output, the grammar already moved over them, `k` not bounding them)."""
        if self.verified and k <= 0:
            return None
        text = self.forced_text()
        if not text:
            return None
        forced = tuple(self._vocab.tokenize(text, special=False))
        if self.verified:
            return Proposal(forced[:k], kind=self.name)
        return Proposal(forced, forced=True, kind=self.name)

    def observe(self, proposed: int, accepted: int) -> None:
        """Nothing to learn: forced text is what the grammar allows, whatever was kept."""
