"""The command-line entry shared by every stage: Fire, made strict.

Plain Fire has two traps that are expensive in cron jobs (google/python-fire#168): a misspelled flag runs
the whole job with the default and only complains afterwards, and values are typed by what they look
like, not by the annotation (``--run_name=2024`` arrives as an int, ``--targets=q_proj,v_proj`` as a
tuple). ``run(main)`` binds ``sys.argv`` against ``main``'s signature *before* anything runs, reports
every problem at once (naming the valid flags and the closest match), coerces each value to its
annotation, prints the resolved arguments to stderr, and only then hands the call to Fire. ``--help``
is Fire's, built from ``main``'s Google-style docstring.

Accepted forms: ``--name=value``, ``--name value``, ``--name`` / ``--noname`` for booleans,
``--name a b c`` (or ``a,b,c`` or ``[a,b,c]``) for list parameters, ``--some-name`` for ``some_name``,
one-letter aliases where Fire advertises them, and positional values for the required parameters.
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
from collections import Counter
from typing import Any, Callable, Literal

__all__ = ["SuiteError", "UsageError", "run", "bind_args", "coerce"]


class SuiteError(Exception):
    """An error the user can fix (bad input, bad flag, missing file). Printed without a traceback."""

    exit_code = 1


class UsageError(SuiteError):
    """Bad command-line arguments. Exit code 2, like argparse."""

    exit_code = 2


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
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


def _aliases(params: dict[str, inspect.Parameter]) -> dict[str, str]:
    """One-letter aliases exactly as Fire's help advertises them: a first letter unique among the
    keyword-only flags, or among the positional parameters that have defaults. ``-h`` is help."""
    groups = [
        [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY],
        [n for n, p in params.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY
         and p.default is not inspect.Parameter.empty],
    ]
    out = {}
    for names in groups:
        firsts = Counter(n[0] for n in names)
        out.update({n[0]: n for n in names if firsts[n[0]] == 1 and n[0] != "h"})
    return out


def bind_args(main: Callable, argv: list[str]) -> dict[str, Any]:
    """Bind ``argv`` to ``main``'s parameters, coerced to their annotations.

    Returns:
        The full set of resolved arguments (defaults included), in signature order.

    Raises:
        UsageError: listing every problem found (unknown flags, missing required values, bad values).
    """
    sig = inspect.signature(main)
    hints = typing.get_type_hints(main)
    params = sig.parameters
    names = list(params)
    aliases = _aliases(params)
    is_bool = {n: _is_optional(hints.get(n, str))[1] is bool for n in names}
    is_list = {n: _is_list(_is_optional(hints.get(n, str))[1]) for n in names}

    raw: dict[str, Any] = {}
    positional: list[str] = []
    problems: list[str] = []

    def resolve(token: str) -> str | None:
        if token.startswith("--"):
            key = token[2:].replace("-", "_")
            if key in params:
                return key
            if key.startswith("no") and key[2:] in params and is_bool[key[2:]]:
                return "!" + key[2:]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            problems.append(f"unknown flag {token.split('=')[0]}{hint}")
            return None
        letter = token[1:]
        if letter in aliases:
            return aliases[letter]
        problems.append(f"unknown flag {token}")
        return None

    def is_flag(token: str) -> bool:
        return token.startswith("-") and len(token) > 1 and not _looks_numeric(token)

    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            positional.extend(argv[i:])
            break
        if not is_flag(token):
            positional.append(token)
            continue
        flag, eq, inline = token.partition("=")
        name = resolve(flag)
        if name is None:
            # Skip a value that clearly belongs to the unknown flag, so it is not taken as positional.
            if not eq and i < len(argv) and not is_flag(argv[i]):
                i += 1
            continue
        if name.startswith("!"):
            name = name[1:]
            if eq:
                problems.append(f"--no{name} takes no value (use --{name}={inline})")
            elif name in raw:
                problems.append(f"--{name} given more than once")
            raw[name] = "false"
            continue
        if name in raw:
            problems.append(f"--{name} given more than once")
        if eq:
            raw[name] = inline
        elif is_bool[name]:
            # A bare boolean flag never swallows the next token (Fire would take it as the value).
            raw[name] = "true"
        elif is_list[name]:
            values = []
            while i < len(argv) and not is_flag(argv[i]):
                values.append(argv[i])
                i += 1
            if not values:
                problems.append(f"--{name} needs at least one value")
            # One token may itself be a list ("a,b" or "[a,b]"); several tokens are taken as they are.
            raw[name] = values[0] if len(values) == 1 else values
        elif i < len(argv) and not is_flag(argv[i]):
            raw[name] = argv[i]
            i += 1
        else:
            problems.append(f"--{name} needs a value")

    # Positional values fill the parameters that were not given as flags, in order.
    free = [n for n in names if n not in raw and params[n].kind is not inspect.Parameter.KEYWORD_ONLY]
    for value, name in zip(positional, free):
        raw[name] = value
    if len(positional) > len(free):
        problems.append("unexpected positional arguments: " + " ".join(positional[len(free):]))

    resolved: dict[str, Any] = {}
    for name, param in params.items():
        if name in raw:
            try:
                resolved[name] = coerce(raw[name], hints.get(name, str), f"--{name}")
            except ValueError as exc:
                problems.append(str(exc))
        elif param.default is inspect.Parameter.empty:
            problems.append(f"--{name} is required")
        else:
            resolved[name] = param.default
    if problems:
        valid = " ".join(f"--{n}" for n in names)
        raise UsageError("\n".join(f"  {p}" for p in problems) + f"\nvalid flags: {valid}\n(see --help)")
    return resolved


def _looks_numeric(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def help_text(main: Callable, prog: str) -> str:
    """Fire's help page for ``main`` (from its signature and Google-style docstring), for stdout."""
    from fire import helptext, trace

    text = helptext.HelpText(main, trace=trace.FireTrace(main, name=prog))
    # Fire advertises "-h, --history_column"-style aliases that we do not accept (-h is help).
    aliases = _aliases(dict(inspect.signature(main).parameters))
    return re.sub(r"-([a-zA-Z]), --(\w+)", lambda m: m.group(0) if aliases.get(m.group(1)) == m.group(2)
                  else f"--{m.group(2)}", text)


def run(main: Callable, argv: list[str] | None = None) -> None:
    """Run ``main`` as a strict Fire command. Exit 2 on bad arguments, 1 on a ``SuiteError``."""
    prog = os.path.basename(sys.argv[0]) if argv is None else f"{main.__module__}.{main.__name__}"
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(main, prog))
        return
    try:
        kwargs = bind_args(main, argv)
    except UsageError as exc:
        print(f"{prog}: invalid arguments\n{exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    if os.environ.get("RANK", "0") == "0":  # once per torchrun job, not once per process
        print(f"{prog}: resolved arguments " + json.dumps(kwargs, ensure_ascii=False, default=str), file=sys.stderr)

    import fire

    @functools.wraps(main)
    def call(*args: Any, **kw: Any) -> None:
        main(*args, **kw)  # return nothing: Fire would print or chain on a returned value

    # Values go to Fire as JSON and come back untouched: Fire's own guessing never sees them.
    call = fire.decorators.SetParseFn(json.loads, *kwargs)(call)
    command = [f"--{k}={json.dumps(v, ensure_ascii=False)}" for k, v in kwargs.items()]
    try:
        fire.Fire(call, command=command, name=prog)
    except SuiteError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
