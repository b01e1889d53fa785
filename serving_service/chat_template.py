"""Chat messages to prompt text with the build's chat template, rendered as transformers'
`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` renders it: the same
sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML) and the same variables (the messages, the
tokenizer's special tokens as strings, tools and documents None). The template writes the BOS
text itself, so the rendered text is tokenized without adding special tokens.

Templates come from checkpoints, so they are untrusted code: the sandbox is immutable, and a
template that fails to render (raise_exception, a sandbox violation) is the caller's error.

The compiler writes the files (compiler_service.chat_templates): TEMPLATE_FILE and SPECIALS_FILE.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shared.errors import FailedPrecondition, InvalidArgument

TEMPLATE_FILE = "chat_template.jinja"
SPECIALS_FILE = "chat_template.json"  # {"special_tokens": {"bos_token": "<s>", ...}}


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """namespace() without underscore attributes (no reaching CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _Dict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if isinstance(v, str)}
        try:
            self.template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            self.template = None
            self.error = f"the build's chat template does not compile: {exc}"

    @classmethod
    def load(cls, build_dir: Path) -> "ChatTemplate | None":
        """The build's template, or None when the build has none."""
        path = Path(build_dir) / TEMPLATE_FILE
        if not path.is_file():
            return None
        specials_path = Path(build_dir) / SPECIALS_FILE
        specials = json.loads(specials_path.read_text()).get("special_tokens", {}) if specials_path.is_file() else {}
        return cls(path.read_text(encoding="utf-8"), specials)

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages`, ending with the assistant's turn header. Raises
        FailedPrecondition for a template that cannot compile, InvalidArgument when the template
        refuses the messages."""
        if self.template is None:
            raise FailedPrecondition(self.error)
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self.template.render(messages=chat, tools=None, documents=None, add_generation_prompt=True,
                                        **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:  # raise_exception, sandbox violations, syntax
            raise InvalidArgument(f"messages: the model's chat template refused them: {exc}") from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:
            raise InvalidArgument(f"messages: the model's chat template failed on them: "
                                  f"{type(exc).__name__}: {exc}") from None


def render_for(template: ChatTemplate | None, messages: list[dict], model: str) -> str:
    if template is None:
        raise FailedPrecondition(f"model {model!r} has no chat template (its build stores none): send a prompt "
                                 "instead of messages, or compile a checkpoint whose tokenizer_config.json or "
                                 "chat_template.jinja holds one")
    return template.render(messages)
