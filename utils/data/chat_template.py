"""A training template (templates/*.json) written as a Jinja ``chat_template``, so a merged or converted
model carries the exact format it was trained on to tools that only read the tokenizer.

``to_jinja(template)`` builds the Jinja text; ``check_jinja(template, jinja, eos)`` renders sample
conversations both ways and returns None if they agree, else what differs (the exporters then leave the
tokenizer's chat template alone and say why). Instruction templates end the answer with EOS, as
training does; conversation templates write exactly their formats.
"""

from __future__ import annotations

import json
import string

from utils.data.templates import Message, Template


def _lit(text: str) -> str:
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _fmt(fmt: str, fields: dict[str, str]) -> str:
    """A str.format pattern as Jinja: literals quoted, each {field} replaced by a Jinja expression."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        out.append(_lit(literal))
        if name is not None:
            out.append(fields[name])
    return "".join(out)


def to_jinja(template: Template) -> str | None:
    kind = getattr(template, "kind", "")
    data = template.data
    if kind == "jinja":
        return data["chat_template"]
    if kind == "instruction":
        pre, post = data["prompt_no_input"].split("{instruction}")
        unescape = lambda s: s.replace("{{", "{").replace("}}", "}")  # noqa: E731
        return ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}" + _lit(unescape(pre)) + "{{ m['content'] }}"
                + _lit(unescape(post)) + "{%- elif m['role'] == 'assistant' -%}{{ m['content'] }}{{ eos_token }}"
                "{%- else -%}{{ raise_exception('this instruction template has no ' + m['role'] + ' role') }}"
                "{%- endif -%}{%- endfor -%}")
    if kind != "conversation":
        return None
    system_block = ""
    if "system_format" in data:
        system_block = ("{%- if ns.system -%}" + _fmt(data["system_format"], {"system": "{{ ns.system }}"})
                        + "{%- endif -%}")
    first_user = data.get("first_user_format")
    system_in_turn = first_user is not None and "{system}" in first_user
    parts = ["{%- set ns = namespace(system=" + json.dumps(data.get("system", "") or "") + ", start=0, round=0) -%}",
             "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}"
             "{%- set ns.start = 1 -%}{%- endif -%}",
             "{%- set n_user = messages | selectattr('role', 'equalto', 'user') | list | length -%}"]
    if not system_in_turn:
        parts.append(system_block)
    parts.append("{%- for m in messages[ns.start:] -%}")

    def role_text(fmt: str) -> str:
        fields = {"content": "{{ m['content'] }}", "round": "{{ ns.round }}", "system": system_block}
        if data.get("omit_space_before_whitespace"):
            pre, post = fmt.split("{content}")
            if pre.endswith(" "):
                return ("{%- if m['content'][:1].isspace() -%}" + _fmt(pre[:-1] + "{content}" + post, fields)
                        + "{%- else -%}" + _fmt(fmt, fields) + "{%- endif -%}")
        return _fmt(fmt, fields)

    user = []
    if "single_turn_user_format" in data:
        user.append(("ns.round == 0 and n_user == 1", data["single_turn_user_format"]))
    if first_user is not None:
        user.append(("ns.round == 0", first_user))
    branch = "{%- if m['role'] == 'user' -%}"
    for i, (cond, fmt) in enumerate(user):
        branch += ("{%- if " if i == 0 else "{%- elif ") + cond + " -%}" + role_text(fmt)
    branch += ("{%- else -%}" if user else "") + role_text(data["user_format"]) + ("{%- endif -%}" if user else "")
    branch += "{%- set ns.round = ns.round + 1 -%}"
    for role in ("assistant", "thought", "command", "result"):
        if f"{role}_format" in data:
            branch += "{%- elif m['role'] == '" + role + "' -%}" + role_text(data[f"{role}_format"])
    branch += ("{%- else -%}{{ raise_exception('this template has no format for role ' + m['role']) }}"
               "{%- endif -%}{%- endfor -%}")
    parts.append(branch)
    gen = getattr(template, "generation_prompt", "")
    parts.append("{%- if add_generation_prompt -%}" + _lit(gen) + "{%- endif -%}")
    return "".join(parts)


def render_jinja(jinja: str, messages: list[dict], add_generation_prompt: bool, eos: str = "", bos: str = "") -> str:
    """Render as transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(jinja).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         eos_token=eos, bos_token=bos)


def check_jinja(template: Template, jinja: str, eos: str = "</s>") -> str | None:
    """None if the Jinja text renders the sample conversations exactly as ``template`` does."""
    kind = template.kind
    if kind == "jinja":
        return None
    samples = [[Message("user", "What is 2 + 2?")], [Message("user", "Hi"), Message("assistant", "Hello! 4.")]]
    if kind == "conversation":
        samples += [[Message("user", "a"), Message("assistant", "b"), Message("user", " c")]]
        if "system_format" in template.data:
            samples += [[Message("system", "Be brief."), Message("user", "a"), Message("assistant", "b"),
                         Message("user", "\nc")]]
    for messages in samples:
        gen = messages[-1].role == "user"
        try:
            want = template.render(messages, add_generation_prompt=gen).text
        except Exception:  # a conversation the template itself refuses: nothing to compare
            continue
        if kind == "instruction" and not gen:
            want += eos
        try:
            got = render_jinja(jinja, [{"role": m.role, "content": m.content} for m in messages], gen, eos)
        except Exception as exc:
            return f"the Jinja version fails on {[m.role for m in messages]}: {exc}"
        if got != want:
            return f"rendering differs for {[m.role for m in messages]}: {got!r} != {want!r}"
    return None
