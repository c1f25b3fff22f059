"""The token loop: evaluate the prompt on a slot, sample, stream text, stop.

Runs on a worker thread, never on the event loop. Every decode step takes the model's compute
lock, so concurrent requests interleave step by step, and checks the cancel flag, so a client
that went away frees its slot within one step.
"""

from __future__ import annotations

import ctypes
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pensieved.engine.model import LoadedModel
from pensieved.engine.textstream import TextStream
from pensieved.engine.thinking import ThinkSplitter
from pensieved.engine.tools import (
    TOOL_CALL_OPEN,
    ParsedText,
    ToolCallParser,
)
from pensieved.engine.types import (
    Event,
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
from pensieved.errors import GrammarError


class Cancelled(Exception):
    """The request was abandoned (client gone, timeout, shutdown) mid-generation."""


@dataclass
class Slot:
    """One llama.cpp context and what its KV cache holds."""

    index: int
    llm: Any
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False

    def cached_tokens(self) -> list[int]:
        return [int(t) for t in self.llm._input_ids]

    def shared_prefix(self, tokens: tuple[int, ...]) -> int:
        cached = self.llm._input_ids
        n = min(len(cached), len(tokens))
        i = 0
        while i < n and cached[i] == tokens[i]:
            i += 1
        return i


@dataclass
class GenerationStats:
    prompt_eval_s: float = 0.0
    generate_s: float = 0.0
    output_tokens: int = 0


def run_generation(
    model: LoadedModel,
    slot: Slot,
    prepared: PreparedPrompt,
    cancel: threading.Event,
    emit: Callable[[Event], None],
) -> GenerationStats:
    """Generate on `slot`; emits TextPiece events then one Finished. Raises Cancelled."""
    llm = slot.llm
    tokens = prepared.tokens
    stats = GenerationStats()
    started = time.perf_counter()
    # Reuse the cached prefix; keep at least one token to evaluate so logits are fresh.
    reused = min(slot.shared_prefix(tokens), len(tokens) - 1)
    llm.n_tokens = reused
    emit(PromptCached(reused))
    pending = list(tokens[reused:])
    step = model.settings.batch_size
    for start in range(0, len(pending), step):
        if cancel.is_set():
            raise Cancelled
        with model.compute_lock:
            llm.eval(pending[start : start + step])
    stats.prompt_eval_s = time.perf_counter() - started

    sampling = prepared.request.sampling
    llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
    llm._sampler = build_sampler(llm, sampling, prepared.grammar, lazy=prepared.grammar_lazy)
    # Bytes to text: decoding only; stop sequences apply later, to visible text alone.
    decoder = TextStream()
    router = OutputRouter(prepared, emit)
    output = 0
    try:
        while output < prepared.max_tokens:
            if cancel.is_set():
                raise Cancelled
            with model.compute_lock:
                token = llm.sample()
            if model.is_end_of_generation(token):
                router.end_of_turn()
                break
            output += 1
            if router.feed(decoder.feed(model.token_bytes(token)).text):
                break
            if output >= prepared.max_tokens:
                break
            with model.compute_lock:
                llm.eval([token])
    finally:
        llm._sampler = None
    router.feed(decoder.finish())
    router.finish()
    stats.output_tokens = output
    stats.generate_s = time.perf_counter() - started - stats.prompt_eval_s
    emit(
        Finished(
            stop_reason=router.stop_reason,
            stop_sequence=router.stop_sequence,
            input_tokens=len(tokens),
            output_tokens=output,
            cache_read_tokens=reused,
        )
    )
    return stats


def build_sampler(llm: Any, sampling: Sampling, grammar: str | None, *, lazy: bool) -> Any:
    """The sampler chain of `Llama._init_sampler`, with an optional (lazy) grammar first."""
    import importlib

    # llama-cpp-python has partial annotations; treat its sampler API as untyped.
    internals: Any = importlib.import_module("llama_cpp._internals")
    llama_cpp: Any = importlib.import_module("llama_cpp.llama_cpp")

    sampler = internals.LlamaSampler()
    if grammar:
        vocab = llm._model.vocab
        if lazy:
            patterns = (ctypes.c_char_p * 1)(re.escape(TOOL_CALL_OPEN).encode())
            tokens = (llama_cpp.llama_token * 0)()
            pointer = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                vocab, grammar.encode(), b"root", patterns, 1, tokens, 0
            )
        else:
            pointer = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not pointer:
            sampler.close()
            raise GrammarError("llama.cpp rejected the output grammar")
        llama_cpp.llama_sampler_chain_add(sampler.sampler, pointer)
    if sampling.temperature == 0.0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(sampling.top_k)
        sampler.add_top_p(sampling.top_p, 1)
        sampler.add_min_p(0.0, 1)
        sampler.add_temp(sampling.temperature)
        sampler.add_dist(llm._seed)
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
