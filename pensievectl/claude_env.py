"""What `pensievectl claude` hands Claude Code: the variables that point it at pensieved and fit
its context, its timeouts and its model names to the model the daemon serves.

Pure: it works from `Daemon`, the facts the command read from the daemon, so tests can give it
any daemon they like. The numbers about Claude Code come from its 2.1.332 binary.
"""

from __future__ import annotations

import fnmatch
import math
import shlex
from dataclasses import dataclass, field
from pathlib import PurePath

from pensievectl.errors import ContextTooSmallError

# Claude Code's prefix, sent with every request: its default tools plus its system prompt (28k
# characters in 2.1.332) come to about 20,000 tokens.
CLAUDE_PREFIX_TOKENS = 20_000
# Beyond the prefix and the reply, room for a conversation to do anything: a few turns, a file.
WORK_TOKENS = 4_096
# Claude Code keeps min(CLAUDE_CODE_MAX_OUTPUT_TOKENS, 20,000) of the window free for the reply
# and refuses to send a request that would not leave it (plus 3,000).
CLIENT_OUTPUT_RESERVE_CAP = 20_000
# Claude Code reads a CLAUDE_CODE_AUTO_COMPACT_WINDOW below 100k as 100k and warns at every
# start; below that, the window CLAUDE_CODE_MAX_CONTEXT_TOKENS sets bounds compaction alone.
AUTO_COMPACT_WINDOW_MIN = 100_000
# Before the model has evaluated a prompt: a slow CPU's rate for a mid-size model, so that the
# timeouts come out long rather than short.
ASSUMED_PREFILL_TPS = 25.0
# A rate measured on short prompts overstates a 20k-token prefill (attention grows with the
# position), and other requests share the model's decode thread.
TIMEOUT_MARGIN = 3
# Claude Code's own defaults are never shortened. It clamps its stream idle timeout to between
# 5 and 30 minutes whatever the variable says.
API_TIMEOUT_FLOOR_MS = 600_000
IDLE_TIMEOUT_FLOOR_MS = 300_000
IDLE_TIMEOUT_CAP_MS = 1_800_000
# Any token will do when the daemon has no key: it is sent, not checked. Claude Code needs one
# so that it does not ask for a login.
NO_KEY_TOKEN = "pensieve-no-key"

FAMILIES = ("opus", "sonnet", "haiku")
# Every variable this module may set: `--settings` replaces all of them, so a value from an
# earlier run that no longer applies does not linger in settings.json.
MANAGED = (
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_AUTH_TOKEN",
    *(f"ANTHROPIC_DEFAULT_{family.upper()}_MODEL" for family in FAMILIES),
    "ANTHROPIC_CUSTOM_MODEL_OPTION",
    "ANTHROPIC_CUSTOM_MODEL_OPTION_NAME",
    "ANTHROPIC_CUSTOM_MODEL_OPTION_DESCRIPTION",
    "CLAUDE_CODE_MAX_CONTEXT_TOKENS",
    "CLAUDE_CODE_DISABLE_1M_CONTEXT",
    "CLAUDE_CODE_AUTO_COMPACT_WINDOW",
    "CLAUDE_CODE_MAX_OUTPUT_TOKENS",
    "API_TIMEOUT_MS",
    "CLAUDE_STREAM_IDLE_TIMEOUT_MS",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
)


@dataclass(frozen=True)
class Daemon:
    """What the daemon said, as far as Claude Code's settings need it."""

    base_url: str
    api_key: str | None
    model_name: str  # from the GGUF's metadata
    model_file: str  # the GGUF file's name
    context: int  # tokens of one conversation (per slot)
    max_output_tokens: int  # `model.max_output_tokens`: the daemon's ceiling on a reply
    prompt_tokens: int  # prompt tokens evaluated since the model was loaded...
    prompt_s: float  # ...and the seconds they took
    aliases: tuple[str, ...] = ()  # `model.aliases` patterns
    upstreams: tuple[str, ...] = ()  # `model.upstreams` patterns


@dataclass
class ClaudeEnv:
    variables: dict[str, str]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Timeouts:
    api_ms: int
    idle_ms: int
    note: str


def output_reserve(daemon: Daemon) -> int:
    return min(daemon.max_output_tokens, CLIENT_OUTPUT_RESERVE_CAP)


def required_context(daemon: Daemon) -> int:
    return CLAUDE_PREFIX_TOKENS + output_reserve(daemon) + WORK_TOKENS


def check_context(daemon: Daemon) -> None:
    """Refuse a context that cannot hold Claude Code's prefix, a reply and room to work."""
    needed = required_context(daemon)
    if daemon.context >= needed:
        return
    raise ContextTooSmallError(
        f"{daemon.model_file} has a context of {daemon.context} tokens; Claude Code needs at "
        f"least {needed}: its system prompt and tools ({CLAUDE_PREFIX_TOKENS}), a reply "
        f"({output_reserve(daemon)}, model.max_output_tokens) and room to work "
        f"({WORK_TOKENS}). Raise model.context_size (and model.memory_budget_mb when `auto` "
        "is capped by memory; model.kv_cache_type q8_0 halves the KV cache) or lower "
        "model.max_output_tokens, then `pensievectl reload`"
    )


def timeouts(daemon: Daemon) -> Timeouts:
    """Claude Code's request and stream idle timeouts: a cold prefill of its prefix at the
    measured rate, times a margin, never below its own defaults."""
    measured = daemon.prompt_tokens > 0 and daemon.prompt_s > 0
    rate = daemon.prompt_tokens / daemon.prompt_s if measured else ASSUMED_PREFILL_TPS
    prefill_s = CLAUDE_PREFIX_TOKENS / rate
    wanted_ms = math.ceil(prefill_s * TIMEOUT_MARGIN) * 1000
    idle_ms = min(max(wanted_ms, IDLE_TIMEOUT_FLOOR_MS), IDLE_TIMEOUT_CAP_MS)
    # The whole request: the prefill, then the reply.
    api_ms = max(2 * wanted_ms, API_TIMEOUT_FLOOR_MS)
    if measured:
        note = (
            f"prefill rate {rate:.0f} tokens/s, measured over {daemon.prompt_tokens} prompt "
            f"tokens: Claude Code's {CLAUDE_PREFIX_TOKENS}-token prefix takes about "
            f"{prefill_s:.0f} s cold"
        )
    else:
        note = (
            f"prefill rate not measured yet ({daemon.model_file} has evaluated no prompt since "
            f"it was loaded): assuming {ASSUMED_PREFILL_TPS:.0f} tokens/s; after one request, "
            "run this again for timeouts from the real rate"
        )
    note += f"; timeouts {TIMEOUT_MARGIN}x that, at least Claude Code's defaults"
    if wanted_ms > IDLE_TIMEOUT_CAP_MS:
        note += (
            f" (the stream idle timeout stops at Claude Code's limit of "
            f"{IDLE_TIMEOUT_CAP_MS // 60_000} minutes: a cold first request may be retried)"
        )
    return Timeouts(api_ms=api_ms, idle_ms=idle_ms, note=note)


def _patterns(daemon: Daemon) -> tuple[str, ...]:
    return daemon.upstreams + daemon.aliases


def local_name(daemon: Daemon) -> str:
    """A model name the daemon serves with its default model: one no alias or upstream pattern
    takes. The file's stem, which is also what the user sees in Claude Code."""
    candidates = (PurePath(daemon.model_file).stem, "pensieve-local")
    for name in candidates:
        if not any(fnmatch.fnmatchcase(name, p) for p in _patterns(daemon)):
            return name
    return candidates[0]


def family_model(daemon: Daemon, family: str, local: str) -> str | None:
    """The name Claude Code should use for `family` (opus, sonnet, haiku).

    A family no alias or upstream mentions is the local default model. One a pattern mentions
    goes where the config sends it: a pattern without wildcards is a name to use as it is; a
    wildcard pattern (`claude-haiku-*`) is meant to catch Claude Code's own name, so none is set.
    """
    mine = [p for p in _patterns(daemon) if family in p.lower()]
    if not mine:
        return local
    return next((p for p in mine if not any(c in p for c in "*?[")), None)


def claude_env(daemon: Daemon) -> ClaudeEnv:
    """Every variable for Claude Code, and notes on the choices made (for the user)."""
    check_context(daemon)
    local = local_name(daemon)
    env = ClaudeEnv(
        {
            "ANTHROPIC_BASE_URL": daemon.base_url,
            "ANTHROPIC_AUTH_TOKEN": daemon.api_key or NO_KEY_TOKEN,
        }
    )
    for family in FAMILIES:
        name = family_model(daemon, family, local)
        if name is not None:
            env.variables[f"ANTHROPIC_DEFAULT_{family.upper()}_MODEL"] = name
        else:
            env.notes.append(
                f"{family}: Claude Code's own model name is used; the daemon's model.aliases "
                "or model.upstreams pattern for it decides what serves it"
            )
    env.variables |= {
        # In /model, under its own name.
        "ANTHROPIC_CUSTOM_MODEL_OPTION": local,
        "ANTHROPIC_CUSTOM_MODEL_OPTION_NAME": daemon.model_name,
        "ANTHROPIC_CUSTOM_MODEL_OPTION_DESCRIPTION": (
            f"{daemon.model_file} on pensieved, {daemon.context} tokens of context"
        ),
        # Claude Code takes a name it does not know for a 1M-token model unless told; and
        # without the second it asks for the 1M variant ("name[1m]"), whose window wins.
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(daemon.context),
        "CLAUDE_CODE_DISABLE_1M_CONTEXT": "1",
    }
    if daemon.context >= AUTO_COMPACT_WINDOW_MIN:
        env.variables["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = str(daemon.context)
    else:
        env.notes.append(
            f"CLAUDE_CODE_AUTO_COMPACT_WINDOW is left out: Claude Code reads values below "
            f"{AUTO_COMPACT_WINDOW_MIN} as {AUTO_COMPACT_WINDOW_MIN} and warns; the context of "
            f"{daemon.context} tokens bounds its compaction through CLAUDE_CODE_MAX_CONTEXT_TOKENS"
        )
    limits = timeouts(daemon)
    env.variables |= {
        # What the daemon gives at most: Claude Code keeps this much of the window for a reply.
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(daemon.max_output_tokens),
        "API_TIMEOUT_MS": str(limits.api_ms),
        "CLAUDE_STREAM_IDLE_TIMEOUT_MS": str(limits.idle_ms),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    env.notes.append(limits.note)
    if daemon.api_key is None:
        env.notes.append("pensieved has no API key (server.api_key): any token is accepted")
    return env


def shell_exports(env: ClaudeEnv, header: str) -> str:
    """`export` lines for a POSIX shell (`eval "$(pensievectl claude --print-env)"`), the header
    and notes as comments."""
    lines = [f"# {header}", *(f"# {note}" for note in env.notes)]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.variables.items()]
    return "\n".join(lines)
