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
from dataclasses import dataclass, field
from typing import Protocol

from pensieved.engine.generation import Generation
from pensieved.engine.llama import Batch
from pensieved.engine.model import LoadedModel
from pensieved.engine.speculation import SpecStats, SpeculationSetup, draft_budget
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
    speculation: SpecStats = field(default_factory=SpecStats)


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
        self.speculation = SpeculationSetup(
            model.settings.speculative,
            can_cut=model.cut_problem is None,
            why_not=model.cut_problem or "",
            stats=self.stats.speculation,
            draft_model=model.draft_model,
        )
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
        sampler = generation.sampler
        generation.speculator = self.speculation.speculator(
            generation.prepared.tokens,
            sampler.grammar if sampler else None,
            self._model,
            generation.seq,
        )
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
        self._draft(batch, room)
        adds = plan_step(batch, room, self.stats.steps)
        # (generation, batch index of its first logits or -1, tokens added to its sequence)
        plan: list[tuple[Generation, int, tuple[int, ...]]] = []
        n = prompt = 0
        put = self._batch.put
        for generation, tokens, logits in adds:
            if generation.next_token is None:
                prompt += len(tokens)
            start, first = generation.position, len(tokens) - logits
            for offset, token in enumerate(tokens):
                put(n + offset, token, start + offset, generation.seq, logits=offset >= first)
            plan.append((generation, n + first if logits else -1, tokens))
            n += len(tokens)
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

    def _draft(self, running: list[Generation], room: int) -> None:
        """Give drafting generations their drafts for this step, within the step's budget
        (see `draft_budget`): the other streams' tokens and prompts keep their room."""
        decoding = [g for g in running if g.pending]
        budget = draft_budget(sum(len(g.pending) for g in decoding), room)
        turn = self.stats.steps % len(decoding) if decoding else 0
        for generation in decoding[turn:] + decoding[:turn]:
            speculator = generation.speculator
            generation.draft = ()
            if speculator is None or not speculator.drafts or budget <= 0:
                continue
            if generation.output + len(generation.pending) < generation.prepared.max_tokens:
                generation.draft = speculator.draft(budget)
                budget -= len(generation.draft)

    def _make_room(self, running: list[Generation]) -> int:
        """Batch room this step, within the free cells of the KV cache.

        When the cache is full, idle slots give up cells (see kvpool.py); when running
        generations alone fill it, the newest is ended so the others can go on.
        """
        cells = self._model.cells
        while running:
            decoding = sum(len(g.pending) for g in running)
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
            draft, generation.draft = generation.draft, ()
            if generation.background:
                generation.end()  # the whole prompt is in the cache: the retry samples
                self._active.remove(generation)
                continue
            try:
                over = self._verify(generation, index, draft)
                if not over and generation.speculator is not None:
                    over = self._jump(generation)
                if over:
                    generation.finish()
            except Exception as exc:
                log.exception("sampling failed")
                generation.fail(exc)
                over = True
            if over:
                self._active.remove(generation)

    def _verify(self, generation: Generation, index: int, draft: tuple[int, ...]) -> bool:
        """Sample the position after the last pending token and, while each draft token is
        the one sampled before it, the position after that draft token too (the acceptance
        rule of speculation/base.py); drop the rejected draft positions from the KV cache.
        True when the generation is over."""
        sampler = generation.sampler
        assert sampler is not None  # begin() made it
        emitted_before = generation.output
        accepted = 0
        over = False
        for offset in range(len(draft) + 1):
            token = sampler.sample(self._model.context.handle, index + offset)
            over = generation.accept(self._model, token)
            if over or offset == len(draft) or token != draft[offset]:
                break
            accepted += 1
        # The accepted draft tokens are in the KV cache already: only the last token sampled
        # is decoded next.
        del generation.pending[:-1]
        if draft:
            rejected = len(draft) - accepted
            if rejected:
                keep = generation.position - rejected
                kept = self._model.forget(generation.seq, keep)
                del generation.slot.tokens[kept:]
                if kept != keep:
                    # Drafts run only where the memory can be cut, so this is a bug; the
                    # sequence no longer holds what the generation would go on from.
                    raise EngineError(
                        "the model's memory could not drop a rejected draft; retry the "
                        "request, and set model.speculative to off if it happens again"
                    )
            speculator = generation.speculator
            assert speculator is not None  # only its drafts are verified
            speculator.observe(len(draft), accepted)
        stats = self.speculation.stats
        stats.emitting_steps += 1
        stats.emitted += generation.output - emitted_before
        return over

    def _jump(self, generation: Generation) -> bool:
        """Emit what the grammar forces after the sampled token (speculation/jump.py); it is
        decoded with it in the next batch. True when the generation is over."""
        speculator = generation.speculator
        assert speculator is not None
        stats = self.speculation.stats
        for token in speculator.forced():
            stats.forced += 1
            stats.emitted += 1
            if generation.accept(self._model, token):
                return True
        return False

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
) -> list[tuple[Generation, tuple[int, ...], int]]:
    """What each generation adds to this step's batch, and how many of its last tokens want
    logits back.

    Output tokens come first, each stream's pending ones with its draft (logits at the last
    pending token and at every draft token); when there are more streams than batch room,
    which ones wait rotates with `step`. Prompt chunks fill the rest in arrival order, so the
    oldest prompt finishes first. The result is in sequence order: with a KV cache per slot,
    llama.cpp evaluates only runs of consecutive sequence ids in one pass. (A shared cache
    takes any order in one pass; what limits its step is the cache's free cells, which
    `capacity` already accounts for.)
    """
    room = capacity
    decoding = [g for g in running if g.pending]
    turn = step % len(decoding) if decoding else 0
    adds: list[tuple[Generation, tuple[int, ...], int]] = []
    # The sampled tokens of the streams still to come: a draft never takes their room.
    owed = sum(len(g.pending) for g in decoding)
    for generation in decoding[turn:] + decoding[:turn]:
        pending = generation.pending
        owed -= len(pending)
        if len(pending) > room:
            generation.draft = ()
            continue  # its turn comes when the rotation puts it first
        draft = generation.draft[: max(0, room - len(pending) - owed)]
        generation.draft = draft
        adds.append((generation, (*pending, *draft), 1 + len(draft)))
        room -= len(pending) + len(draft)
    for generation in running:
        if room <= 0:
            break
        if generation.next_token is None:
            chunk = generation.take_prompt(room)
            room -= len(chunk)
            adds.append((generation, chunk, int(generation.prompt_left == 0)))
    adds.sort(key=lambda add: add[0].seq)
    return adds
