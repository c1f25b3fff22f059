"""One request's generation: its slot, prompt, sampler, and what its tokens turn into.

A `Generation` is driven by the batcher's thread (see `batcher.py`), which decodes all running
generations of a model together. Here is what is particular to one request: which prompt tokens
still need evaluating, sampling its next token, and handing the text to its `OutputRouter`.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence

from pensieve.wire import CacheReport
from pensieved.engine.cachereport import cache_report, source
from pensieved.engine.model import LoadedModel
from pensieved.engine.output import OutputRouter
from pensieved.engine.sampler import Sampler
from pensieved.engine.slots import Slot, best_donor
from pensieved.engine.speculation import Speculator
from pensieved.engine.textstream import TextStream
from pensieved.engine.types import Event, Failed, Finished, PreparedPrompt, PromptCached

# A copied prefix (a cache per slot) moves the donor's whole cache, every cell of its context,
# at the next decode: a memory copy of tens of ms on a CPU, against 10-20 ms per prompt token
# evaluated there. Below this many tokens gained, evaluating them costs about as much.
COPY_MIN_TOKENS = 32
# Checkpoints of a prompt, for models whose cache cannot be cut back (checkpoints.py): every
# this many tokens of a long prefill, and this many tokens before its end as well as at it. The
# next turn's prompt usually leaves this one inside its last lines (the template renders the
# reply's turn differently from the generation prompt it was asked with).
CHECKPOINT_EVERY = 4096
CHECKPOINT_BEFORE_END = 8


def checkpoint_marks(length: int, start: int, content_ends: Sequence[int] = ()) -> tuple[int, ...]:
    """Positions past `start` where a prompt of `length` tokens is checkpointed, ascending.

    Besides the regular ones and its end: where the first message (the system prompt, which
    a second session or a subagent shares) and the last but one end (what the next turn
    keeps however the last one is rendered again)."""
    marks = set(range(CHECKPOINT_EVERY, length, CHECKPOINT_EVERY))
    marks |= {length - CHECKPOINT_BEFORE_END, length}
    if content_ends:
        marks |= {content_ends[0], content_ends[-2] if len(content_ends) > 1 else 0}
    return tuple(sorted(m for m in marks if m > start))


class Generation:
    """A request on its slot. Only the batcher's thread calls its methods after `begin`."""

    def __init__(
        self,
        slot: Slot,
        prepared: PreparedPrompt,
        cancel: threading.Event,
        emit: Callable[[Event], None],
        on_done: Callable[[], None],
        peers: Sequence[Slot] = (),
        flush: Callable[[], None] = lambda: None,
    ) -> None:
        self.slot = slot
        self.peers = peers
        # Hands what `emit` and `on_done` queued to the listener; the batcher calls it once
        # per step, after the step's events are out.
        self.flush = flush
        self.prepared = prepared
        self.cancel = cancel
        self.emit = emit
        self.on_done = on_done
        self.reused = 0
        self.evaluated = 0  # prompt tokens in the KV cache, the reused ones included
        # Output not yet in the KV cache, decoded in the next batch: the token sampled last,
        # then any a grammar forced after it (jump-forward, speculation/jump.py).
        self.pending: list[int] = []
        self.draft: tuple[int, ...] = ()  # speculated to follow `pending`, to be verified
        self.speculator: Speculator | None = None
        self.output = 0
        self.sampler: Sampler | None = None
        self._router: OutputRouter | None = None
        self._decoder = TextStream()
        self._ended = False
        self._model: LoadedModel | None = None
        self.shared_from: int | None = None  # the slot whose prefix this one took
        self.decoded = False  # a llama_decode ran with this generation's tokens
        self.report: CacheReport | None = None  # how the prompt met the cache (begin)
        # The client hung up (set from the event loop). Still in its prompt, the generation then
        # becomes a background prefill: evaluated to the end only when nothing else runs, so
        # that the client's retry reads the whole prompt from the cache.
        self.hung_up = False
        self.background = False
        # Where the batcher checkpoints this prompt (none for a cache that cuts anywhere).
        self.marks: tuple[int, ...] = ()

    @property
    def next_token(self) -> int | None:
        """The last output token not yet decoded (None while the prompt is read)."""
        return self.pending[-1] if self.pending else None

    @next_token.setter
    def next_token(self, token: int | None) -> None:
        self.pending = [] if token is None else [token]

    @property
    def seq(self) -> int:
        return self.slot.index

    @property
    def position(self) -> int:
        """Where the next token goes in this slot's sequence."""
        return len(self.slot.tokens)

    @property
    def prompt_left(self) -> int:
        return len(self.prepared.tokens) - self.evaluated

    def begin(self, model: LoadedModel) -> None:
        """Trim the slot to the reused prefix and get ready to sample. May raise.

        When another slot (busy or not) holds a longer prefix of this prompt, such as the
        system prompt and tools of a second agent session or a subagent, this slot takes that
        prefix's cells: the same cells, shared in the unified KV cache, so neither the memory
        nor the work is repeated, and neither slot loses its cache.
        """
        self._model = model
        tokens = self.prepared.tokens
        donor, shared = best_donor(self.slot, self.peers, tokens)
        self.report = cache_report(tokens, donor, shared, model.token_text)
        read_from = self.slot
        own = shared if donor is self.slot else self.slot.shared_prefix(tokens)
        # With a cache per slot the prefix is copied, a copy of the donor's whole cache: only
        # worth it for more than a few tokens.
        if shared - own >= (1 if model.unified else COPY_MIN_TOKENS):
            got = model.share_prefix(donor.index, self.seq, shared, minimum=own)
            if got:
                self.slot.tokens = donor.tokens[:got]
                self.shared_from = donor.index
                own, read_from = got, donor
        # Reuse the cached prefix; keep at least one token to evaluate so logits are fresh.
        wanted = max(0, min(own, len(tokens) - 1))
        self.reused = model.forget(self.seq, wanted)
        del self.slot.tokens[self.reused :]
        self.evaluated = self.reused
        if model.strategy.checkpoints:
            self.marks = checkpoint_marks(len(tokens), self.reused, self.prepared.content_ends)
        self.report.cache_read_tokens = self.reused
        self.report.source = source(read_from, self.reused)
        self.slot.restored = False  # from now on it holds what this request evaluated
        self.emit(PromptCached(self.reused))
        sampling = self.prepared.request.sampling
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(31)
        self.sampler = Sampler(sampling, self.prepared.grammar, seed=seed, n_vocab=model.n_vocab)
        self._router = OutputRouter(self.prepared, self.emit)

    def go_background(self) -> bool:
        """After a hang-up: True when the prompt is still being read, and its evaluation goes
        on silently; False when the generation should end."""
        if self.output or self.next_token is not None or self.prompt_left == 0:
            return False
        self.background = True
        self.emit = lambda event: None
        return True

    def take_prompt(self, budget: int) -> tuple[int, ...]:
        """The next at most `budget` prompt tokens to evaluate (counted as evaluated)."""
        start = self.evaluated
        end = start + budget
        for mark in self.marks:
            if mark > start:
                end = min(end, mark)  # a chunk ends at a checkpoint
                break
        chunk = self.prepared.tokens[start:end]
        self.evaluated += len(chunk)
        return chunk

    def accept(self, model: LoadedModel, token: int) -> bool:
        """Take a sampled token; True when the generation is over."""
        router = self._router
        assert router is not None
        if model.is_end_of_generation(token):
            router.end_of_turn()
            return True
        self.output += 1
        if router.feed(self._decoder.feed(model.token_bytes(token)).text):
            return True
        if self.speculator is not None:
            self.speculator.record(token)
        if self.output >= self.prepared.max_tokens:
            return True
        self.pending.append(token)
        return False

    def finish(self) -> None:
        """The normal end: release held text and report the stop and usage."""
        router = self._router
        assert router is not None
        router.feed(self._decoder.finish())
        router.finish()
        self.emit(
            Finished(
                stop_reason=router.stop_reason,
                stop_sequence=router.stop_sequence,
                input_tokens=len(self.prepared.tokens),
                output_tokens=self.output,
                cache_read_tokens=self.reused,
            )
        )
        self.end()

    def fail(self, error: Exception) -> None:
        try:
            self.emit(Failed(error))
        finally:
            self.end()

    def end(self) -> None:
        """Free the sampler and hand the slot back; safe to call more than once."""
        if self._ended:
            return
        self._ended = True
        model = self._model
        if self.shared_from is not None and not self.decoded and model and not model.unified:
            # llama.cpp copies a cache per slot at the start of the next decode: if none ran,
            # the slot's cells were never written, and must not be reused.
            model.forget(self.seq, 0)
            self.slot.tokens.clear()
        if self.speculator is not None:
            self.speculator.close()
            self.speculator = None
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        self.on_done()
