"""Jump-forward: append what the grammar leaves no choice about, without sampling it.

After a token is sampled, the grammar's state is probed with the vocabulary's one-character
tokens (and the end-of-generation tokens). When it allows exactly one of them, that character
is forced: the grammar advances over it and the probe repeats. The forced text (a closing
quote and brace, the next required key, a tool-call envelope's fixed part) is tokenized and
appended in the next batch with the sampled token, with no logits and no sampling: one step
instead of one per token. Only the grammar's state is read, so it works for whatever a tool
dialect's grammar spells out, JSON or XML.

Probing costs the grammar a check of about a hundred candidates per step (a few µs), and is
done only for requests with a grammar. The probe misses a forced character that is not a
one-character token (non-ASCII), and stops there; it takes a character as forced when the
grammar allows it and no other one-character token, so a grammar offering "a" or a non-ASCII
alternative at the same point would be cut to "a" (no tool schema built by grammar.py does).
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

    def __init__(self, grammar: Grammar, vocab: Vocabulary) -> None:
        self._grammar = grammar
        self._vocab = vocab
        self._probes = probes_for(vocab)

    def forced_text(self) -> str:
        """Walk the grammar over the characters it forces; the text walked."""
        probes, grammar = self._probes, self._grammar
        text: list[str] = []
        while len(text) < MAX_FORCED_CHARS:
            allowed = grammar.allowed(probes.ids)
            if len(allowed) != 1:
                break
            token = int(allowed[0])
            char = probes.chars.get(token)
            if char is None:  # the end of generation: nothing more to force
                break
            grammar.advance(token)
            text.append(char)
        return "".join(text)

    def propose(self, tokens: Sequence[int], k: int) -> Proposal | None:
        """The forced text's tokens; `k` does not bound them (they cost no verification).

        The grammar has already advanced over them: they are to be appended as output."""
        text = self.forced_text()
        if not text:
            return None
        return Proposal(
            tuple(self._vocab.tokenize(text, special=False)), forced=True, kind=self.name
        )

    def observe(self, proposed: int, accepted: int) -> None:
        """Forced tokens are never rejected."""
