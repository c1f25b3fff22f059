"""One request's generation: its slot, prompt, sampler, and what its tokens turn into.

A `Generation` is driven by the batcher's thread (see `batcher.py`), which decodes all running
generations of a model together. Here is what is particular to one request: which prompt tokens
still need evaluating, sampling its next token, and routing the text to events.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pensieved.engine.grammar_cache import ParsedGrammar
from pensieved.engine.model import LoadedModel
from pensieved.engine.textstream import TextStream
from pensieved.engine.thinking import ThinkSplitter
from pensieved.engine.tools import ParsedText, ToolCallParser
from pensieved.engine.types import (
    Event,
    Failed,
    Finished,
    PreparedPrompt,
    PromptCached,
    Sampling,
    StopReason,
    TextPiece,
    ThinkingPiece,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)


@dataclass
class Slot:
    """One KV sequence of the model's context and the tokens it holds."""

    index: int
    tokens: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False

    def shared_prefix(self, tokens: tuple[int, ...]) -> int:
        cached = self.tokens
        n = min(len(cached), len(tokens))
        i = 0
        while i < n and cached[i] == tokens[i]:
            i += 1
        return i


# A copy moves the donor's whole KV stream (all `context_size` cells, whatever it holds) at
# the start of the next decode step: a memory copy of a few ms on a Mac's GPU, tens of ms on
# a CPU, against 10-20 ms per prompt token evaluated on a laptop CPU (less on a GPU). Below
# this many tokens gained, evaluating them costs about as much as the copy.
FORK_MIN_TOKENS = 32


def best_donor(slot: Slot, peers: Sequence[Slot], tokens: tuple[int, ...]) -> tuple[Slot, int]:
    """The slot sharing the longest prefix with `tokens` (`slot` itself on ties)."""
    best, shared = slot, slot.shared_prefix(tokens)
    for peer in peers:
        if peer is not slot:
            n = peer.shared_prefix(tokens)
            if n > shared:
                best, shared = peer, n
    return best, shared


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
        self.next_token: int | None = None  # sampled, to be decoded in the next batch
        self.output = 0
        self.sampler: Any = None
        self._router: OutputRouter | None = None
        self._decoder = TextStream()
        self._ended = False
        self._model: LoadedModel | None = None
        # A copied KV stream only lands at the next decode: until one ran, the copy is unsafe
        # to keep (see `end`).
        self.forked = False
        self.decoded = False

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

        When another slot (busy or not) holds a much longer prefix of this prompt, such as the
        system prompt and tools of a second agent session or a subagent, its KV stream is
        copied here first, so both share the work already done and neither loses its cache.
        """
        self._model = model
        tokens = self.prepared.tokens
        donor, shared = best_donor(self.slot, self.peers, tokens)
        own = shared if donor is self.slot else self.slot.shared_prefix(tokens)
        if shared - own >= FORK_MIN_TOKENS:
            model.copy_sequence(donor.index, self.seq)
            self.slot.tokens = donor.tokens[:shared]
            self.forked = True
            own = shared
        # Reuse the cached prefix; keep at least one token to evaluate so logits are fresh.
        wanted = max(0, min(own, len(tokens) - 1))
        self.reused = model.forget(self.seq, wanted)
        del self.slot.tokens[self.reused :]
        self.evaluated = self.reused
        self.emit(PromptCached(self.reused))
        sampling = self.prepared.request.sampling
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(31)
        self.sampler = build_sampler(sampling, self.prepared.grammar, seed=seed)
        self._router = OutputRouter(self.prepared, self.emit)

    def take_prompt(self, budget: int) -> tuple[int, ...]:
        """The next at most `budget` prompt tokens to evaluate (counted as evaluated)."""
        start = self.evaluated
        chunk = self.prepared.tokens[start : start + budget]
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
        if self.output >= self.prepared.max_tokens:
            return True
        self.next_token = token
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
        if self.forked and not self.decoded and self._model is not None:
            self._model.forget(self.seq, 0)
            self.slot.tokens.clear()
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        self.on_done()


def build_sampler(sampling: Sampling, grammar: ParsedGrammar | None, *, seed: int) -> Any:
    """The sampler chain of `Llama._init_sampler`, with a copy of `grammar` first."""
    import importlib

    # llama-cpp-python has partial annotations; treat its sampler API as untyped.
    internals: Any = importlib.import_module("llama_cpp._internals")
    llama_cpp: Any = importlib.import_module("llama_cpp.llama_cpp")

    sampler = internals.LlamaSampler()
    if grammar is not None:
        try:
            pointer = grammar.clone()
        except BaseException:
            sampler.close()
            raise
        llama_cpp.llama_sampler_chain_add(sampler.sampler, pointer)  # the chain owns it now
    if sampling.temperature == 0.0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(sampling.top_k)
        sampler.add_top_p(sampling.top_p, 1)
        sampler.add_min_p(0.0, 1)
        sampler.add_temp(sampling.temperature)
        sampler.add_dist(seed)
    return sampler


class OutputRouter:
    """Generated text in, events out: reasoning, visible text, tool calls; decides the stop.

    Order matters: `<think>` blocks are split off first, tool calls next, and stop sequences
    are matched in the visible text only, so a stop sequence can never cut a tool call apart.
    """

    def __init__(self, prepared: PreparedPrompt, emit: Callable[[Event], None]) -> None:
        request = prepared.request
        self._emit = emit
        self._stops = request.stop_sequences
        self._visible = TextStream(self._stops)
        self._think = ThinkSplitter(start_open=prepared.thinking_open)
        self._show_thinking = request.thinking
        self._no_tools = request.tool_choice.mode == "none"
        self._parallel = request.tool_choice.parallel
        self._parser: ToolCallParser | None = None
        if request.tools and request.output_schema is None:
            names = () if self._no_tools else tuple(t.name for t in request.tools)
            self._parser = ToolCallParser(names)
        self.stop_reason: StopReason = "max_tokens"
        self.stop_sequence: str | None = None
        self.done = False
        self._dropped = False
        self._after_call = False

    def feed(self, text: str) -> bool:
        """Route `text`; True when generation should stop here."""
        if self.done or not text:
            return self.done
        for thinking, piece in self._think.feed(text):
            self._route(thinking, piece)
            if self.done:
                break
        return self.done

    def _route(self, thinking: bool, piece: str) -> None:
        if thinking:
            if self._show_thinking:
                self._emit(ThinkingPiece(piece))
            return
        if self._parser is None:
            self._text(piece)
            return
        for parsed in self._parser.feed(piece):
            self._parsed(parsed)
            if self.done:
                return
        if self._no_tools and self._parser.in_call:
            # tool_choice none: the reply ends where the model tried to call a tool.
            self._flush_visible()
            self._stop("end_turn")

    def _parsed(self, parsed: object) -> None:
        if isinstance(parsed, ParsedText):
            self._text(parsed.text)
        elif isinstance(parsed, ToolCallStart):
            self._flush_visible()
            self._emit(parsed)
        elif isinstance(parsed, ToolCallDelta):
            self._emit(parsed)
        elif isinstance(parsed, ToolCallEnd):
            self._emit(parsed)
            self._after_call = True
            if parsed.complete and not self._parallel:
                self._stop("tool_use")

    def _text(self, text: str) -> None:
        if self._after_call:
            # The line breaks between and after calls would be whitespace-only text blocks.
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        out = self._visible.feed(text.encode())
        if out.text:
            self._emit(TextPiece(out.text))
        if out.stop_sequence is not None:
            self.stop_sequence = out.stop_sequence
            self._stop("stop_sequence")

    def _flush_visible(self) -> None:
        tail = self._visible.finish()
        if tail:
            self._emit(TextPiece(tail))
        self._visible = TextStream(self._stops)

    def _stop(self, reason: StopReason) -> None:
        """Stop here and show nothing more (stop sequence, finished call, refused call)."""
        self.stop_reason = reason
        self.done = True
        self._dropped = True

    def end_of_turn(self) -> None:
        self.stop_reason = "end_turn"
        self.done = True

    def finish(self) -> None:
        """Release held text and close a tool call the output ended inside of."""
        if not self._dropped:
            for thinking, piece in self._think.finish():
                self._route(thinking, piece)
        parser = self._parser
        if not self._dropped and parser is not None and not (self._no_tools and parser.in_call):
            for parsed in parser.finish():
                self._parsed(parsed)
        if not self._dropped:
            self._flush_visible()
        calls = self._parser.calls if self._parser is not None else 0
        if self.stop_reason == "end_turn" and calls and not self._no_tools:
            self.stop_reason = "tool_use"
