"""``chat_template``: the template the output's tokenizer gets (mergekit's ``merge.py``
``_set_chat_template``).

``auto`` takes the template most of the inputs have (the first seen on a tie; none: the output
keeps its tokenizer's); a preset name (``alpaca``, ``chatml``, ``llama3``, ``mistral``, ``exaone``)
takes mergeforge's own template of that format; any text with ``{`` in it is Jinja, used as
given. Anything else is an error found when the recipe is read, with the closest preset named.
The template is written to ``chat_template.jinja``, which transformers reads first, and removed
from ``tokenizer_config.json`` so the folder holds one template.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergeforge.errors import RecipeError, closest

BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\n\n' }}"
        "{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '[|system|]' + message['content'] + '[|endofturn|]\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def check_chat_template(setting: str) -> None:
    """Raise a :class:`RecipeError` unless ``setting`` is ``auto``, a preset or Jinja text."""
    if setting == "auto" or setting in BUILTIN_CHAT_TEMPLATES or "{" in setting:
        return
    match = closest(setting, ["auto", *BUILTIN_CHAT_TEMPLATES])
    hint = f"did you mean '{match}'? " if match else ""
    raise RecipeError(f"chat_template: unknown template '{setting}'; {hint}use auto, {', '.join(BUILTIN_CHAT_TEMPLATES)} "
                      "or Jinja text (a template with '{' in it)")


def model_chat_template(folder: Path) -> str | None:
    """A model folder's chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s
    text, or the entry named ``default`` of its list of named templates)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return (template.strip() or None) if isinstance(template, str) else None


def resolve_chat_template(setting: str, model_folders: list[Path]) -> str | None:
    """The template text ``setting`` stands for (``None``: ``auto`` found no template)."""
    check_chat_template(setting)
    if setting == "auto":
        templates = [t for t in (model_chat_template(f) for f in model_folders) if t]
        return Counter(templates).most_common(1)[0][0] if templates else None
    return BUILTIN_CHAT_TEMPLATES.get(setting, setting)


def apply_chat_template(setting: str | None, out: Path, model_folders: list[Path]) -> None:
    """Write the template ``setting`` stands for into the output folder ``out``."""
    if not setting:
        return
    template = resolve_chat_template(setting, model_folders)
    if template is None:
        return
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        # One source of truth: transformers reads chat_template.jinja when it exists.
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.pop("chat_template", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
