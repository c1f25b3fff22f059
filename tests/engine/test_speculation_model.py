"""Speculation on the bundled model, in-process: real logits, real KV cache, real grammars.

Greedy output must be the same token for token with and without drafts; a seeded sampled
one too (each emitted token draws one random number either way).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pensieve.paths import bundled_model_path
from pensieved.engine.batcher import Batcher
from pensieved.engine.dialects import DIALECTS, Dialect
from pensieved.engine.generation import Generation
from pensieved.engine.grammar import request_grammar, tool_call_grammar
from pensieved.engine.model import LoadedModel, ModelSettings
from pensieved.engine.sampler import Sampler
from pensieved.engine.slots import Slot
from pensieved.engine.speculation import (
    DraftModel,
    JumpForward,
    SpeculationMode,
    SpeculationSetup,
)
from pensieved.engine.types import (
    ChatMessage,
    Event,
    Finished,
    GenerationRequest,
    PreparedPrompt,
    Sampling,
    TextPiece,
    ToolCallEnd,
    ToolChoice,
    ToolSpec,
)
from pensieved.errors import ModelLoadError

GEMMA = Path(__file__).resolve().parents[2] / ".venv" / "models" / "gemma-3-270m-q4_k_m.gguf"
SOURCE = '''class Ledger:
    """Money in and out of one account."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.entries: list[tuple[str, int]] = []

    def deposit(self, what: str, cents: int) -> None:
        self.entries.append((what, cents))

    def withdraw(self, what: str, cents: int) -> None:
        self.entries.append((what, -cents))

    def balance(self) -> int:
        return sum(cents for _, cents in self.entries)
'''
COPY = f"Copy this code exactly, adding a comment at the top:\n\n{SOURCE}"
PROMPTS = (
    COPY,
    "Write a very long story about a lighthouse keeper.",
    "List the numbers from one to thirty, then the same list again.",
)
EDIT = ToolSpec(
    "Edit",
    "Replace old_string with new_string in a file.",
    {
        "type": "object",
        "properties": {
            "file_path": {"type": "string"},
            "old_string": {"type": "string"},
            "new_string": {"type": "string"},
        },
        "required": ["file_path", "old_string", "new_string"],
    },
)


Engine = tuple[LoadedModel, Batcher, list[Slot]]


@dataclass
class Run:
    tokens: list[int]  # what the KV cache holds after the prompt: the output but its last
    text: str
    steps: int
    events: list[Event]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled model is not installed")
    settings = ModelSettings(
        path=path, context_size=2048, gpu_layers=0, threads=1, batch_size=256, slots=4
    )
    model = LoadedModel(settings)
    batcher = Batcher(model)
    yield model, batcher, [Slot(i) for i in range(model.slots)]
    batcher.close()
    model.close()


def prepare(
    model: LoadedModel,
    text: str,
    max_tokens: int,
    *,
    sampling: Sampling | None = None,
    tools: tuple[ToolSpec, ...] = (),
    choice: ToolChoice | None = None,
) -> PreparedPrompt:
    request = GenerationRequest(
        messages=(ChatMessage("user", text),),
        max_tokens=max_tokens,
        sampling=sampling or Sampling(temperature=0.0),
        tools=tools,
        tool_choice=choice or ToolChoice(),
    )
    chatml = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    grammar, lazy = request_grammar(request)
    parsed = model.parsed_grammar(grammar, lazy=lazy) if grammar else None
    tokens = tuple(model.tokenize(chatml, special=True))
    return PreparedPrompt(request, tokens, max_tokens, grammar=parsed)


def use(
    batcher: Batcher, model: LoadedModel, mode: SpeculationMode, draft: DraftModel | None = None
) -> None:
    stats = batcher.stats.speculation
    batcher.speculation = SpeculationSetup(
        mode, can_cut=model.cut_problem is None, stats=stats, draft_model=draft
    )


def draft_model(model: LoadedModel, path: Path) -> DraftModel:
    return DraftModel(
        path,
        model.weights,
        slots=model.slots,
        n_ctx=model.pool_tokens,
        n_batch=model.n_batch,
        threads=1,
        gpu_layers=0,
        cache_type="f16",
        flash_attention=model.flash_attention,
    )


def start(
    slot: Slot, model: LoadedModel, prepared: PreparedPrompt
) -> tuple[Generation, threading.Event, list[Event]]:
    model.forget(slot.index, 0)
    slot.tokens.clear()
    done, events = threading.Event(), list[Event]()
    generation = Generation(slot, prepared, threading.Event(), events.append, done.set)
    return generation, done, events


def run(
    engine: Engine,
    prepared: PreparedPrompt,
    mode: SpeculationMode,
    draft: DraftModel | None = None,
) -> Run:
    model, batcher, slots = engine
    use(batcher, model, mode, draft)
    generation, done, events = start(slots[0], model, prepared)
    before = batcher.stats.steps
    batcher.submit(generation)
    assert done.wait(300)
    text = "".join(e.text for e in events if isinstance(e, TextPiece))
    kept = slots[0].tokens[len(prepared.tokens) :]
    return Run(kept, text, batcher.stats.steps - before, events)


def test_greedy_output_is_the_same_with_drafts_and_copying_takes_fewer_steps(
    engine: Engine,
) -> None:
    model, batcher, _ = engine
    stats = batcher.stats.speculation
    for text in PROMPTS:
        prepared = prepare(model, text, 96)
        plain = run(engine, prepared, "off")
        accepted = stats.accepted
        drafted = run(engine, prepared, "ngram")
        assert drafted.tokens == plain.tokens, text
        assert drafted.text == plain.text
        if text is COPY:
            assert stats.accepted > accepted
            assert drafted.steps < plain.steps


def test_seeded_sampling_draws_the_same_output_with_drafts(engine: Engine) -> None:
    model, _, _ = engine
    prepared = prepare(model, COPY, 64, sampling=Sampling(temperature=0.7, seed=11))
    assert run(engine, prepared, "ngram").tokens == run(engine, prepared, "off").tokens


def test_a_draft_model_drafts_where_nothing_is_copied_and_greedy_output_is_unchanged(
    engine: Engine,
) -> None:
    model, batcher, _ = engine
    # The model drafting for itself: the drafts are what the target samples, so nearly all
    # are kept, and prose that copies nothing is decoded in fewer steps.
    draft = draft_model(model, model.settings.path)
    stats = batcher.stats.speculation
    try:
        for text in PROMPTS:
            prepared = prepare(model, text, 96)
            plain = run(engine, prepared, "off")
            accepted = stats.accepted
            drafted = run(engine, prepared, "draft", draft)
            assert drafted.tokens == plain.tokens, text
            assert stats.accepted > accepted
            assert drafted.steps < plain.steps
        # A second conversation on the same slot: the draft's sequence is cut back to what
        # the two share, and drafting goes on from there.
        seeded = prepare(model, COPY, 48, sampling=Sampling(temperature=0.7, seed=5))
        assert run(engine, seeded, "draft", draft).tokens == run(engine, seeded, "off").tokens
    finally:
        draft.close()


def test_a_draft_model_with_another_vocabulary_is_refused(engine: Engine) -> None:
    model, _, _ = engine
    if not GEMMA.is_file():
        pytest.skip("the second test model (Gemma 3 270M) is not installed")
    with pytest.raises(ModelLoadError) as refused:
        draft_model(model, GEMMA)
    message = str(refused.value)
    assert message.startswith(f"cannot draft with {GEMMA.name}: its vocabulary has ")
    assert "set model.draft_model_path" in message


def test_a_missing_draft_model_file_is_a_load_error(engine: Engine, tmp_path: Path) -> None:
    model, _, _ = engine
    with pytest.raises(ModelLoadError, match="draft model file not found"):
        draft_model(model, tmp_path / "absent.gguf")


def test_with_a_quantized_kv_cache_greedy_output_is_the_same_with_drafts_on_two_threads() -> None:
    # With an f16 cache and more than one thread, llama.cpp's CPU attention splits a
    # one-position step's cache over the threads once it holds 512 cells, and rounds otherwise
    # than a several-position step (docs/speculation.md); a quantized cache takes one path for
    # both. The prompt holds more than 512 tokens so that the split would happen.
    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled model is not installed")
    settings = ModelSettings(
        path=path,
        context_size=2048,
        gpu_layers=0,
        threads=2,
        batch_size=256,
        slots=1,
        kv_cache_type="q8_0",
    )
    model = LoadedModel(settings)
    batcher = Batcher(model)
    try:
        engine = (model, batcher, [Slot(0)])
        text = "Copy these five files exactly:\n\n" + "\n".join([SOURCE] * 5)
        prepared = prepare(model, text, 96)
        assert len(prepared.tokens) > 512
        plain = run(engine, prepared, "off")
        drafted = run(engine, prepared, "ngram")
        assert batcher.stats.speculation.accepted > 0
        assert drafted.tokens == plain.tokens
    finally:
        batcher.close()
        model.close()


WORDS = ("the", "cat", "sat", "on", "mat", "def", "return", "x", "=", "1", "\n", "copy", "again")


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(WORDS), min_size=3, max_size=12), st.integers(1, 3))
def test_random_prompts_decode_the_same_with_and_without_drafts(
    engine: Engine, words: list[str], repeat: int
) -> None:
    model, _, _ = engine
    prepared = prepare(model, " ".join(words * repeat), 32)
    assert run(engine, prepared, "ngram").tokens == run(engine, prepared, "off").tokens


def test_a_drafting_slot_beside_three_plain_ones_all_progress(engine: Engine) -> None:
    model, batcher, slots = engine
    use(batcher, model, "ngram")
    stats = batcher.stats.speculation
    accepted = stats.accepted
    texts = [COPY, *(f"Write a very long story about a {s}." for s in ("robot", "ship", "town"))]
    started = [
        start(slot, model, prepare(model, text, 48))
        for slot, text in zip(slots, texts, strict=True)
    ]
    before = batcher.stats.steps
    for generation, _, _ in started:
        batcher.submit(generation)
    for _, done, _ in started:
        assert done.wait(300)
    steps = batcher.stats.steps - before
    for _, _, events in started:
        finished = [e for e in events if isinstance(e, Finished)]
        assert finished and finished[0].output_tokens == 48
    assert stats.accepted > accepted  # the copying slot drafted...
    # ...and the plain ones got a token every step: the prompts and 48 tokens each fit in
    # a few steps more than 48.
    assert steps <= 48 + 8


def test_jump_forward_keeps_a_forced_tool_calls_fixed_text_in_fewer_steps_token_for_token(
    engine: Engine,
) -> None:
    model, batcher, _ = engine
    prepared = prepare(
        model,
        f"Fix the typo in ledger.py:\n\n{SOURCE}",
        80,
        tools=(EDIT,),
        choice=ToolChoice(mode="tool", name="Edit"),
    )
    stats = batcher.stats.speculation
    plain = run(engine, prepared, "off")
    forced = stats.forced
    jumped = run(engine, prepared, "ngram")
    assert stats.forced - forced >= len('<tool_call>{"name": "Edit", "arguments": {') // 4
    assert jumped.steps < plain.steps
    assert jumped.tokens == plain.tokens  # verified: the tokens the model would have picked
    for result in (plain, jumped):
        calls = [e for e in result.events if isinstance(e, ToolCallEnd)]
        assert calls, result.text


XML_CALL = (
    'root ::= "<function=Edit>\\n<parameter=file_path>\\n" [a-z.]+ "\\n</parameter>\\n'
    '<parameter=old_string>\\n" [a-z ]+ "\\n</parameter>\\n</function>"\n'
)


def test_jump_forward_reads_any_dialects_fixed_text_from_the_grammar(engine: Engine) -> None:
    model, _, _ = engine
    parsed = model.parsed_grammar(XML_CALL, lazy=False)
    assert parsed is not None
    sampler = Sampler(Sampling(temperature=0.0), parsed, seed=1, n_vocab=model.n_vocab)
    try:
        grammar = sampler.grammar
        assert grammar is not None
        verified = JumpForward(grammar, model)
        draft = verified.propose([], 64)
        assert draft is not None and not draft.forced
        assert model.token_text(draft.tokens) == "<function=Edit>\n<parameter=file_path>\n"
        assert verified.forced_text() == "<function=Edit>\n<parameter=file_path>\n"  # a copy
        appended = JumpForward(grammar, model, verified=False)
        assert appended.forced_text() == "<function=Edit>\n<parameter=file_path>\n"
        assert appended.forced_text() == ""  # the path is the model's to write
        for char in "ledger.py\n":
            grammar.advance(model.tokenize(char, special=False)[0])
        proposal = appended.propose([], 0)
        assert proposal is not None and proposal.forced
        assert model.token_text(proposal.tokens) == "</parameter>\n<parameter=old_string>\n"
    finally:
        sampler.close()


# Its keys in sorted order, as the JSON dialects' `render` writes them.
WRITE = ToolSpec(
    "Write",
    "Write a file.",
    {
        "type": "object",
        "properties": {"content": {"type": "string"}, "file_path": {"type": "string"}},
        "required": ["content", "file_path"],
    },
)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_jump_forward_forces_each_dialects_fixed_text_and_nothing_else(
    engine: Engine, dialect: Dialect
) -> None:
    # Walk a forced Write call, as the dialect writes it, through its grammar one character at
    # a time; wherever jump-forward offers text, the call must go on with exactly that text.
    model, _, _ = engine
    values = {"content": "x = 1", "file_path": "a.py"}
    grammar_text, _ = tool_call_grammar((WRITE,), only="Write", parallel=False, dialect=dialect)
    parsed = model.parsed_grammar(grammar_text, lazy=False)
    assert parsed is not None
    sampler = Sampler(Sampling(temperature=0.0), parsed, seed=1, n_vocab=model.n_vocab)
    grammar = sampler.grammar
    assert grammar is not None
    call = dialect.syntax.render("Write", values)
    opened = dialect.syntax.block_open
    text = call if call.startswith(opened) else opened + call
    forced = [False] * len(text)
    for i, char in enumerate(text):
        offered = JumpForward(grammar, model).forced_text()
        assert text[i:].startswith(offered), (i, offered, text[i:])
        forced[i : i + len(offered)] = [True] * len(offered)
        for token in model.tokenize(char, special=False):
            assert len(grammar.allowed(np.array([token], dtype=np.int32))) == 1, (i, text)
            grammar.advance(token)
    # The envelope, the name and the keys are the grammar's; the values are the model's.
    assert sum(forced) >= len(text) // 2, (sum(forced), len(text))
    name = text.index("Write")
    assert all(forced[name : name + len("Write")]), text
