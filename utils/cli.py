"""The command-line entry shared by every stage: Fire, made strict.

Plain Fire has traps that are expensive in cron jobs (google/python-fire#168): a misspelled flag runs
the whole job with the default and only complains afterwards; values are typed by what they look like,
not by the annotation (``--run_name=2024`` arrives as an int, ``--targets=q_proj,v_proj`` as a tuple);
and one-letter aliases are derived from first letters, so ``-o`` was ``--output_dir`` in one stage and
``--overwrite`` in the next. ``run(main)`` binds ``sys.argv`` against ``main``'s signature *before*
anything runs, reports every problem at once (naming the valid flags and the closest match), coerces
each value to its annotation, prints the resolved arguments to stderr, and only then hands the call to
Fire, as full ``--name=<json>`` flags built from the bound values: Fire never sees the user's argv.
``--help`` is built here from ``main``'s signature and Google-style docstring (types shown whole).

Accepted forms: ``--name=value``, ``--name value``, ``--some-name`` for ``some_name``; for booleans
``--name``, ``--noname``, ``--name=VALUE`` and ``--name true`` / ``--name false`` (any case, as Fire and
so alpaca-lora's command lines write it); ``--name a b c`` (or ``a,b,c`` or ``[a,b,c]``) for list
parameters; and positional values for the parameters before ``*``. Flags are never abbreviated and the
only short flag is ``-h`` (``SHORT_FLAGS``); any other single-dash word is refused.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import os
import re
import sys
import types
import typing
import warnings
from typing import Any, Callable, Literal


from utils.errors import SuiteError, UsageError
__all__ = ["run", "parse_size", "bind_args", "coerce", "help_text", "SHORT_FLAGS",
           "DESTRUCTIVE_FLAG", "is_destructive", "QUIET_WARNINGS", "quiet_known_warnings"]


#: The suite's short flags: each means the same in every stage, and each is listed in every ``--help``.
#: Fire derives one-letter aliases from first letters, per stage, so the same letter named different
#: flags in different stages (``-o``: ``--output_dir`` or ``--overwrite``). Here nothing is derived: a
#: short flag exists only if it is written in this table, and every other single-dash word is refused.
SHORT_FLAGS: dict[str, str] = {"-h": "--help"}

#: Flags that replace data or lower a safety check, by name pattern, so that a flag added later under one
#: of these names is covered without further change: ``--overwrite``, ``--insecure``, every ``--allow_*``,
#: ``--trust_remote_code``, and any ``--force*`` / ``--delete*``. Such a flag is taken only when spelled
#: out in full (``--overwrite``, ``--overwrite=true``, ``--overwrite true``): never from a short flag
#: (``SHORT_FLAGS`` may not reach one; the test suite checks it), never from a prefix, and never from a
#: positional value.
DESTRUCTIVE_FLAG = re.compile(r"overwrite|insecure|allow_\w+|trust_remote_code|force(_\w+)?|delete(_\w+)?")


def is_destructive(name: str) -> bool:
    """Whether parameter ``name`` (without dashes) is a flag that replaces data or lowers a safety check."""
    return DESTRUCTIVE_FLAG.fullmatch(name) is not None


#: Third-party deprecation notices that every stage would print although nothing in our command lines
#: causes them and nobody running a stage can act on them: (message regex, category, module regex), for
#: ``warnings.filterwarnings``. Each is matched on all three, so any other warning, ours above all, shows.
QUIET_WARNINGS: list[tuple[str, type[Warning], str]] = [
    # transformers 5 renamed gradient -> activation checkpointing; peft still asks for the old names
    # (``PeftModel.__init__`` reads ``is_gradient_checkpointing``; ``prepare_model_for_kbit_training``
    # calls ``gradient_checkpointing_enable``). The warning is attributed to transformers.modeling_utils.
    (r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated", FutureWarning,
     r"transformers\.modeling_utils$"),
]


def quiet_known_warnings() -> None:
    """Install the ``QUIET_WARNINGS`` filters (in front of any others)."""
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
#: The words a switch takes as its value from the *next* token (``--train_on_inputs False``), as Fire
#: does. Only these two: ``1`` / ``yes`` / ``on`` ... are refused there (``--flag=1`` is fine), because a
#: bare switch may be followed by a positional value, and such a value must not vanish into the switch.
_SWITCH_WORDS = {"true", "false"}
_NONE = {"none", "null"}


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for ``X | None`` / ``Optional[X]``, else (False, tp)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, (args[0] if len(args) == 1 else typing.Union[tuple(args)])
    return False, tp


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple) or tp in (list, tuple)


def _split_list(raw: str) -> list[str]:
    """A single command-line token for a list parameter: JSON list, Fire's ``[a,b]``, or ``a,b``."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            value = json.loads(text)
            if isinstance(value, list):
                return [v if isinstance(v, str) else json.dumps(v) for v in value]
        except json.JSONDecodeError:
            pass
        text = text[1:-1]
    return [part.strip() for part in text.split(",") if part.strip()]


def coerce(value: Any, tp: Any, flag: str) -> Any:
    """Convert a raw command-line string (or list of strings) to annotation ``tp``.

    Raises:
        ValueError: with a message naming ``flag`` and what was expected.
    """
    optional, inner = _is_optional(tp)
    if isinstance(value, str) and optional and value.strip().lower() in _NONE:
        return None
    tp = inner
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if _is_list(tp):
        items = value if isinstance(value, list) else _split_list(value)
        (item_tp,) = typing.get_args(tp)[:1] or (str,)
        return [coerce(item, item_tp, flag) for item in items]
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{flag} takes one value, got {len(value)}: {' '.join(value)}")
        value = value[0]
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == value:
                return choice
        raise ValueError(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if tp is bool:
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{flag} expects true or false; got {value!r}")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{flag} expects an integer; got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{flag} expects a number; got {value!r}") from None
    if tp is str:
        return value
    # Unions of scalars (e.g. ``int | str``): first that fits.
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, flag)
            except ValueError:
                continue
        raise ValueError(f"{flag}: cannot read {value!r} as {tp}")
    return tp(value)


def _single_dash_problem(token: str, names: list[str]) -> str:
    """The message for a single-dash word (``-o``, ``-overwrite``): refused, naming what was maybe meant."""
    word = token[1:].replace("-", "_")
    if word in names:
        return f"unknown flag {token}: write --{word} (flags take two dashes)"
    candidates = [n for n in names if n.startswith(word)]
    shorts = ", ".join(f"{s} ({l})" for s, l in SHORT_FLAGS.items())
    hint = ("; write the full name: " + " or ".join(f"--{n}" for n in candidates)) if candidates else ""
    return f"unknown flag {token}: the only short flag is {shorts}, and flags are never abbreviated{hint}"


def bind_args(main: Callable, argv: list[str]) -> dict[str, Any]:
    """Bind ``argv`` to ``main``'s parameters, coerced to their annotations.

    Returns:
        The full set of resolved arguments (defaults included), in signature order.

    Raises:
        UsageError: listing every problem found (unknown flags, missing required values, bad values).
    """
    return _Binder(main, argv).bind()


def _is_flag(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not _looks_numeric(token)


class _Binder:
    """One reading of a command line: flags first, then positional values into the parameters left, then
    coercion; every problem is collected (``problems``) and reported together."""

    def __init__(self, main: Callable, argv: list[str]):
        self.argv, self.i = argv, 0
        self.params = inspect.signature(main).parameters
        self.hints = typing.get_type_hints(main)
        self.names = list(self.params)
        self.is_bool = {n: _is_optional(self.hints.get(n, str))[1] is bool for n in self.names}
        self.is_list = {n: _is_list(_is_optional(self.hints.get(n, str))[1]) for n in self.names}
        self.raw: dict[str, Any] = {}
        self.positional: list[str] = []
        self.after_switch: dict[int, str] = {}  # index in ``positional`` -> the bare switch just before that value
        self.problems: list[str] = []

    def bind(self) -> dict[str, Any]:
        self.read_tokens()
        self.fill_positionals()
        resolved = self.coerced()
        if self.problems:
            valid = " ".join(f"--{n}" for n in self.names)
            raise UsageError("\n".join(f"  {p}" for p in self.problems) + f"\nvalid flags: {valid}\n(see --help)")
        return resolved

    def resolve(self, token: str) -> str | None:
        """The parameter a flag names (``!name`` for ``--noNAME``), or None after recording why not."""
        if SHORT_FLAGS.get(token, "")[2:] in self.params:
            return SHORT_FLAGS[token][2:]
        if not token.startswith("--"):
            self.problems.append(_single_dash_problem(token, self.names))
            return None
        key = token[2:].replace("-", "_")
        if key in self.params:
            return key
        if key.startswith("no") and key[2:] in self.params and self.is_bool[key[2:]]:
            return "!" + key[2:]
        close = difflib.get_close_matches(key, self.names, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        self.problems.append(f"unknown flag {token}{hint}")
        return None

    def next_is(self, words: set[str]) -> bool:
        return self.i < len(self.argv) and self.argv[self.i].strip().lower() in words

    def next_is_value(self) -> bool:
        return self.i < len(self.argv) and not _is_flag(self.argv[self.i])

    def take(self) -> str:
        self.i += 1
        return self.argv[self.i - 1]

    def read_tokens(self) -> None:
        while self.i < len(self.argv):
            token = self.take()
            if token == "--":
                self.positional.extend(self.argv[self.i:])
                break
            if not _is_flag(token):
                self.positional.append(token)
                continue
            flag, eq, inline = token.partition("=")
            name = self.resolve(flag)
            if name is None:
                # Skip a value that clearly belongs to the unknown flag, so it is not taken as positional.
                if not eq and self.next_is_value():
                    self.take()
            elif name.startswith("!"):
                self.read_negated(name[1:], eq, inline)
            else:
                if name in self.raw:
                    self.problems.append(f"--{name} given more than once")
                self.read_value(name, eq, inline)

    def read_negated(self, name: str, eq: str, inline: str) -> None:
        if eq or self.next_is(_SWITCH_WORDS):
            value = inline if eq else self.take()
            self.problems.append(f"--no{name} takes no value (use --{name}={value})")
        elif name in self.raw:
            self.problems.append(f"--{name} given more than once")
        self.raw[name] = "false"

    def read_value(self, name: str, eq: str, inline: str) -> None:
        if eq:
            self.raw[name] = inline
        elif self.is_bool[name]:
            self.read_switch(name)
        elif self.is_list[name]:
            values = []
            while self.next_is_value():
                values.append(self.take())
            if not values:
                self.problems.append(f"--{name} needs at least one value")
            # One token may itself be a list ("a,b" or "[a,b]"); several tokens are taken as they are.
            self.raw[name] = values[0] if len(values) == 1 else values
        elif self.next_is_value():
            self.raw[name] = self.take()
        else:
            self.problems.append(f"--{name} needs a value")

    def read_switch(self, name: str) -> None:
        if self.next_is(_SWITCH_WORDS):
            # Fire's reading, which alpaca-lora's command lines rely on: --train_on_inputs False.
            self.raw[name] = self.take()
        elif self.next_is(_TRUE | _FALSE):
            # --flag 1 / --flag no: a value or a positional? Neither guess is safe; ask for the = form.
            value = self.take()
            self.problems.append(f"--{name} {value}: after a space a switch takes only true or false; "
                                 f"write --{name}={value}")
        else:
            # A bare switch; what follows is not its value (a positional value may follow it).
            self.raw[name] = "true"
            if self.next_is_value():
                self.after_switch[len(self.positional)] = name

    def fill_positionals(self) -> None:
        """Positional values fill the parameters not given as flags, in order; a flag that replaces data or
        lowers a safety check is never filled from a stray positional value."""
        free = [n for n in self.names if n not in self.raw
                and self.params[n].kind is not inspect.Parameter.KEYWORD_ONLY]
        for k, (value, name) in enumerate(zip(self.positional, free)):
            if is_destructive(name):
                self.problems.append(f"--{name} must be given by name, not as the positional value {value!r}")
                continue
            if k in self.after_switch and self.params[name].default is not inspect.Parameter.empty:
                # "--train_on_inputs maybe" must not quietly become an optional positional (output_dir="maybe");
                # a required one may follow a bare switch ("--flag MODEL"): without it the command fails anyway.
                switch = self.after_switch[k]
                self.problems.append(f"--{switch} {value}: --{switch} is a switch (it takes no value, or true / "
                                     f"false); write --{name}={value} if {value!r} is meant for --{name}")
                continue
            self.raw[name] = value
        if len(self.positional) > len(free):
            extra = self.positional[len(free):]
            switches = [self.after_switch[k] for k in range(len(free), len(self.positional)) if k in self.after_switch]
            hint = "".join(f" (--{s} is a switch: it takes no value, or true / false)" for s in switches)
            self.problems.append("unexpected positional arguments: " + " ".join(extra) + hint)

    def coerced(self) -> dict[str, Any]:
        resolved: dict[str, Any] = {}
        for name, param in self.params.items():
            if name in self.raw:
                try:
                    resolved[name] = coerce(self.raw[name], self.hints.get(name, str), f"--{name}")
                except ValueError as exc:
                    self.problems.append(str(exc))
            elif param.default is inspect.Parameter.empty:
                self.problems.append(f"--{name} is required")
            else:
                resolved[name] = param.default
        return resolved


def _looks_numeric(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _type_text(main: Callable, name: str) -> str:
    """The annotation of ``name`` as written in the source, whole (Fire's help cuts it at 72 columns)."""
    annotation = inspect.signature(main).parameters[name].annotation
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return " ".join(text.split())


def _default_text(main: Callable, name: str) -> str:
    default = inspect.signature(main).parameters[name].default
    if isinstance(default, tuple):  # tuple defaults stand in for immutable lists
        default = list(default)
    return repr(default)


def help_text(main: Callable, prog: str) -> str:
    """The help page for ``main``, from its signature and Google-style docstring, for stdout.

    Laid out as Fire's (NAME, SYNOPSIS, DESCRIPTION, POSITIONAL ARGUMENTS, FLAGS, NOTES), but built here:
    Fire cuts long types (``Literal['cosine...``) and advertises one-letter aliases we do not accept.
    """
    from fire import docstrings

    doc = docstrings.parse(inspect.getdoc(main) or "")
    described = {a.name.lstrip("*"): a.description for a in doc.args or []}
    params = inspect.signature(main).parameters
    keyword_only = inspect.Parameter.KEYWORD_ONLY
    required = [n for n, p in params.items() if p.kind is not keyword_only and p.default is p.empty]
    optional = [n for n, p in params.items() if p.kind is not keyword_only and p.default is not p.empty]
    flags = [n for n in params if n not in required]

    def item(head: str, name: str, with_default: bool) -> str:
        lines = [head]
        if _type_text(main, name):
            lines.append(f"    Type: {_type_text(main, name)}")
        if with_default:
            lines.append(f"    Default: {_default_text(main, name)}")
        if described.get(name):
            lines.append("    " + " ".join(described[name].split()))
        return "\n".join(lines)

    summary = doc.summary or ""
    synopsis = " ".join([prog, *(n.upper() for n in required), *(f"[{n.upper()}]" for n in optional), "<flags>"])
    sections = [("NAME", f"{prog} - {summary}" if summary else prog), ("SYNOPSIS", synopsis),
                ("DESCRIPTION", "\n\n".join(p for p in (summary, doc.description) if p))]
    if required:
        sections.append(("POSITIONAL ARGUMENTS", "\n".join(item(n.upper(), n, False) for n in required)))
    entries = [item(f"--{n}={n.upper()}" + (" (required)" if params[n].default is params[n].empty else ""), n,
                    params[n].default is not params[n].empty) for n in flags]
    entries += [f"{short}, {long}\n    Show this help and exit." for short, long in SHORT_FLAGS.items()]
    sections.append(("FLAGS", "\n".join(entries)))
    shorts = ", ".join(SHORT_FLAGS)
    sections.append(("NOTES", "\n".join([
        "Positional arguments can also be given as flags (--name=VALUE)." if required or optional else "",
        f"Flags are written in full, with two dashes (--some-name is --some_name); the only short flag is "
        f"{shorts}.",
        "Switches: --name, --noname, --name=false, or --name true / --name false.",
        "Lists: --name a b c, --name=a,b,c or --name='[a,b,c]'.",
    ]).strip()))
    indent = " " * 4
    return "\n\n".join(f"{title}\n" + "\n".join(indent + line if line else line for line in body.splitlines())
                       for title, body in sections if body)


# Flags whose values never reach a log (API keys, passwords).
SECRET_FLAGS = frozenset({"api_key", "ui_auth"})


def run(main: Callable, argv: list[str] | None = None) -> None:
    """Run ``main`` as a strict Fire command. Exit 2 on bad arguments, 1 on a ``SuiteError``."""
    prog = os.path.basename(sys.argv[0]) if argv is None else f"{main.__module__}.{main.__name__}"
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--help" or SHORT_FLAGS.get(a) == "--help" for a in argv):
        try:
            print(help_text(main, prog))
            sys.stdout.flush()
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    try:
        kwargs = bind_args(main, argv)
    except UsageError as exc:
        print(f"{prog}: invalid arguments\n{exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    if os.environ.get("RANK", "0") == "0":  # once per torchrun job, not once per process
        shown = {k: ("<redacted>" if k in SECRET_FLAGS and v else v) for k, v in kwargs.items()}
        print(f"{prog}: resolved arguments " + json.dumps(shown, ensure_ascii=False, default=str), file=sys.stderr)

    import fire

    @functools.wraps(main)
    def call(*args: Any, **kw: Any) -> None:
        main(*args, **kw)  # return nothing: Fire would print or chain on a returned value

    # Values go to Fire as JSON and come back untouched: Fire's own guessing never sees them.
    call = fire.decorators.SetParseFn(json.loads, *kwargs)(call)
    command = [f"--{k}={json.dumps(v, ensure_ascii=False)}" for k, v in kwargs.items()]
    # The filters last for this call only (an in-process caller, such as a test, keeps its own).
    with warnings.catch_warnings():
        quiet_known_warnings()
        try:
            fire.Fire(call, command=command, name=prog)
        except SuiteError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)


def parse_size(text: str | int, flag: str = "--max_shard_size") -> int:
    """``200MB`` / ``2GB`` (decimal, as Hugging Face) / ``1GiB`` / a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]i?)?B)?\s*", str(text), re.I)
    if not m or float(m.group(1)) <= 0:
        raise SuiteError(f"{flag} must look like 200MB, 2GB or 1GiB; got {text!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)
