"""Chat templates pensieved ships, and how `model.chat_template` picks the one a model uses.

A base model's GGUF has no `tokenizer.chat_template`, and some GGUFs carry a broken one; like
llama-server's --chat-template / --chat-template-file, the config may name a built-in template
or a Jinja file instead. The built-ins are written here for the formats their names say, in
the dialect prompt.py renders (content arrives as markers, `bos_token` is a variable) and are
rendered by the same code as a GGUF's own template.
"""

from __future__ import annotations

from pathlib import Path

from pensieve.config import BUILTIN_CHAT_TEMPLATES
from pensieved.engine.prompt import template_caps
from pensieved.errors import ChatTemplateError

# Qwen, SmolLM, many fine-tunes: <|im_start|>role ... <|im_end|>.
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma 2 and 3: two roles, `user` and `model`; no system role, so system text opens the next
# user turn (as Google's own template does with the first one).
_GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% set ns.system = ns.system + message.content + '\\n\\n' %}"
    "{% else %}"
    "{% set role = 'model' if message.role == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message.content + '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Llama 3, 3.1, 3.2 and 3.3: header-delimited roles, each turn ended by <|eot_id|>.
_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
    "{{ message.content + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

BUILTIN: dict[str, str] = {"chatml": _CHATML, "gemma": _GEMMA, "llama3": _LLAMA3}
assert tuple(BUILTIN) == BUILTIN_CHAT_TEMPLATES  # the config's list of names is this one


def template_source(setting: str) -> str:
    """The Jinja source `model.chat_template` (or an alias's) names: a built-in or a file."""
    builtin = BUILTIN.get(setting)
    if builtin is not None:
        return builtin
    path = Path(setting).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"cannot read the chat template file {path}: {exc}") from None


def missing_template_message(model_file: Path, key: str) -> str:
    """What to tell the user about a model that has no template and no override."""
    names = ", ".join(BUILTIN)
    return (
        f"{model_file.name} has no chat template (its GGUF has no tokenizer.chat_template; it "
        f"is probably a base model): set {key} to a built-in template ({names}) or a Jinja "
        "file, or use an instruction-tuned model"
    )


def template_problem(
    model_file: Path, setting: str | None, own: str | None, key: str
) -> str | None:
    """Why no request to the model can be rendered (None: they can), said once when it loads
    rather than by every request: no template at all, an unreadable file, or a template that
    fails on a system prompt and a user turn. `setting` is `key`'s value, `own` the GGUF's."""
    if setting is None and not own:
        return missing_template_message(model_file, key)
    names = ", ".join(BUILTIN)
    try:
        source = template_source(setting) if setting else own
    except ChatTemplateError as exc:
        return f"{exc}; requests to {model_file.name} will fail until {key} names a readable file"
    error = template_caps(source).error
    if error is None:
        return None
    where = f"the chat template {setting}" if setting else f"{model_file.name}'s own chat template"
    return (
        f"{where} cannot render a conversation ({error}); requests to {model_file.name} will "
        f"fail until {key} names a template that renders: a Jinja file or one of {names}"
    )
