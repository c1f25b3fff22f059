"""Tool dialects: each model family's own tool-call syntax and reasoning markup.

One file per family, one row per family in `DIALECTS` (in detection order: the first whose
parser reads the template's own rendering of a call wins, see `detect.py`). The names are the
values `model.tool_dialect` takes (`pensieve.config.TOOL_DIALECTS` lists them for the config).
"""

from __future__ import annotations

from pensieve.config import TOOL_DIALECTS
from pensieved.engine.dialects.base import Dialect
from pensieved.engine.dialects.deepseek import DEEPSEEK
from pensieved.engine.dialects.deepseek_dsml import DEEPSEEK_V4, DEEPSEEK_V32
from pensieved.engine.dialects.gemma4 import GEMMA4
from pensieved.engine.dialects.glm import GLM
from pensieved.engine.dialects.harmony import HARMONY
from pensieved.engine.dialects.hermes import HERMES
from pensieved.engine.dialects.kimi_k2 import KIMI_K2
from pensieved.engine.dialects.llama3 import LLAMA3
from pensieved.engine.dialects.minimax import MINIMAX
from pensieved.engine.dialects.minimax_m3 import MINIMAX_M3
from pensieved.engine.dialects.mistral import MISTRAL
from pensieved.engine.dialects.qwen3_xml import QWEN3_XML
from pensieved.engine.dialects.seed_oss import SEED_OSS

DIALECTS: tuple[Dialect, ...] = (
    HERMES,
    QWEN3_XML,
    SEED_OSS,
    GLM,
    MINIMAX,
    MINIMAX_M3,
    HARMONY,
    MISTRAL,
    DEEPSEEK,
    DEEPSEEK_V32,
    DEEPSEEK_V4,
    KIMI_K2,
    GEMMA4,
    LLAMA3,  # last: its trigger, a bare JSON object, is the least distinctive
)
_BY_NAME = {dialect.name: dialect for dialect in DIALECTS}
assert set(_BY_NAME) == set(TOOL_DIALECTS)  # the config's list of names is this one


def _markup() -> str:
    """Every dialect's markup in one text (a sample call and the reasoning tags of each)."""
    parts = []
    for dialect in DIALECTS:
        syntax, reasoning = dialect.syntax, dialect.reasoning
        # A string argument too: Gemma 4 delimits strings with a token of its own.
        sample = syntax.render("name", {"key": 1, "text": "value"})
        parts += [sample, reasoning.open, reasoning.close]
        parts += [syntax.block_open, syntax.block_close, *syntax.drop, *syntax.markup]
    return "\n".join(parts)


MARKUP = _markup()


def is_markup(text: str) -> bool:
    """Whether a control token's text is part of some dialect's markup (`<|channel|>`,
    `[TOOL_CALLS]`, …): generated text keeps those, where other control tokens render as
    nothing, so that the dialect's parser sees its calls and reasoning."""
    return len(text) > 1 and text in MARKUP


def by_name(name: str) -> Dialect:
    """The dialect called `name` (one of `TOOL_DIALECTS`)."""
    return _BY_NAME[name]


def default_dialect() -> Dialect:
    """Hermes: our generic tool section speaks it, for templates that know no tools."""
    return HERMES


__all__ = ["DIALECTS", "Dialect", "by_name", "default_dialect"]
