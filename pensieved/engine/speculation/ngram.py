"""N-gram self-speculation: draft what followed the last few tokens where they occurred before.

An agent's output copies: an Edit's old_string is lines a Read put in the context, file
paths and keys repeat on every call. The sequence itself (prompt plus output) is indexed by
its KEY-grams; to draft, the last KEY tokens are looked up, the earlier occurrence whose
context matches furthest back is chosen, and the tokens that followed it are proposed.

A model-wide `ConversationIndex` keeps the sequences of finished requests, so a request
drafts from what earlier turns and other sessions read and wrote even when its own prompt no
longer holds them (a compacted conversation, a subagent given only a task).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

from pensieved.engine.speculation.base import Proposal

KEY = 3  # tokens looked up
# Candidates kept per key (the latest occurrences); the one matching furthest back wins.
CANDIDATES = 4
# A candidate must match at least this many tokens back (the key included): 3-grams recur in
# prose by chance, and a draft that fails costs a step's worth of batch room.
MIN_MATCH = 4
LOOKBACK = 32  # how far back a candidate's match is measured
# The conversation index: tokens of finished requests it keeps, newest first.
CONVERSATION_TOKENS = 262_144


class NgramIndex:
    """Where each KEY-gram of a growing token sequence occurred: the position after it."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._where: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the indexed sequence."""
        own = self.tokens
        where = self._where
        start = len(own)
        own.extend(tokens)
        for end in range(max(start, KEY), len(own)):
            # The gram own[end-KEY:end] is followed by own[end].
            key = tuple(own[end - KEY : end])
            found = where.get(key)
            if found is None:
                where[key] = [end]
            else:
                found.append(end)
                if len(found) > CANDIDATES:
                    del found[0]

    def lookup(self, tail: Sequence[int], k: int, *, before: int | None = None) -> list[int]:
        """Up to `k` tokens that followed `tail`'s last KEY tokens where the longest context
        matched (at least MIN_MATCH tokens); [] when none did. `before` limits candidates to
        occurrences ending before it (a sequence looking itself up)."""
        if len(tail) < KEY or k <= 0:
            return []
        found = self._where.get(tuple(tail[-KEY:]))
        if not found:
            return []
        own = self.tokens
        best, best_match = -1, 0
        for end in found:
            if before is not None and end >= before:
                continue
            match = KEY
            limit = min(LOOKBACK, end, len(tail))
            while match < limit and own[end - match - 1] == tail[-match - 1]:
                match += 1
            if match > best_match or (match == best_match and end > best):
                best, best_match = end, match
        if best < 0 or best_match < MIN_MATCH:
            return []
        return own[best : best + k]


class ConversationIndex:
    """Sequences of finished requests, indexed together; shared by a model's slots.

    Written by the decode thread as requests end, read by it when drafting: the lock only
    guards against a status reader.
    """

    def __init__(self, capacity: int = CONVERSATION_TOKENS) -> None:
        self._capacity = capacity
        self._sequences: deque[NgramIndex] = deque()
        self._tokens = 0
        self._lock = threading.Lock()

    def remember(self, tokens: Sequence[int], indexed: NgramIndex | None = None) -> None:
        """Keep a finished request's sequence (replacing one it extends, a previous turn);
        `indexed`, an index of a prefix of it, is taken over rather than built again."""
        if len(tokens) <= KEY:
            return
        if indexed is None or len(indexed.tokens) > len(tokens) or len(tokens) > self._capacity:
            indexed = NgramIndex()
            indexed.extend(tokens[-self._capacity :])
        else:
            indexed.extend(tokens[len(indexed.tokens) :])
        with self._lock:
            for index in list(self._sequences):
                old = index.tokens
                if len(old) <= len(tokens) and list(tokens[: len(old)]) == old:
                    self._sequences.remove(index)
                    self._tokens -= len(old)
            self._sequences.appendleft(indexed)
            self._tokens += len(indexed.tokens)
            while self._tokens > self._capacity and len(self._sequences) > 1:
                self._tokens -= len(self._sequences.pop().tokens)

    def lookup(self, tail: Sequence[int], k: int) -> list[int]:
        with self._lock:
            for index in self._sequences:
                found = index.lookup(tail, k)
                if found:
                    return found
        return []


class NgramSpeculation:
    """Drafts from the generation's own sequence, then from the conversation index."""

    name = "ngram"

    def __init__(self, conversation: ConversationIndex | None = None) -> None:
        self._own = NgramIndex()
        self._conversation = conversation

    @property
    def index(self) -> NgramIndex:
        """The index of the generation's sequence so far (handed to the conversation's)."""
        return self._own

    def propose(self, tokens: Sequence[int], k: int) -> Proposal | None:
        own = self._own
        if len(tokens) < len(own.tokens):  # a sequence only grows; a shorter one is new
            self._own = own = NgramIndex()
        own.extend(tokens[len(own.tokens) :])
        # The last KEY-gram was indexed with nothing after it yet, so it never finds itself.
        draft = own.lookup(tokens, k, before=len(tokens))
        if not draft and self._conversation is not None:
            draft = self._conversation.lookup(tokens, k)
        return Proposal(tuple(draft), kind=self.name) if draft else None

    def observe(self, proposed: int, accepted: int) -> None:
        """Nothing to learn: the draft length is adapted per slot (`DraftLength`)."""
