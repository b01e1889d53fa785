"""Chat templates: what the compiler stores in a build, and the replica's rendering and
tokenization against transformers' apply_chat_template on Llama 3 and Llama 4 style templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compiler_service import chat_templates
from serving_service.chat_template import ChatTemplate, render_for
from serving_service.text import PromptTokenizer
from shared.errors import FailedPrecondition, InvalidArgument
from tests.llama4_parity import LLAMA4_CHAT_TEMPLATE, TOKENIZER_FILES, add_chat_template

CHATS = [
    [{"role": "user", "content": "What does os.path.join do?"}],
    [{"role": "system", "content": "  You answer in one line.\n"},
     {"role": "user", "content": "def f(x):"},
     {"role": "assistant", "content": "    return x * 2"},
     {"role": "user", "content": "And <s> in text, ünïcödé, \"quotes\"?"}],
]


def _checkpoint(tmp_path: Path, demo_model: Path, style: str) -> Path:
    """Tokenizer files of the demo model with a Llama 3 (the demo's own) or Llama 4 style template."""
    ckpt = tmp_path / f"ckpt-{style}"
    ckpt.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(demo_model / name, ckpt / name)
    if style == "llama4":
        add_chat_template(ckpt, LLAMA4_CHAT_TEMPLATE)
    return ckpt


def _build(tmp_path: Path, ckpt: Path) -> Path:
    build = tmp_path / f"build-{ckpt.name}"
    build.mkdir()
    shutil.copyfile(ckpt / "tokenizer.json", build / "tokenizer.json")
    shutil.copyfile(ckpt / "tokenizer_config.json", build / "tokenizer_config.json")
    assert chat_templates.store_in_build(ckpt, build)
    return build


@pytest.mark.parametrize("style", ["llama3", "llama4"])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_renders_and_tokenizes_as_transformers(tmp_path, demo_model, style, chat):
    from transformers import AutoTokenizer

    messages = CHATS[chat]
    ckpt = _checkpoint(tmp_path, demo_model, style)
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    want_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)

    build = _build(tmp_path, ckpt)
    text = ChatTemplate.load(build).render(messages)
    ids = PromptTokenizer(build).encode(text, add_special_tokens=False)
    assert text == want_text
    assert ids == list(want_ids)
    assert ids[0] == hf.bos_token_id and ids[1] != hf.bos_token_id  # the template's BOS, not a second one
    assert text.endswith("assistant<|end_header_id|>\n\n" if style == "llama3" else
                         "<|header_start|>assistant<|header_end|>\n\n")


def test_llama4_content_parts(tmp_path, demo_model):
    from transformers import AutoTokenizer

    ckpt = _checkpoint(tmp_path, demo_model, "llama4")
    messages = [{"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": " two"}]}]
    want = AutoTokenizer.from_pretrained(str(ckpt)).apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
    assert ChatTemplate.load(_build(tmp_path, ckpt)).render(messages) == want


def test_template_refusals_are_invalid_argument(tmp_path, demo_model):
    template = ChatTemplate.load(_build(tmp_path, _checkpoint(tmp_path, demo_model, "llama3")))
    with pytest.raises(InvalidArgument, match="Unknown role: robot"):
        template.render([{"role": "robot", "content": "hi"}])
    with pytest.raises(InvalidArgument, match="alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_sandbox(tmp_path):
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(InvalidArgument):
        escape.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}", {})
    with pytest.raises(InvalidArgument):  # immutable sandbox: no list.append
        mutate.render([{"role": "user", "content": "x"}])
    ns = ChatTemplate("{% set ns = namespace(_x=1) %}{{ ns }}", {})
    with pytest.raises(InvalidArgument):
        ns.render([])
    # tojson does not escape HTML, as transformers' does not
    assert ChatTemplate("{{ messages[0] | tojson }}", {}).render([{"role": "u", "content": "<b>é"}]) == \
        '{"role": "u", "content": "<b>é"}'


def test_no_template_or_broken_template_is_failed_precondition(tmp_path):
    with pytest.raises(FailedPrecondition, match="no chat template"):
        render_for(None, [{"role": "user", "content": "x"}], "m")
    with pytest.raises(FailedPrecondition, match="does not compile"):
        ChatTemplate("{% for %}", {}).render([{"role": "user", "content": "x"}])
    assert ChatTemplate.load(tmp_path) is None


def test_compiler_finds_the_template(tmp_path, demo_model):
    ckpt = _checkpoint(tmp_path, demo_model, "llama3")
    build = tmp_path / "b"
    build.mkdir()
    # a named list: "default" is used
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_templates.store_in_build(ckpt, build)
    assert (build / "chat_template.jinja").read_text() == "D{{ bos_token }}"
    assert json.loads((build / "chat_template.json").read_text())["special_tokens"] == \
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    # chat_template.jinja beside the tokenizer wins, as in transformers
    (ckpt / "chat_template.jinja").write_text("J")
    assert chat_templates.store_in_build(ckpt, build)
    assert (build / "chat_template.jinja").read_text() == "J"
    # none: the build has no template
    (ckpt / "chat_template.jinja").unlink()
    del config["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    assert not chat_templates.store_in_build(ckpt, build)
    assert ChatTemplate.load(build) is None
    # not a string
    config["chat_template"] = 3
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(chat_templates.ChatTemplateError):
        chat_templates.store_in_build(ckpt, build)
