"""The checkpoint's chat template, stored in every build for the replicas to render messages with
(serving_service.chat_template reads the two files written here).

Where transformers finds it: `chat_template.jinja` beside the tokenizer, else tokenizer_config.json's
`chat_template`, a string or a list of named templates (the one named "default" is used). The
template reads the tokenizer's special tokens as strings (bos_token, eos_token, ...): they are
stored beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE_FILE = "chat_template.jinja"
SPECIALS_FILE = "chat_template.json"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ChatTemplateError(f"{path.name}: not JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def find_template(checkpoint: Path) -> str | None:
    checkpoint = Path(checkpoint)
    jinja = checkpoint / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(checkpoint / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError("tokenizer_config.json: chat_template must be a string or a list of named templates")
    return template or None


def special_tokens(checkpoint: Path) -> dict[str, str]:
    """The special tokens as transformers' special_tokens_map gives them to the template: from
    tokenizer_config.json, special_tokens_map.json filling what it lacks."""
    checkpoint = Path(checkpoint)
    config = _read_json(checkpoint / "tokenizer_config.json")
    mapping = _read_json(checkpoint / "special_tokens_map.json")
    out: dict[str, str] = {}
    for key in SPECIAL_KEYS:
        value = config.get(key, mapping.get(key))
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def store_in_build(checkpoint: Path, build_dir: Path) -> bool:
    """Write the checkpoint's chat template and special tokens into `build_dir`; False when the
    checkpoint has no template (the build then serves prompts only)."""
    template = find_template(checkpoint)
    build_dir = Path(build_dir)
    if template is None:
        (build_dir / TEMPLATE_FILE).unlink(missing_ok=True)  # a builder's copy must not outlive "none"
        return False
    (build_dir / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    (build_dir / SPECIALS_FILE).write_text(json.dumps({"special_tokens": special_tokens(checkpoint)}, indent=2))
    return True
