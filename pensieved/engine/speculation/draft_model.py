"""Drafts from a second, small model of the target's family (`model.draft_model_path`).

The draft model keeps a KV sequence per slot that follows the target's: before drafting, the
sequence is cut back to what it shares with the slot's tokens (a rejected draft, a new
conversation) and fed what is new. It then decodes greedily, one token per step, for as long
as it is confident (`P_MIN`), and the tokens go to the target's batch to be verified like any
draft: kept while they are the token the target samples, so the output is unchanged.

A long new prompt is fed `n_batch` tokens per step rather than all at once, so that a
conversation's first draft does not hold the other slots' step for a whole prefill; the slot
drafts once its sequence has caught up.

Only the decode thread calls in here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pensieved.engine.llama import (
    Batch,
    CacheType,
    Context,
    ContextParams,
    FlashAttention,
    LlamaError,
    Model,
    logits_at,
)
from pensieved.engine.slots import common_prefix
from pensieved.engine.speculation.base import Proposal
from pensieved.errors import ModelLoadError

log = logging.getLogger("pensieved.engine")

# A draft stops at the first token the draft model gives less than this probability: past it,
# the target rarely agrees, and each rejected position costs the batch a slot's room.
# (llama-server's --draft-p-min default.)
P_MIN = 0.75
# Vocabularies may differ in padding at the end (Qwen2.5's 0.5B has 151936 entries, its 32B
# 152064); llama-server allows as much difference as this.
MAX_VOCAB_DIFFERENCE = 128


def vocabulary_mismatch(target: Model, draft: Model) -> str | None:
    """Why `draft`'s tokens are not `target`'s (None: they are), in a user's words."""
    n_target, n_draft = target.n_vocab(), draft.n_vocab()
    if abs(n_target - n_draft) > MAX_VOCAB_DIFFERENCE:
        return f"its vocabulary has {n_draft} tokens and the model's {n_target}"
    if (target.token_bos(), target.token_eos()) != (draft.token_bos(), draft.token_eos()):
        return "its start and end tokens are not the model's"
    for token in range(min(n_target, n_draft)):
        ours, theirs = (
            target.token_to_piece(token, special=True),
            draft.token_to_piece(token, special=True),
        )
        if ours != theirs:
            return f"token {token} is {theirs!r} in it and {ours!r} in the model"
    return None


class DraftModel:
    """A draft model loaded beside its target: its weights, one context, a sequence per slot."""

    def __init__(
        self,
        path: Path,
        target: Model,
        *,
        slots: int,
        n_ctx: int,
        n_batch: int,
        threads: int,
        gpu_layers: int,
        cache_type: CacheType,
        flash_attention: FlashAttention,
    ) -> None:
        if not path.is_file():
            raise ModelLoadError(
                f"draft model file not found: {path}; set model.draft_model_path to a GGUF "
                "file of the model's family, or to null"
            )
        try:
            weights = Model(path, gpu_layers=gpu_layers, mmap=False)
        except LlamaError as exc:
            raise ModelLoadError(f"cannot load draft model {path}: {exc}") from exc
        try:
            why = vocabulary_mismatch(target, weights) or weights.memory_cut_problem(swa_full=True)
            if why is not None:
                raise ModelLoadError(
                    f"cannot draft with {path.name}: {why}; set model.draft_model_path to a "
                    "smaller model of the same family (same tokenizer), or to null"
                )
            self.context = Context(
                weights,
                ContextParams(
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_threads=threads,
                    n_seq_max=slots,
                    kv_unified=True,
                    cache_type=cache_type,
                    flash_attention=flash_attention,
                    swa_full=True,
                ),
            )
        except (LlamaError, ModelLoadError) as exc:
            weights.close()
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"cannot load draft model {path}: {exc}") from exc
        self.weights = weights
        self.path = path
        self.name = path.name
        self._n_batch = n_batch
        self._batch = Batch(n_batch)
        # Tokens whose logits a draft may be taken from: both vocabularies have them.
        self._shared = min(target.n_vocab(), weights.n_vocab())
        self._n_vocab = weights.n_vocab()
        self._held: dict[int, list[int]] = {}  # per sequence: the tokens in its cells

    def propose(self, seq: int, tokens: Sequence[int], k: int) -> tuple[int, ...]:
        """Up to `k` tokens the draft model expects after `tokens` on sequence `seq`; none
        while the sequence is still catching up with a long new prompt."""
        if k <= 0 or not tokens:
            return ()
        held = self._held.setdefault(seq, [])
        same = common_prefix(held, tokens)
        # The last token is fed again when nothing after it is: its logits are the first draft.
        same = min(same, len(tokens) - 1)
        if same < len(held):
            if not self.context.seq_rm(seq, same, -1):
                self._clear(seq)
                same = 0
            del held[same:]
        new = tokens[same:]
        if len(new) > self._n_batch:
            self._feed(seq, new[: self._n_batch], logits=False)
            return ()
        if not self._feed(seq, new, logits=True):
            return ()
        drafted: list[int] = []
        index = len(new) - 1  # the batch entry with logits
        while True:
            token, probability = self._best(index)
            if probability < P_MIN:
                break
            drafted.append(token)
            if len(drafted) >= k or not self._feed(seq, (token,), logits=True):
                break
            index = 0
        return tuple(drafted)

    def _best(self, index: int) -> tuple[int, float]:
        """The draft model's most likely next token at batch `index`, and its probability."""
        logits = logits_at(self.context.handle, index, self._n_vocab)[: self._shared]
        token = int(np.argmax(logits))
        probability = float(1.0 / np.exp(logits - logits[token]).sum())
        return token, probability

    def _feed(self, seq: int, tokens: Sequence[int], *, logits: bool) -> bool:
        """Decode `tokens` after what `seq` holds, logits at the last one if asked. A full
        cache drops the other sequences (they are only a head start) and tries once more."""
        held = self._held[seq]
        start = len(held)
        for attempt in range(2):
            for i, token in enumerate(tokens):
                self._batch.put(i, token, start + i, seq, logits=logits and i == len(tokens) - 1)
            status = self.context.decode(self._batch, len(tokens))
            if status == 0:
                held.extend(tokens)
                return True
            if attempt == 0 and status == 1:
                for other in list(self._held):
                    if other != seq:
                        self._clear(other)
                continue
            break
        log.warning("draft model %s: llama_decode status %d; no draft this step", self.name, status)
        self._clear(seq)
        return False

    def _clear(self, seq: int) -> None:
        self.context.seq_rm(seq, -1, -1)
        self._held[seq] = []

    def close(self) -> None:
        self._batch.close()
        self.context.close()
        self.weights.close()


class DraftModelSpeculation:
    """One generation's use of the draft model, on its slot's sequence."""

    name = "draft"

    def __init__(self, model: DraftModel, seq: int) -> None:
        self._model = model
        self._seq = seq

    def propose(self, tokens: Sequence[int], k: int) -> Proposal | None:
        drafted = self._model.propose(self._seq, tokens, k)
        return Proposal(drafted, kind=self.name) if drafted else None

    def observe(self, proposed: int, accepted: int) -> None:
        """The draft model has no state to adapt: the slot's draft length does that."""
