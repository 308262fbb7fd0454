"""Reading instruction and conversation data: JSON / JSONL files in the formats of the seed projects.

Every record becomes an ``Example`` (a list of ``Message`` plus alpaca's optional ``input``) or a
``RowError`` with a category, the file and the line. The parser is total: whatever the bytes, a row
yields one of the two (tested with Hypothesis), so a bad row is counted, never a late crash.

Formats (``FORMATS``), detected per file from its records unless ``data_format`` says otherwise:

* ``alpaca``   ``{instruction, input?, output}``
* ``sharegpt`` ``{conversations: [{from, value}]}`` (ShareGPT / LLMZoo Phoenix)
* ``openai``   ``{messages: [{role, content}]}``
* ``moss``     ``{meta_instruction, chat: {turn_N: {Human, Inner Thoughts, Commands, Tool Responses, MOSS}}}``
* ``pair``     ChatGLM's ``{prompt, response, history?}``, or any two columns by name
  (``prompt_column``/``response_column``/``history_column``, e.g. ADGEN's content/summary)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from utils.errors import SuiteError
from utils.data.templates import Message
from utils.weights.folders import looks_like_hub_id

# category -> what it means (shown in reports)
ROW_ERRORS = {
    "invalid_json": "not valid JSON (e.g. a truncated line)",
    "invalid_utf8": "not valid UTF-8 / Unicode text",
    "not_an_object": "the record is not a JSON object",
    "missing_field": "a required field is missing",
    "wrong_type": "a field has the wrong type",
    "empty_prompt": "the instruction / prompt / user turn is empty",
    "empty_output": "the output / response / assistant turn is empty",
    "empty_conversation": "the conversation has no turns",
    "unknown_role": "a turn has a role that is not recognised",
    "bad_role_order": "turns do not alternate user / assistant",
    "malformed_field": "a MOSS field lacks its <|Role|>: marker or end marker",
    "unsupported_by_template": "the template cannot render this example",
    "no_trained_tokens": "no token of the example would be trained on",
}

# Outcomes that come from a length policy, not from bad data.
POLICY_DROPS = {
    "overlength": "longer than --cutoff_len (dropped by --on_overlength drop)",
    "no_trained_tokens_after_truncation": "truncation to --cutoff_len left no trained token",
}


def bad_fraction_error(n_bad: int, total: int, max_bad_fraction: float, details: str) -> str | None:
    """The suite's one rule for malformed input rows (prepare_data.py, batch generation): more than
    ``max_bad_fraction`` of ``total`` rows bad fails before anything is written. The message, or None."""
    if not total or n_bad / total <= max_bad_fraction:
        return None
    return (f"{n_bad} of {total} rows are malformed ({n_bad / total:.2%} > --max_bad_fraction "
            f"{max_bad_fraction:.2%}); nothing written. {details}")


def missing_path_message(flag: str, path: str, what: str) -> str:
    """The problem line for a data path that does not exist. One spelled like a Hugging Face Hub dataset id
    (tatsu-lab/alpaca) gets the reason: this suite reads local files only and never downloads anything."""

    text = f"{flag} {path}: no such {what}"
    if not looks_like_hub_id(path):
        return text
    return (f"{text}. It looks like a Hugging Face Hub dataset id, but this suite never downloads anything: "
            f"download it yourself (e.g. hf download {path} --repo-type dataset --local-dir DIR) and "
            "pass the local JSON / JSONL file(s)")


class DataError(SuiteError):
    """A data problem that stops the run (unreadable file, unknown format, too many bad rows)."""


@dataclass
class RowError(Exception):
    category: str
    path: str
    line: int
    detail: str = ""
    length: int = 0  # tokens, for length-policy drops (feeds the report's length statistics)
    raw: Any = field(default=None, repr=False)  # the row itself: printed only with --log_bad_rows

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def __str__(self) -> str:
        text = f"{self.where()}: {self.category} ({ROW_ERRORS.get(self.category) or POLICY_DROPS.get(self.category, '')})"
        return text + (f": {self.detail}" if self.detail else "")


@dataclass
class Example:
    messages: list[Message]
    input: str | None = None  # alpaca's input field, joined to the instruction by the template
    path: str = ""
    line: int = 0
    notes: list[str] = field(default_factory=list)  # repairs made while parsing, counted in the report


@dataclass
class Record:
    path: str
    line: int
    value: Any


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(value: Any) -> bool:
    """True if any string in ``value`` holds a lone surrogate: an invalid UTF-8 byte (decoded with
    ``surrogateescape``) or an unpaired ``\\udXXX`` escape. Such text cannot be tokenized or saved.
    Iterative, so deeply nested rows cannot exhaust the stack."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _is_json_lines(text: str) -> bool:
    """A file starting with '[' is JSON lines, not one array, if its first line is a complete JSON
    value by itself and more lines follow."""
    first, _, rest = text.lstrip().partition("\n")
    if not rest.strip():
        return False
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return False
    return True


def read_records(path: str | Path) -> Iterator[Record | RowError]:
    """Yield each record of a JSON array or JSON-lines file with its 1-based line number.

    Bad rows are yielded as ``RowError`` (``invalid_json``, ``invalid_utf8``); an unreadable or
    empty file raises ``DataError``.
    """
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"--data_path: cannot read {path}: {exc.strerror or exc}") from None
    # surrogateescape keeps invalid bytes as lone surrogates, so one bad row does not sink the file.
    text = raw.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"--data_path: {path} is empty")
    if stripped[0] == "[" and not _is_json_lines(text):
        yield from _read_json_array(path, text)
    else:
        yield from _read_json_lines(path, text)


def _read_json_lines(path: str, text: str) -> Iterator[Record | RowError]:
    decoder = json.JSONDecoder()
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if _SURROGATE.search(line):
            yield RowError("invalid_utf8", path, lineno, raw=line)
            continue
        try:
            value, end = decoder.raw_decode(line.strip())
            if line.strip()[end:].strip():
                raise ValueError("extra data after the JSON value")
        except (json.JSONDecodeError, ValueError) as exc:
            yield RowError("invalid_json", path, lineno, str(exc), raw=line)
            continue
        except RecursionError:
            yield RowError("invalid_json", path, lineno, "nested too deeply", raw=line[:1000])
            continue
        if _has_surrogate(value):  # an unpaired \udXXX escape
            yield RowError("invalid_utf8", path, lineno, raw=line)
            continue
        yield Record(path, lineno, value)


def _read_json_array(path: str, text: str) -> Iterator[Record | RowError]:
    """Elements of a top-level JSON array, decoded one at a time so each has a line number."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end() + 1  # past '['
    line, counted = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    pos = ws.match(text, pos).end()
    if text.startswith("]", pos):
        return
    while True:
        lineno = line_at(pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Elements after a syntax error cannot be located reliably: report it and stop.
            yield RowError("invalid_json", path, line_at(max(exc.pos, pos)), f"{exc.msg}; rest of file not read")
            return
        except RecursionError:
            yield RowError("invalid_json", path, lineno, "nested too deeply; rest of file not read")
            return
        if _has_surrogate(value):
            yield RowError("invalid_utf8", path, lineno, raw=value)
        else:
            yield Record(path, lineno, value)
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            rest = ws.match(text, pos + 1).end()
            if rest < len(text):
                yield RowError("invalid_json", path, line_at(rest), "data after the closing ']' of the array (not read)")
            return
        else:
            yield RowError("invalid_json", path, line_at(pos), "expected ',' or ']' between elements; rest of file not read")
            return


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """Column names for the ``pair`` format (ChatGLM's prompt/response/history by default)."""

    prompt: str = "prompt"
    response: str = "response"
    history: str = "history"


def _get_str(rec: Record, key: str, *, required: bool = True, allow_empty: bool = True,
             empty_category: str = "empty_prompt") -> str | None:
    obj = rec.value
    if key not in obj or obj[key] is None:
        if required:
            raise RowError("missing_field", rec.path, rec.line, f"field {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise RowError("wrong_type", rec.path, rec.line, f"field {key!r} is {type(value).__name__}, expected string")
    if not allow_empty and not value.strip():
        raise RowError(empty_category, rec.path, rec.line, f"field {key!r}")
    return value


def parse_alpaca(rec: Record, columns: Columns) -> Example:
    instruction = _get_str(rec, "instruction", allow_empty=False)
    input_ = _get_str(rec, "input", required=False) or None
    output = _get_str(rec, "output", allow_empty=False, empty_category="empty_output")
    return Example([Message("user", instruction), Message("assistant", output)], input=input_)


_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}


def _check_turns(rec: Record, messages: list[Message], notes: list[str]) -> list[Message]:
    """Validate order (optional system, then user/assistant alternating) and emptiness."""
    if not messages:
        raise RowError("empty_conversation", rec.path, rec.line)
    body = messages[1:] if messages[0].role == "system" else messages
    if any(m.role == "system" for m in body):
        raise RowError("bad_role_order", rec.path, rec.line, "system turn after the first turn")
    if body and body[-1].role == "user" and len(body) > 1:
        # ShareGPT dumps often end on an unanswered question: drop it (counted in the report).
        body = body[:-1]
        notes.append("dropped_trailing_user_turn")
    if not body:
        raise RowError("empty_conversation", rec.path, rec.line)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise RowError("bad_role_order", rec.path, rec.line, f"turn {i + 1} is {m.role}, expected {expected}")
    if body[-1].role != "assistant":
        raise RowError("bad_role_order", rec.path, rec.line, "no assistant turn")
    for m in body:
        if not m.content.strip():
            raise RowError("empty_output" if m.role == "assistant" else "empty_prompt", rec.path, rec.line,
                           f"empty {m.role} turn")
    return (messages[:1] if messages[0].role == "system" else []) + body


def _parse_turns(rec: Record, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> Example:
    turns = rec.value.get(key)
    if turns is None:
        raise RowError("missing_field", rec.path, rec.line, f"field {key!r}")
    if not isinstance(turns, list):
        raise RowError("wrong_type", rec.path, rec.line, f"field {key!r} is {type(turns).__name__}, expected list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("wrong_type", rec.path, rec.line, f"{key}[{i}] is not an object")
        for k in (role_key, content_key):
            if k not in turn or turn[k] is None:
                raise RowError("missing_field", rec.path, rec.line, f"{key}[{i}].{k}")
        role, content = turn[role_key], turn[content_key]
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                content = "".join(p["text"] for p in content)
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowError("wrong_type", rec.path, rec.line, f"{key}[{i}] {role_key}/{content_key} must be strings")
        mapped = roles.get(role.strip().lower())
        if mapped is None:
            raise RowError("unknown_role", rec.path, rec.line, f"{key}[{i}].{role_key}")
        messages.append(Message(mapped, content))
    notes: list[str] = []
    return Example(_check_turns(rec, messages, notes), notes=notes)


def parse_sharegpt(rec: Record, columns: Columns) -> Example:
    return _parse_turns(rec, "conversations", "from", "value", _SHAREGPT_ROLES)


def parse_openai(rec: Record, columns: Columns) -> Example:
    return _parse_turns(rec, "messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"})


# MOSS turn fields, in the order MOSS renders them: (field, our role, start marker, end marker)
MOSS_FIELDS = (
    ("Human", "user", "<|Human|>:", "<eoh>"),
    ("Inner Thoughts", "thought", "<|Inner Thoughts|>:", "<eot>"),
    ("Commands", "command", "<|Commands|>:", "<eoc>"),
    ("Tool Responses", "result", "<|Results|>:", "<eor>"),
    ("MOSS", "assistant", "<|MOSS|>:", "<eom>"),
)


def parse_moss(rec: Record, columns: Columns) -> Example:
    meta = _get_str(rec, "meta_instruction", required=False) or ""
    chat = rec.value.get("chat")
    if chat is None:
        raise RowError("missing_field", rec.path, rec.line, "field 'chat'")
    if not isinstance(chat, dict):
        raise RowError("wrong_type", rec.path, rec.line, "field 'chat' is not an object")

    def turn_no(key: str) -> int:
        m = re.fullmatch(r"turn_(\d+)", key)
        if not m:
            raise RowError("malformed_field", rec.path, rec.line, "a chat key is not turn_N")
        return int(m.group(1))

    messages = [Message("system", meta)] if meta else []
    for key in sorted(chat, key=turn_no):
        turn = chat[key]
        if not isinstance(turn, dict):
            raise RowError("wrong_type", rec.path, rec.line, f"chat.{key} is not an object")
        for name, role, start, end in MOSS_FIELDS:
            if name not in turn or turn[name] is None:
                raise RowError("missing_field", rec.path, rec.line, f"chat.{key}.{name}")
            value = turn[name]
            if not isinstance(value, str):
                raise RowError("wrong_type", rec.path, rec.line, f"chat.{key}.{name} is not a string")
            body = value.rstrip("\n")
            if not (body.startswith(start) and body.endswith(end)):
                raise RowError("malformed_field", rec.path, rec.line, f"chat.{key}.{name}: expected {start} ... {end}")
            content = body[len(start): len(body) - len(end)]
            if content.startswith(" ") and not content[1:2].isspace():
                # The template writes '<|Role|>: ' and omits that space before content that starts
                # with whitespace, so this inverts it exactly (': None', ':\nSearch...', ': \n\nText').
                content = content[1:]
            messages.append(Message(role, content))
    if not any(m.role == "assistant" for m in messages):
        raise RowError("empty_conversation", rec.path, rec.line)
    for m in messages:
        if m.role == "assistant" and not m.content.strip():
            raise RowError("empty_output", rec.path, rec.line, "empty MOSS reply")
        if m.role == "user" and not m.content.strip():
            raise RowError("empty_prompt", rec.path, rec.line, "empty Human turn")
    return Example(messages)


def parse_pair(rec: Record, columns: Columns) -> Example:
    prompt = _get_str(rec, columns.prompt, allow_empty=False)
    response = _get_str(rec, columns.response, allow_empty=False, empty_category="empty_output")
    messages: list[Message] = []
    history = rec.value.get(columns.history)
    if history is not None:
        if not isinstance(history, list):
            raise RowError("wrong_type", rec.path, rec.line, f"field {columns.history!r} is not a list")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RowError("wrong_type", rec.path, rec.line, f"{columns.history}[{i}] is not a [query, response] pair")
            if not pair[0].strip():
                raise RowError("empty_prompt", rec.path, rec.line, f"{columns.history}[{i}]")
            if not pair[1].strip():
                raise RowError("empty_output", rec.path, rec.line, f"{columns.history}[{i}]")
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    messages += [Message("user", prompt), Message("assistant", response)]
    return Example(messages)


# name -> (parser, keys that identify the format)
FORMATS: dict[str, tuple[Callable[[Record, Columns], Example], Callable[[dict, Columns], bool]]] = {
    "alpaca": (parse_alpaca, lambda o, c: "instruction" in o or "output" in o),
    "sharegpt": (parse_sharegpt, lambda o, c: "conversations" in o),
    "openai": (parse_openai, lambda o, c: "messages" in o),
    "moss": (parse_moss, lambda o, c: "chat" in o and "meta_instruction" in o),
    "pair": (parse_pair, lambda o, c: c.prompt in o and c.response in o),
}


def detect_format(records: list[Record | RowError], path: str, columns: Columns) -> str:
    """The format most of the first records match; DataError if none does."""
    votes: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    for rec in records:
        if isinstance(rec, Record) and isinstance(rec.value, dict):
            keys.update(rec.value.keys())
            for name, (_, matches) in FORMATS.items():
                if matches(rec.value, columns):
                    votes[name] += 1
    if not votes:
        seen = ", ".join(k for k, _ in keys.most_common(8)) or "none"
        raise DataError(
            f"--data_path: cannot tell the format of {path} (keys seen: {seen}); pass --data_format "
            f"({'|'.join(FORMATS)}) or name the columns with --prompt_column/--response_column"
        )
    return votes.most_common(1)[0][0]


def parse_record(rec: Record, fmt: str, columns: Columns) -> Example:
    """One record to an Example; raises RowError. Total: no other exception escapes."""
    if not isinstance(rec.value, dict):
        raise RowError("not_an_object", rec.path, rec.line, f"got {type(rec.value).__name__}", raw=rec.value)
    parser = FORMATS[fmt][0]
    try:
        example = parser(rec, columns)
    except RowError as err:
        err.raw = rec.value
        raise
    except Exception as exc:  # a parser bug must still point at the row that triggered it
        raise RowError("malformed_field", rec.path, rec.line, f"parser error {type(exc).__name__}", raw=rec.value) from exc
    example.path, example.line = rec.path, rec.line
    return example


def load_examples(path: str, data_format: str, columns: Columns, sample: int = 100
                  ) -> tuple[str, list[Example | RowError]]:
    """Read one file: (the format used, one Example or RowError per row in file order)."""
    records = list(read_records(path))
    fmt = data_format if data_format != "auto" else detect_format(records[:sample], path, columns)
    out: list[Example | RowError] = []
    for rec in records:
        if isinstance(rec, RowError):
            out.append(rec)
            continue
        try:
            out.append(parse_record(rec, fmt, columns))
        except RowError as err:
            out.append(err)
    return fmt, out
