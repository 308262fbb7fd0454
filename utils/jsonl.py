"""JSONL files that survive a crash: append whole lines, resume by key, never trust a torn last line.

A long job (batch generation, evaluation's answers, reviews and judge cache) writes one JSON record per line
as results come in, so that a killed run loses at most the line being written:

* ``JsonlAppender(path)`` cuts an incomplete last line (the tail of a run killed mid-write) when it opens
  the file, then appends whole lines, each call's lines flushed and fsynced before it returns;
* ``read_jsonl(path)`` returns the records and the numbers of the lines that are not JSON, so a caller can
  ignore a torn tail or report a damaged line by number;
* ``read_keyed(paths)`` / ``done_keys(paths)`` give the records of earlier runs by key, to skip what is
  already done; ``write_jsonl(path, records)`` replaces a file atomically with the finished result.

Keys are compared by their JSON text (``key_of``): ``1`` and ``"1"`` are different rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


def key_of(value: Any) -> str:
    """The form in which record keys are compared (any JSON value)."""
    return json.dumps(value)


def dumps(records: Iterable[Any]) -> str:
    """Whole lines, one record each (non-ASCII kept as is)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_jsonl(path: str | Path) -> tuple[list[Any], list[int]]:
    """(records, numbers of the lines that are not valid JSON), lines counted from 1; blank lines are skipped.

    Raises:
        OSError, UnicodeDecodeError: the file cannot be read as UTF-8 text.
    """
    records, bad = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad.append(number)
    return records, bad


def object_lines(path: str | Path, flag: str) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, object) of every non-blank line of a JSONL file the user named with ``flag``, and a
    ``path:line: why`` problem for each line that is not JSON or not a JSON object (for the caller to report
    with its own, all at once). Not ``splitlines``: a U+2028 may sit inside a row.

    Raises:
        SuiteError: the file cannot be read as UTF-8 text.
    """
    from utils.errors import SuiteError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{flag} {path}: cannot be read as UTF-8 text ({exc})") from None
    rows, problems = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number}: not a JSON object")
            continue
        rows.append((number, row))
    return rows, problems


def read_keyed(paths: Iterable[str | Path], key: str = "id") -> dict[str, dict]:
    """Records of earlier (possibly crashed) runs by ``key_of(record[key])``, a later file's record winning;
    unreadable files, lines that are not JSON (a torn tail) and records without ``key`` are ignored."""
    done: dict[str, dict] = {}
    for path in paths:
        try:
            records, _ = read_jsonl(path)
        except (OSError, UnicodeDecodeError):
            continue
        for record in records:
            if isinstance(record, dict) and key in record:
                done[key_of(record[key])] = record
    return done


def done_keys(paths: Iterable[str | Path], key: str = "id") -> set[str]:
    """The keys (``key_of`` form) already present in ``paths``."""
    return set(read_keyed(paths, key))


def cut_torn_tail(path: str | Path) -> None:
    """Drop an incomplete last line (a run killed mid-write), so appended lines start on a fresh line."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def append_lines(f, records: Iterable[Any]) -> None:
    """Write ``records`` to the open text file ``f`` as whole lines, durable (flushed and fsynced) on return."""
    text = dumps(records)
    if not text:
        return
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


class JsonlAppender:
    """Appends records to ``path`` as whole, durable lines; a torn last line left by a killed run is cut on open.
    Use as a context manager (or call ``close``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cut_torn_tail(self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def append(self, records: Iterable[Any]) -> None:
        """Each call's lines are flushed and fsynced before it returns (a crash keeps whole calls only)."""
        append_lines(self.file, records)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Replace ``path`` with ``records`` atomically: written and fsynced beside it, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        append_lines(f, records)
    os.replace(tmp, path)


def line_refs(path: str, lines: list[int], limit: int = 10) -> str:
    """``path:3, path:7, ...``: where bad lines are, the first ``limit`` of them."""
    return ", ".join(f"{path}:{n}" for n in lines[:limit]) + (", ..." if len(lines) > limit else "")
