"""The token loop: evaluate the prompt on a slot, sample, stream text, stop.

Runs on a worker thread, never on the event loop. Every decode step takes the model's compute
lock, so concurrent requests interleave step by step, and checks the cancel flag, so a client
that went away frees its slot within one step.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pensieved.engine.model import LoadedModel
from pensieved.engine.textstream import TextStream
from pensieved.engine.types import Event, Finished, PreparedPrompt, StopReason, TextPiece


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
    llm._sampler = llm._init_sampler(
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        min_p=0.0,
        typical_p=1.0,
        temp=sampling.temperature,
    )
    text = TextStream(prepared.request.stop_sequences)
    stop_reason: StopReason = "max_tokens"
    stop_sequence: str | None = None
    output = 0
    try:
        while output < prepared.max_tokens:
            if cancel.is_set():
                raise Cancelled
            with model.compute_lock:
                token = llm.sample()
            if model.is_end_of_generation(token):
                stop_reason = "end_turn"
                break
            output += 1
            piece = text.feed(model.token_bytes(token))
            if piece.text:
                emit(TextPiece(piece.text))
            if piece.stop_sequence is not None:
                stop_reason, stop_sequence = "stop_sequence", piece.stop_sequence
                break
            if output >= prepared.max_tokens:
                break
            with model.compute_lock:
                llm.eval([token])
    finally:
        llm._sampler = None
    if stop_sequence is None:
        tail = text.finish()
        if tail:
            emit(TextPiece(tail))
    stats.output_tokens = output
    stats.generate_s = time.perf_counter() - started - stats.prompt_eval_s
    emit(
        Finished(
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            input_tokens=len(tokens),
            output_tokens=output,
            cache_read_tokens=reused,
        )
    )
    return stats
