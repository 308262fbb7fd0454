"""Prompt and conversation templates: one API for instruction and chat formats.

Templates are JSON files in the package's ``templates/`` folder (found relative to this file, never
the working directory), or any JSON file the user names. Three kinds:

* **instruction** — alpaca-lora's schema: ``prompt_input``, ``prompt_no_input``, ``response_split``
  (+ our optional ``stop``). The response follows the prompt directly.
* **conversation** — per-role format strings with one ``{content}`` each (``system_format``,
  ``user_format``, ``assistant_format`` and, for MOSS, ``thought_format``, ``command_format``,
  ``result_format``), a ``generation_prompt`` (the part of ``assistant_format`` before the answer that
  is given to the model at inference), ``response_split`` and ``stop``. Optional: ``system`` (default
  system message), ``first_user_format`` (may hold ``{system}``, placing the system block inside the
  first turn, as Llama-2 does), ``single_turn_user_format`` (ChatGLM's raw query when there is no
  history), ``{round}`` in a user format (0-based turn number), ``omit_space_before_whitespace`` (the space
  just before ``{content}`` is left out when the content starts with whitespace, as MOSS writes it).
* **jinja** — the tokenizer's own ``chat_template`` (name ``tokenizer``).

``render(messages)`` returns the text and, for every message, its character span, the span of its
content and the span that is trained on by default. Token labels are derived from these spans with
one tokenization of the full text (see ``utils/data/encode.py``), so they are exactly what the model sees.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from utils.errors import SuiteError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "templates"

ROLES = ("system", "user", "assistant", "thought", "command", "result")
# Roles whose text the model produces; the default loss is on these and nothing else.
MODEL_ROLES = ("assistant", "thought", "command")


class TemplateError(SuiteError):
    """A template file is missing or malformed, or cannot render the given messages."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Segment:
    """Where one message landed in the rendered text (character offsets, end-exclusive)."""

    role: str
    start: int
    end: int
    content_start: int
    content_end: int
    train_start: int  # default ("assistant") loss span; empty for roles the model does not produce
    train_end: int
    eos_after: bool  # an EOS token ends this span (every trained assistant response)


@dataclass
class Rendered:
    text: str
    segments: list[Segment] = field(default_factory=list)
    # Jinja chat templates write BOS themselves (as apply_chat_template(tokenize=True) assumes), so
    # the tokenizer must not add special tokens again; named templates rely on the tokenizer's BOS.
    add_special_tokens: bool = True


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_template(name_or_path: str, tokenizer: Any = None) -> "Template":
    """Load a template by built-in name or from a JSON file path.

    Args:
        name_or_path: ``alpaca``, ``vicuna_v1.1``, ... or a path to a template JSON.
        tokenizer: needed for the ``tokenizer`` template (its ``chat_template`` is used).
    """
    path = Path(name_or_path)
    # A path only when it looks like one: a bare name never picks up a stray file in the working dir.
    if name_or_path.endswith(".json") or "/" in name_or_path or os.sep in name_or_path:
        if not path.is_file():
            raise TemplateError(f"template file not found: {name_or_path}")
        name = path.stem
    else:
        path = TEMPLATE_DIR / f"{name_or_path}.json"
        name = name_or_path
        if not path.is_file():
            raise TemplateError(
                f"unknown template {name_or_path!r}; built-in: {', '.join(available_templates())} "
                "(or pass a path to a template JSON)"
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TemplateError(f"cannot read template {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"template {path}: expected a JSON object")
    return template_from_dict(data, name=data.get("name", name), source=str(path), tokenizer=tokenizer)


def template_from_dict(data: dict, name: str, source: str = "<dict>", tokenizer: Any = None) -> "Template":
    if "prompt_no_input" in data or "prompt_input" in data:
        return InstructionTemplate(name, data, source)
    if "user_format" in data:
        return ConversationTemplate(name, data, source)
    if "chat_template" in data:
        chat_template = data["chat_template"]
        if chat_template is None:  # the built-in "tokenizer" entry: take it from the tokenizer
            chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
            if not chat_template:
                where = getattr(tokenizer, "name_or_path", "the tokenizer")
                raise TemplateError(
                    f"template 'tokenizer' needs a tokenizer with a chat_template; {where} has none. "
                    f"Pick a named template: {', '.join(available_templates())}"
                )
        if tokenizer is None:
            raise TemplateError(f"template {name!r} is a Jinja chat template and needs a tokenizer")
        return JinjaTemplate(name, {**data, "chat_template": chat_template}, source, tokenizer)
    raise TemplateError(
        f"template {source}: not a known schema (need prompt_input/prompt_no_input, user_format, or chat_template)"
    )


class Template:
    """Common interface. ``data`` is the full JSON, saved with every artifact."""

    kind = ""

    def __init__(self, name: str, data: dict, source: str):
        self.name = name
        self.data = dict(data)
        self.source = source
        stop = self.data.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise TemplateError(f"template {source}: 'stop' must be a list of non-empty strings")
        self.stop: list[str] = stop

    # -- rendering -------------------------------------------------------------------------------
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               input: str | None = None) -> Rendered:
        raise NotImplementedError

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """alpaca-lora's ``Prompter.generate_prompt``: the prompt for one instruction, plus ``label``."""
        messages = [Message("user", instruction)]
        if label is None:
            return self.render(messages, add_generation_prompt=True, input=input).text
        return self.render(messages + [Message("assistant", label)], input=input).text

    def get_response(self, output: str) -> str:
        """The model's answer inside ``output`` (a prompt + completion, or a completion alone).

        Takes the text after the last ``response_split`` (if present), cuts it at the first stop
        string, and strips surrounding whitespace.
        """
        split = self.data.get("response_split")
        if split and split in output:
            output = output.rsplit(split, 1)[1]
        return cut_at_stop(output, self.stop).strip()

    def to_json(self) -> dict:
        return {"name": self.name, **self.data}


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def _check_format(fmt: Any, key: str, source: str, allowed: set[str], required: set[str] = frozenset()) -> None:
    """A format string may use only ``allowed`` fields and must use each of ``required`` exactly once."""
    if not isinstance(fmt, str):
        raise TemplateError(f"template {source}: {key!r} must be a string")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
    except ValueError as exc:  # a lone '{' or '}': literal braces must be doubled
        raise TemplateError(f"template {source}: {key!r} is not a valid format string ({exc})") from None
    unknown = sorted({f for f in fields if f not in allowed})
    if unknown:
        raise TemplateError(f"template {source}: {key!r} uses unknown placeholder(s) {unknown}; "
                            f"allowed: {sorted(allowed)} (double literal braces: {{{{ }}}})")
    for name in required:
        if fields.count(name) != 1:
            raise TemplateError(f"template {source}: {key!r} must contain {{{name}}} exactly once")


class InstructionTemplate(Template):
    """alpaca-lora's templates: an instruction (and optional input) prompt; the response follows."""

    kind = "instruction"

    def __init__(self, name: str, data: dict, source: str):
        super().__init__(name, data, source)
        for key in ("prompt_input", "prompt_no_input", "response_split"):
            if key not in data:
                raise TemplateError(f"template {source}: missing key {key!r}")
        _check_format(data["prompt_input"], "prompt_input", source, {"instruction", "input"}, {"instruction", "input"})
        _check_format(data["prompt_no_input"], "prompt_no_input", source, {"instruction"}, {"instruction"})

    def render(self, messages, add_generation_prompt=False, input=None):
        roles = [m.role for m in messages]
        if roles not in (["user"], ["user", "assistant"]):
            raise TemplateError(
                f"template {self.name!r} is an instruction template: it renders one instruction and its "
                f"response, not {'/'.join(roles) or 'nothing'}; use a conversation template "
                "(vicuna_v1.1, phoenix, chatml, ...)"
            )
        instruction = messages[0].content
        if input:
            prompt = self.data["prompt_input"].format(instruction=instruction, input=input)
        else:
            prompt = self.data["prompt_no_input"].format(instruction=instruction)
        segments = [Segment("user", 0, len(prompt), 0, len(prompt), len(prompt), len(prompt), False)]
        text = prompt
        if len(messages) == 2:
            answer = messages[1].content
            start, text = len(text), text + answer
            segments.append(Segment("assistant", start, len(text), start, len(text), start, len(text), True))
        return Rendered(text, segments)


class ConversationTemplate(Template):
    """Per-role format strings (FastChat / LLMZoo / MOSS / ChatGLM / ChatML / Llama-2 style)."""

    kind = "conversation"

    def __init__(self, name: str, data: dict, source: str):
        super().__init__(name, data, source)
        for key in ("user_format", "assistant_format"):
            if key not in data:
                raise TemplateError(f"template {source}: missing key {key!r}")
        self.formats = {}
        for role in ROLES:
            key = f"{role}_format"
            if key in data:
                if role == "system":
                    _check_format(data[key], key, source, {"system"}, {"system"})
                else:
                    _check_format(data[key], key, source, {"content", "round"}, {"content"})
                self.formats[role] = data[key]
        for key in ("first_user_format", "single_turn_user_format"):
            if key in data:
                _check_format(data[key], key, source, {"content", "round", "system"}, {"content"})
        self.default_system = data.get("system", "") or ""
        if self.default_system and "system" not in self.formats:
            raise TemplateError(f"template {source}: has a default 'system' but no 'system_format'")
        pre_answer = data["assistant_format"].split("{content}")[0]
        self.generation_prompt = data.get("generation_prompt", pre_answer)
        if not pre_answer.startswith(self.generation_prompt):
            raise TemplateError(
                f"template {source}: generation_prompt {self.generation_prompt!r} must be a prefix of the "
                f"text before {{content}} in assistant_format ({pre_answer!r})"
            )

    def render(self, messages, add_generation_prompt=False, input=None):
        messages = list(messages)
        if input:  # an alpaca row: instruction and input become one user message
            first = next((i for i, m in enumerate(messages) if m.role == "user"), None)
            if first is not None:
                messages[first] = Message("user", f"{messages[first].content}\n\n{input}")
        system = self.default_system
        if messages and messages[0].role == "system":
            system, messages = messages[0].content, messages[1:]
        system_block = self.formats["system"].format(system=system) if system and "system" in self.formats else ""
        if system and "system" not in self.formats:
            raise TemplateError(f"template {self.name!r} has no system role")

        first_user = self.data.get("first_user_format")
        place_system_in_turn = first_user is not None and "{system}" in first_user
        n_user = sum(m.role == "user" for m in messages)
        text = "" if place_system_in_turn else system_block
        segments: list[Segment] = []
        if text:
            pre = self.formats["system"].split("{system}")[0]
            segments.append(Segment("system", 0, len(text), len(pre), len(pre) + len(system), 0, 0, False))
        round_no = -1
        for m in messages:
            if m.role == "system":
                raise TemplateError("a system message is only allowed first")
            if m.role not in self.formats:
                raise TemplateError(f"template {self.name!r} has no format for role {m.role!r}")
            fmt = self.formats[m.role]
            fields: dict[str, Any] = {}
            if m.role == "user":
                round_no += 1
                fields["round"] = round_no
                if round_no == 0 and n_user == 1 and "single_turn_user_format" in self.data:
                    fmt = self.data["single_turn_user_format"]
                elif round_no == 0 and first_user is not None:
                    fmt = first_user
                    fields["system"] = system_block
            pre, post = fmt.split("{content}")
            pre, post = pre.format(**fields), post.format(**fields)
            content = m.content
            if self.data.get("omit_space_before_whitespace") and content[:1].isspace() and pre.endswith(" "):
                pre = pre[:-1]  # MOSS writes '<|Results|>:\n...' but '<|Results|>: None'
            start = len(text)
            c_start = start + len(pre)
            c_end = c_start + len(content)
            text = text + pre + content + post
            end = len(text)
            if m.role in MODEL_ROLES:
                if m.role == "assistant":
                    # The generation prompt is given at inference, so it is not trained; trailing
                    # whitespace after the end marker is not produced by the model (EOS is, instead).
                    t_start = start + len(self.generation_prompt)
                    t_end = start + len(text[start:end].rstrip())
                else:
                    t_start, t_end = start, end
                segments.append(Segment(m.role, start, end, c_start, c_end, t_start, t_end, m.role == "assistant"))
            else:
                segments.append(Segment(m.role, start, end, c_start, c_end, end, end, False))
        if add_generation_prompt:
            text += self.generation_prompt
        return Rendered(text, segments)


_SENTINEL = "\x00\x01content\x01\x00"


class JinjaTemplate(Template):
    """The tokenizer's own ``chat_template``. Spans come from rendering each prefix of the conversation,
    which requires the template to be prefix-stable (true of every mainstream chat template)."""

    kind = "jinja"

    def __init__(self, name: str, data: dict, source: str, tokenizer: Any):
        super().__init__(name, data, source)
        self.tokenizer = tokenizer
        self.chat_template = data["chat_template"]
        probe = self._apply([Message("user", "\x00q"), Message("assistant", "\x00a")], False)
        after = probe.split("\x00a", 1)[-1].strip()
        eos = getattr(tokenizer, "eos_token", None)
        self.stop = self.stop or [s for s in dict.fromkeys([after, eos]) if s]
        asked = [Message("user", "\x00q")]
        prompt, plain = self._apply(asked, True), self._apply(asked, False)
        self.generation_prompt = prompt[len(plain):] if prompt.startswith(plain) else ""

    def _apply(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # Jinja raises many types (e.g. raise_exception for a bad role order)
            raise TemplateError(f"chat_template failed: {exc}") from None

    def get_response(self, output: str) -> str:
        marker = self.generation_prompt.strip()
        if marker and marker in output:
            output = output.rsplit(marker, 1)[1]
        return cut_at_stop(output, self.stop).strip()

    def render(self, messages, add_generation_prompt=False, input=None):
        messages = list(messages)
        if input:
            first = next((i for i, m in enumerate(messages) if m.role == "user"), 0)
            messages[first] = Message("user", f"{messages[first].content}\n\n{input}")
        for m in messages:
            if m.role not in ("system", "user", "assistant"):
                raise TemplateError(f"template {self.name!r} has no format for role {m.role!r}")
        text = self._apply(messages, add_generation_prompt)
        segments = []
        prev = ""
        for i, m in enumerate(messages):
            upto = self._apply(messages[: i + 1], False)
            if not upto.startswith(prev) or not text.startswith(upto):
                raise TemplateError(
                    f"chat_template of {self.name!r} is not prefix-stable (rendering turn {i + 1} changes "
                    "earlier text), so trained spans cannot be located; use a named template"
                )
            start, end = len(prev), len(upto)
            # Locate the content by rendering a sentinel in its place: a text search could match the
            # role header instead (a system message that reads "system").
            probe = self._apply(messages[:i] + [Message(m.role, _SENTINEL)], False)
            c_start = probe.find(_SENTINEL)
            if c_start < start or upto[c_start:c_start + len(m.content)] != m.content:
                raise TemplateError(f"chat_template of {self.name!r} rewrites message content; use a named template")
            c_end = c_start + len(m.content)
            if m.role == "assistant":
                gen = self._apply(messages[:i], True)
                t_start = len(gen) if upto.startswith(gen) and len(gen) >= start else c_start
                t_end = start + len(upto[start:end].rstrip())
                segments.append(Segment("assistant", start, end, c_start, c_end, t_start, t_end, True))
            else:
                segments.append(Segment(m.role, start, end, c_start, c_end, end, end, False))
            prev = upto
        return Rendered(text, segments, add_special_tokens=False)
