"""Continuous batching: one thread per model decodes every running generation together.

Each step builds one llama_batch: the next token of every generation that is producing output,
then as many prompt tokens of generations still reading their prompt as fit in `batch_size`
(oldest request first). One `llama_decode` evaluates them all, each on its own KV sequence;
then every generation that got logits samples its next token at its index in the batch. On a
CPU the weights are read once per step instead of once per stream, which is where the
aggregate throughput of several clients comes from.

Cancellation is checked before every step, so a client that went away frees its slot within
one step. The thread never touches the event loop: generations report through their `emit`
and `on_done` callbacks, which the scheduler makes thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from pensieved.engine.generation import Generation
from pensieved.engine.llama import Batch
from pensieved.engine.model import LoadedModel
from pensieved.errors import EngineError, KvCacheFullError

log = logging.getLogger("pensieved.engine")


@dataclass
class DecodeStats:
    """Counters of the decode thread, for `status` and for measuring the Python overhead."""

    steps: int = 0
    tokens: int = 0  # batch entries: prompt tokens plus generated ones
    llama_s: float = 0.0  # inside llama_decode
    python_s: float = 0.0  # the rest of each step: batch building, sampling, text, events
    # The prompt tokens among them, and their share of llama_decode's time (a step's time split
    # by its tokens): the measured prefill rate `pensievectl claude` sizes timeouts from.
    prompt_tokens: int = 0
    prompt_s: float = 0.0


class Runner(Protocol):
    """What the scheduler hands generations to."""

    stats: DecodeStats

    def submit(self, generation: Generation) -> None: ...

    def close(self) -> None: ...


class Batcher:
    def __init__(self, model: LoadedModel) -> None:
        self._model = model
        self._capacity = model.n_batch
        self._batch = Batch(self._capacity)
        self._inbox: deque[Generation] = deque()
        self._active: list[Generation] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self.stats = DecodeStats()
        self._thread = threading.Thread(
            target=self._run, name=f"pensieve-decode-{model.name}", daemon=True
        )
        self._thread.start()

    def submit(self, generation: Generation) -> None:
        with self._wakeup:
            if not self._stopping:
                self._inbox.append(generation)
                self._wakeup.notify()
                return
        generation.end()  # the model is being unloaded: nothing will run it
        generation.flush()

    def close(self) -> None:
        """Stop the thread; generations still running end as if cancelled."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()
        self._batch.close()

    # ---- the decode thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._inbox and not self._active and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    leftovers = [*self._active, *self._inbox]
                    self._active.clear()
                    self._inbox.clear()
                    break
                arrivals = list(self._inbox)
                self._inbox.clear()
            touched = arrivals + self._active
            try:
                for generation in arrivals:
                    self._begin(generation)
                # PromptCached out now, not after a prompt chunk that may take seconds: the
                # stream's message_start waits for it.
                _flush(arrivals)
                self._step()
            except Exception as exc:
                # A bug, not a decode failure (those end only their own batch's requests):
                # end everything running, so no slot stays taken, and keep serving.
                log.exception("decode loop failed")
                for generation in self._active:
                    self._reset_slot(generation)
                    generation.fail(exc)
                self._active.clear()
            _flush(touched)
        for generation in leftovers:
            generation.end()
        _flush(leftovers)

    def _begin(self, generation: Generation) -> None:
        if generation.cancel.is_set():
            generation.end()
            return
        try:
            generation.begin(self._model)
        except Exception as exc:
            if not isinstance(exc, EngineError):
                log.exception("generation could not start")
            generation.fail(exc)
            return
        self._active.append(generation)

    def _step(self) -> None:
        started = time.perf_counter()
        running = []
        for generation in self._active:
            if generation.cancel.is_set():
                generation.end()
            elif generation.hung_up and not generation.background:
                if generation.go_background():
                    log.info(
                        "slot %d: the client hung up during prefill; its remaining %d prompt "
                        "tokens are evaluated in the background for a retry",
                        generation.seq,
                        generation.prompt_left,
                    )
                    running.append(generation)
                else:
                    generation.end()
            else:
                running.append(generation)
        self._active = running
        # Background prefills take the batch only when nothing else runs.
        batch = [g for g in running if not g.background] or running
        if not batch:
            return
        room = self._make_room(batch)
        if room <= 0:
            return
        adds = plan_step(batch, room, self.stats.steps)
        # (generation, batch index of its logits or -1, tokens it added to its sequence)
        plan: list[tuple[Generation, int, tuple[int, ...]]] = []
        n = prompt = 0
        put = self._batch.put
        for generation, tokens, wants_logits in adds:
            if generation.next_token is None:
                prompt += len(tokens)
            start, final = generation.position, len(tokens) - 1
            for offset, token in enumerate(tokens):
                logits = wants_logits and offset == final
                put(n + offset, token, start + offset, generation.seq, logits=logits)
            n += len(tokens)
            plan.append((generation, n - 1 if wants_logits else -1, tokens))
        before = time.perf_counter()
        try:
            self._decode(n)
        except EngineError as exc:
            log.error("%s", exc)
            for generation, _, _ in plan:
                self._reset_slot(generation)
                generation.fail(exc)
                self._active.remove(generation)
            return
        after = time.perf_counter()
        cells = self._model.cells
        for generation, _, added in plan:
            generation.decoded = True
            generation.slot.tokens.extend(added)
            cells.append(generation.seq, len(added))
            if generation.position in generation.marks:
                self._model.checkpoint(generation.seq)
        self._sample(plan)
        stats = self.stats
        stats.steps += 1
        stats.tokens += n
        stats.llama_s += after - before
        if prompt:
            stats.prompt_tokens += prompt
            stats.prompt_s += (after - before) * prompt / n
        stats.python_s += time.perf_counter() - after + before - started

    def _make_room(self, running: list[Generation]) -> int:
        """Batch room this step, within the free cells of the KV cache.

        When the cache is full, idle slots give up cells (see kvpool.py); when running
        generations alone fill it, the newest is ended so the others can go on.
        """
        cells = self._model.cells
        while running:
            decoding = sum(1 for g in running if g.next_token is not None)
            reading = sum(g.prompt_left for g in running if g.next_token is None)
            wanted = min(self._capacity, decoding + reading)
            if wanted > cells.free:
                self._evict(running, wanted)
            # Every sampled token needs its cell; a prompt needs at least one to progress.
            if cells.free >= max(decoding, 1):
                return min(self._capacity, cells.free)
            waiting = [g for g in self._active if g.background and g not in running]
            if waiting:
                # A background prefill is the first to give way: its cells become evictable.
                for generation in waiting:
                    generation.end()
                    self._active.remove(generation)
                continue
            newest = running.pop()  # it leaves the batch here
            if newest in self._active:
                self._active.remove(newest)
            log.warning(
                "KV cache full (%d cells, all held by %d running requests): ending the newest",
                cells.capacity,
                len(running) + 1,
            )
            kept = self._model.forget(newest.seq, cells.private_from(newest.seq))
            del newest.slot.tokens[kept:]
            newest.fail(KvCacheFullError(cells.capacity, len(running) + 1))
        return 0

    def _evict(self, running: list[Generation], wanted: int) -> None:
        peers = running[0].peers
        busy = {g.seq for g in self._active}  # background prefills included
        idle = sorted(
            (slot for slot in peers if slot.index not in busy and slot.tokens),
            key=lambda slot: slot.last_used,
        )
        by_index = {slot.index: slot for slot in idle}
        for eviction in self._model.cells.plan_eviction(wanted, by_index):
            slot = by_index[eviction.index]
            kept = self._model.forget(slot.index, eviction.keep)
            log.info(
                "KV cache full: slot %d keeps %d of its %d cached tokens",
                slot.index,
                kept,
                len(slot.tokens),
            )
            del slot.tokens[kept:]

    def _decode(self, n: int) -> None:
        status = self._model.context.decode(self._batch, n)
        if status != 0:
            # 1: no room in the KV cache (prompts are fitted to a slot, so this is a bug);
            # 2: aborted; below 0: a backend error. The batch's sequences are in doubt.
            raise EngineError(
                f"the model failed to evaluate this request (llama_decode status {status}); "
                "retry it, and see the pensieved log if it happens again"
            )

    def _sample(self, plan: list[tuple[Generation, int, tuple[int, ...]]]) -> None:
        for generation, index, _ in plan:
            if index < 0:
                continue
            generation.next_token = None
            if generation.background:
                generation.end()  # the whole prompt is in the cache: the retry samples
                self._active.remove(generation)
                continue
            try:
                sampler = generation.sampler
                assert sampler is not None  # begin() made it
                token = sampler.sample(self._model.context.handle, index)
                over = generation.accept(self._model, token)
                if over:
                    generation.finish()
            except Exception as exc:
                log.exception("sampling failed")
                generation.fail(exc)
                over = True
            if over:
                self._active.remove(generation)

    def _reset_slot(self, generation: Generation) -> None:
        """Forget a sequence whose KV state is in doubt after a failed decode."""
        self._model.forget(generation.seq, 0)
        generation.slot.tokens.clear()


def _flush(generations: list[Generation]) -> None:
    """Hand the events of a step over, once per listener (requests share their scheduler's)."""
    for flush in {generation.flush for generation in generations}:
        flush()


def plan_step(
    running: list[Generation], capacity: int, step: int
) -> list[tuple[Generation, tuple[int, ...], bool]]:
    """What each generation adds to this step's batch, and whether it wants logits back.

    Sampled tokens come first (when there are more streams than batch room, which ones wait
    rotates with `step`); prompt chunks fill the rest in arrival order, so the oldest prompt
    finishes first. The result is in sequence order: with a KV cache per slot, llama.cpp
    evaluates only runs of consecutive sequence ids in one pass. (A shared cache takes any
    order in one pass; what limits its step is the cache's free cells, which `capacity`
    already accounts for.)
    """
    room = capacity
    decoding = [g for g in running if g.next_token is not None]
    if len(decoding) > room:
        turn = step % len(decoding)
        decoding = (decoding[turn:] + decoding[:turn])[:room]
    adds: list[tuple[Generation, tuple[int, ...], bool]] = [
        (g, (g.next_token,), True) for g in decoding if g.next_token is not None
    ]
    room -= len(adds)
    for generation in running:
        if room <= 0:
            break
        if generation.next_token is None:
            chunk = generation.take_prompt(room)
            room -= len(chunk)
            adds.append((generation, chunk, generation.prompt_left == 0))
    adds.sort(key=lambda add: add[0].seq)
    return adds
