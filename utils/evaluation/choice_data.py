"""Multiple-choice benchmarks (MMLU, C-Eval, or a JSONL file): read the questions, build lm-eval's prompts.

Three input formats, decided by what is given:

* ``data_dir``: MMLU's per-subject CSV files, headerless ``question,A,B,C,D,answer`` (Hendrycks' tarball), or
  C-Eval's, with an ``id,question,A,B,C,D,answer[,explanation]`` header. Files are ``{subject}_{split}.csv`` and
  ``{subject}_dev.csv`` anywhere under the folder (flat, or in ``dev/``, ``val/``, ``test/`` as both projects
  ship them); the kind is detected per file by its header, and one folder holds one kind.
  Hendrycks' ``auxiliary_train/`` folder is not a benchmark split (its ``mc_test.csv`` is training data) and is
  not read.
* ``data_file``: JSONL rows (or one JSON array) ``{subject, question, choices: [...], answer: "B" | 1, id?}``
  with 2 to 10 choices and the answer a letter or a 0-based index; few-shot rows come from ``dev_file``.

Bad rows are skipped and counted by reason with ``path:line`` (or, with ``strict``, the first one is fatal).

The English prompts are lm-evaluation-harness 0.4.13's ``mmlu``, character for character, so that
log-likelihoods can be compared with it; the Chinese ones are its ``ceval-valid`` layout under C-Eval's own
description, ``以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。`` (lm-eval drops 考试). A prompt is
the task description, then each shot as its question block, the target delimiter ``" "``, its answer letter
and the few-shot delimiter ``"\\n\\n"``, then the question block ending in ``Answer:`` / ``答案：``; the
scorer appends ``" " + letter``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from utils.data.records import missing_path_message
from utils.errors import SuiteError, UsageError

LETTERS = "ABCDEFGHIJ"
SPLITS = ("dev", "val", "test")
LANGS = ("en", "zh")
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)

HEADERS = {
    "en": "The following are multiple choice questions (with answers) about {}.\n\n",
    "zh": "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n",  # C-Eval's paper (lm-eval drops 考试)
}
ANSWER_CUES = {"en": "Answer:", "zh": "答案："}
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

# Hendrycks' extra training data sits beside the splits; one of its files is called mc_test.csv.
AUXILIARY_FOLDER = "auxiliary_train"
MMLU_COLUMNS = 6
CEVAL_HINT = "C-Eval's test split has no answers (they are withheld); score --split val"


@dataclass(frozen=True)
class Question:
    """One question. ``id`` is C-Eval's id column or the JSONL row's ``id``, else ``{subject}/{split}/{n}``
    (``n`` the 1-based row number in its file); ``source`` is ``path:line`` of the row's first line."""

    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int
    id: str
    split: str
    source: str


@dataclass
class Questions:
    """What ``read_questions`` read.

    Attributes:
        evaluated: subject -> questions to score, in file order; subjects sorted. A subject none of whose rows
            is usable is absent (its rows are in ``bad``).
        shots: subject -> its dev rows in file order, for every evaluated subject ([] when it has none).
        bad: reason -> ["path:line", ...] of the skipped rows (evaluated and dev files alike).
        files: every file read, in the order read.
        format: "mmlu", "ceval" or "jsonl".
    """

    evaluated: dict[str, list[Question]]
    shots: dict[str, list[Question]]
    bad: dict[str, list[str]]
    files: list[str]
    format: str


class _Sink:
    """Where bad rows go: counted by reason, or (strict) the first one raised, naming the flag and path:line."""

    def __init__(self, strict: bool, hint: str = ""):
        self.strict = strict
        self.hint = hint
        self.bad: dict[str, list[str]] = {}

    def __call__(self, flag: str, where: str, reason: str) -> None:
        if self.strict:
            hint = f"; {self.hint}" if self.hint and reason == "answer not among the choices" else ""
            raise SuiteError(f"{flag} {where}: {reason} (--strict{hint})")
        self.bad.setdefault(reason, []).append(where)

    def summary(self) -> str:
        return "; ".join(f"{reason}: {len(v)} (first at {', '.join(v[:3])})" for reason, v in self.bad.items())


def read_questions(*, data_dir: str = "", data_file: str = "", dev_file: str = "", split: str = "test",
                   subjects: Sequence[str] = (), strict: bool = False) -> Questions:
    """Read a benchmark (see the module docstring for the formats).

    Args:
        data_dir: Folder of MMLU or C-Eval CSV files (searched recursively).
        data_file: JSONL file (or JSON array) of questions; not with ``data_dir``.
        dev_file: JSONL few-shot rows for ``data_file`` (split "dev").
        split: The split to score: the CSV files ``*_{split}.csv``, or the label of ``data_file``'s rows.
        subjects: Score only these subjects (all when empty).
        strict: Stop at the first malformed row instead of skipping it.

    Raises:
        UsageError: both or neither of data_dir / data_file, dev_file with data_dir, an unknown split or subject.
        SuiteError: a missing folder or file, no CSV of the split, a file that cannot be read or decoded, CSV
            kinds mixed in one folder, no usable question at all, or (strict) the first malformed row.
    """
    if bool(data_dir) == bool(data_file):
        raise UsageError("give one of --data_dir (MMLU / C-Eval CSV folder) or --data_file (JSONL)"
                         + (", not both" if data_dir else ""))
    if data_dir and dev_file:
        raise UsageError("--dev_file goes with --data_file; with --data_dir the *_dev.csv files are the shots")
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    wanted = [subjects] if isinstance(subjects, str) else list(subjects)
    if data_dir:
        return _read_csv_folder(data_dir, split, wanted, strict)
    return _read_jsonl_files(data_file, dev_file, split, wanted, strict)


def _check_subjects(wanted: list[str], available: Sequence[str]) -> list[str]:
    """The subjects to read: ``wanted`` (all when empty), each of which must be available."""
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise UsageError(f"--subjects: unknown subject(s) {', '.join(unknown)}; "
                         f"available: {', '.join(available) or '(none)'}")
    return sorted(set(wanted)) if wanted else sorted(available)


def _no_usable(flag: str, where: str, sink: _Sink, hint: str = "") -> SuiteError:
    detail = sink.summary() or "no rows"
    return SuiteError(f"{flag} {where}: no usable question ({detail})" + (f". {hint}" if hint else ""))


def _answer_index(answer: Any, n_choices: int) -> int | None:
    """A letter within the choices (``"B"``) or a 0-based index (``1``) as an index, else None."""
    if isinstance(answer, str):
        answer = answer.strip()
        index = LETTERS.find(answer) if len(answer) == 1 else -1
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    else:
        return None
    return index if 0 <= index < n_choices else None


def _make_question(subject: str, question: Any, choices: Sequence[Any], answer: Any, id: str, split: str,
                   source: str) -> Question | str:
    """The Question, or why the row is malformed."""
    if not isinstance(question, str):
        return "empty question" if question is None else "question is not a string"
    if not question.strip():
        return "empty question"
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        return "wrong number of choices"
    if not all(isinstance(c, str) for c in choices):
        return "a choice is not a string"
    index = _answer_index(answer, len(choices))
    if index is None:
        return "answer not among the choices"
    return Question(subject, question, tuple(choices), index, id, split, source)


# -- CSV folders (MMLU, C-Eval) -----------------------------------------------------------------------------


def _read_csv_folder(data_dir: str, split: str, wanted: list[str], strict: bool) -> Questions:
    root = Path(data_dir)
    if not root.is_dir():
        raise SuiteError(missing_path_message("--data_dir", data_dir, "folder"))
    found = _split_files(root)
    if not found[split]:
        others = [s for s in SPLITS if found[s]]
        seen = f"; it has {', '.join(f'*_{s}.csv' for s in others)} files: pass --split {others[-1]}" if others else ""
        raise SuiteError(f"--data_dir {data_dir}: no *_{split}.csv file in it or below it{seen}")
    chosen = _check_subjects(wanted, sorted(found[split]))
    reader = _CsvReader(strict)
    evaluated, shots = {}, {}
    for subject in chosen:
        rows = reader.read(_one_file(found, split, subject), subject, split)
        if rows:
            evaluated[subject] = rows
            dev = _one_file(found, "dev", subject)
            shots[subject] = list(rows) if split == "dev" else reader.read(dev, subject, "dev") if dev else []
    kind = next(iter(reader.kinds), "mmlu")
    if not evaluated:
        raise _no_usable("--data_dir", f"{data_dir} ({split} split)", reader.sink,
                         CEVAL_HINT if kind == "ceval" and split == "test" else "")
    return Questions(evaluated, shots, reader.sink.bad, reader.files, kind)


def _split_files(root: Path) -> dict[str, dict[str, list[Path]]]:
    """split -> subject -> its files, from every ``{subject}_{split}.csv`` under ``root`` (each of ``SPLITS``)."""
    found: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLITS}
    for path in sorted(root.rglob("*.csv")):
        if AUXILIARY_FOLDER in path.relative_to(root).parts[:-1] or not path.is_file():
            continue
        for s in SPLITS:
            suffix = f"_{s}.csv"
            if path.name.endswith(suffix) and len(path.name) > len(suffix):
                found[s].setdefault(path.name[:-len(suffix)], []).append(path)
    return found


def _one_file(found: dict[str, dict[str, list[Path]]], split: str, subject: str) -> Path | None:
    """The subject's file of the split (None when it has none); two of them (flat and in a sub-folder, say) are
    an error rather than a guess."""
    paths = found[split].get(subject, [])
    if len(paths) > 1:
        raise SuiteError(f"--data_dir: two {split} files for subject {subject}: {paths[0]} and {paths[1]}; keep one")
    return paths[0] if paths else None


class _CsvReader:
    """Reads MMLU / C-Eval CSV files into Questions, remembering the files, their kinds and the bad rows."""

    def __init__(self, strict: bool):
        self.sink = _Sink(strict)
        self.files: list[str] = []
        self.kinds: dict[str, str] = {}  # kind -> the first file of that kind

    def read(self, path: Path, subject: str, split: str) -> list[Question]:
        records = _csv_records(path)
        self.files.append(str(path))
        if not records:
            return []
        header = _ceval_header(records[0][1])
        self._note_kind("ceval" if header else "mmlu", path)
        self.sink.hint = CEVAL_HINT if header and split == "test" else ""
        if header:
            return self._rows(records[1:], path, subject, split, header)
        return self._rows(records, path, subject, split, None)

    def _note_kind(self, kind: str, path: Path) -> None:
        self.kinds.setdefault(kind, str(path))
        if len(self.kinds) > 1:
            raise SuiteError(f"--data_dir mixes headerless MMLU files ({self.kinds['mmlu']}) with C-Eval files that "
                             f"have an id,question,... header ({self.kinds['ceval']}); use one folder per benchmark")

    def _rows(self, records: list[tuple[int, list[str]]], path: Path, subject: str, split: str,
              header: dict[str, int] | None) -> list[Question]:
        questions, seen_ids = [], set()
        width = len(header["columns"]) if header else MMLU_COLUMNS
        for n, (line, row) in enumerate(records, 1):
            where = f"{path}:{line}"
            if len(row) != width:
                self.sink("--data_dir", where, "wrong number of columns")
                continue
            if header:
                id = row[header["id"]].strip() or f"{subject}/{split}/{n}"
                question, answer = row[header["question"]], row[header["answer"]]
                choices = [row[i] for i in header["choices"]]
            else:
                id, question, choices, answer = f"{subject}/{split}/{n}", row[0], row[1:5], row[5]
            if id in seen_ids:
                self.sink("--data_dir", where, "duplicate id")
                continue
            made = _make_question(subject, question, choices, answer, id, split, where)
            if isinstance(made, str):
                self.sink("--data_dir", where, made)
                continue
            seen_ids.add(id)
            questions.append(made)
        return questions


def _csv_records(path: Path) -> list[tuple[int, list[str]]]:
    """(line where the row starts, cells) of each non-blank row; quoted cells may hold commas and newlines.

    Broken quoting (an unclosed quote, text after a closing quote) is fatal rather than a skipped row: the
    lenient reader would silently swallow the rest of the file into one cell.
    """
    records, start = [], 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            for row in reader:
                if row:  # a blank line reads as []
                    records.append((start, row))
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"--data_dir {path}: cannot read it as UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise SuiteError(f"--data_dir {path}:{start}: not valid CSV ({exc})") from None
    return records


def _ceval_header(cells: list[str]) -> dict | None:
    """C-Eval's header row as column positions (id, question, answer, choices, columns), or None for a data row.

    Raises:
        SuiteError: a header whose choice columns are not A, B, ... in order.
    """
    names = [c.strip() for c in cells]
    if not names or names[0].lower() != "id" or "question" not in names or "answer" not in names:
        return None
    letters = [c for c in names if len(c) == 1 and c in LETTERS]
    if letters != list(LETTERS[:len(letters)]) or len(letters) < MIN_CHOICES:
        raise SuiteError(f"--data_dir: a C-Eval header needs choice columns A, B, ... in order, got {','.join(cells)}")
    return {"id": 0, "question": names.index("question"), "answer": names.index("answer"),
            "choices": [names.index(c) for c in letters], "columns": names}


# -- JSONL -------------------------------------------------------------------------------------------------


def _read_jsonl_files(data_file: str, dev_file: str, split: str, wanted: list[str], strict: bool) -> Questions:
    sink = _Sink(strict)
    records = _json_records(data_file, "--data_file")
    available = sorted({r["subject"] for _, r in records if _subject_of(r)})
    chosen = set(_check_subjects(wanted, available)) if wanted else None
    evaluated = _group(_jsonl_questions(records, data_file, "--data_file", split, chosen, sink))
    if not evaluated:
        raise _no_usable("--data_file", data_file, sink)
    files, dev = [data_file], {}
    if dev_file:
        same = Path(dev_file).resolve() == Path(data_file).resolve()
        if same and split == "dev":
            dev = {s: list(rows) for s, rows in evaluated.items()}
        else:
            dev_records = records if same else _json_records(dev_file, "--dev_file")
            dev = _group(_jsonl_questions(dev_records, dev_file, "--dev_file", "dev", set(evaluated), sink))
        if not same:
            files.append(dev_file)
    shots = {s: dev.get(s, []) for s in evaluated}
    return Questions(evaluated, shots, sink.bad, files, "jsonl")


def _group(questions: list[Question]) -> dict[str, list[Question]]:
    grouped: dict[str, list[Question]] = {}
    for q in questions:
        grouped.setdefault(q.subject, []).append(q)
    return dict(sorted(grouped.items()))


@dataclass(frozen=True)
class _Unreadable:
    """Stands for a row that cannot be read: why."""

    reason: str


def _json_records(path: str, flag: str) -> list[tuple[int, Any]]:
    """(line, value) of each JSONL line, or of each element of a JSON array (``utils.data.records.read_records``,
    the suite's one JSON reader); ``_Unreadable`` for a row that does not parse or is not valid UTF-8."""
    from utils.data.records import DataError, RowError, read_records

    if not Path(path).is_file():
        raise SuiteError(missing_path_message(flag, path, "file"))
    try:
        return [(item.line, _Unreadable("not valid UTF-8" if item.category == "invalid_utf8" else "not JSON")
                 if isinstance(item, RowError) else item.value) for item in read_records(path)]
    except DataError as exc:
        raise SuiteError(str(exc).replace("--data_path", flag)) from None


def _subject_of(record: Any) -> str:
    """The row's subject, or "" when it has none that can be used."""
    subject = record.get("subject") if isinstance(record, dict) else None
    return subject if isinstance(subject, str) and subject.strip() else ""


def _jsonl_questions(records: list[tuple[int, Any]], path: str, flag: str, split: str, chosen: set[str] | None,
                     sink: _Sink) -> list[Question]:
    """The usable rows of subjects in ``chosen`` (all when None); rows of other subjects are left alone."""
    questions, seen_ids = [], set()
    for n, (line, record) in enumerate(records, 1):
        where = f"{path}:{line}"
        reason = (record.reason if isinstance(record, _Unreadable) else "not a JSON object" if not isinstance(record, dict)
                  else "no subject" if not _subject_of(record) else "")
        if reason:
            sink(flag, where, reason)
            continue
        subject = record["subject"]
        if chosen is not None and subject not in chosen:
            continue
        raw_id = record.get("id")
        if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
            sink(flag, where, "id is not a string or an integer")
            continue
        id = str(raw_id) if raw_id is not None else f"{subject}/{split}/{n}"
        choices = record.get("choices")
        if id in seen_ids:
            made = "duplicate id"
        elif not isinstance(choices, list):
            made = "choices is not a list"
        else:
            made = _make_question(subject, record.get("question"), choices, record.get("answer"), id, split, where)
        if isinstance(made, str):
            sink(flag, where, made)
            continue
        seen_ids.add(id)
        questions.append(made)
    return questions


# -- prompts ----------------------------------------------------------------------------------------------


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"unknown prompt language {lang!r}; expected one of {', '.join(LANGS)}")


def subject_title(subject: str) -> str:
    """The subject as lm-eval's MMLU descriptions name it (``high_school_mathematics`` -> ``high school
    mathematics``)."""
    return subject.replace("_", " ")


def header_text(lang: str, subject_name: str) -> str:
    """The task description that opens every prompt (lm-eval's ``description``), ending in a blank line."""
    _check_lang(lang)
    return HEADERS[lang].format(subject_name)


def question_text(q: Question, lang: str) -> str:
    """The question block: the stripped question, one ``X. choice`` line per choice (choices as they are), and
    ``Answer:`` (en) / ``答案：`` (zh), with no trailing space (the scorer's continuation is ``" " + letter``)."""
    _check_lang(lang)
    lines = [q.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)] + [ANSWER_CUES[lang]]
    return "\n".join(lines)


def shot_text(q: Question, lang: str) -> str:
    """A few-shot example: the question block, the target delimiter and its answer letter."""
    return question_text(q, lang) + TARGET_DELIMITER + LETTERS[q.answer]


def _same(a: Question, b: Question) -> bool:
    return (a.subject, a.split, a.id) == (b.subject, b.split, b.id)


def pick_shots(q: Question, pool: Sequence[Question], k: int) -> list[Question]:
    """The first ``k`` rows of ``pool`` other than ``q`` itself (lm-eval's ``first_n`` sampler, which leaves the
    evaluated row out of its own examples): fewer when the pool is short."""
    return [s for s in pool if not _same(s, q)][:max(k, 0)]


def build_prompt(q: Question, shots: Sequence[Question], lang: str, subject_name: str,
                 fits: Callable[[str], bool]) -> tuple[str, int]:
    """The prompt for ``q`` with as many of ``shots`` as fit, and how many were kept.

    ``shots`` are the examples the caller picked, in order (MMLU: the subject's first k dev rows); ``q`` itself is
    never shown as its own example. While ``fits(prompt)`` is False the oldest (first) shot is dropped.

    Returns:
        (prompt, shots kept). When not even the 0-shot prompt fits, it is returned with 0 without asking
        ``fits`` about it: the caller decides (skip the question, or truncate), checking it itself.
    """
    header, block = header_text(lang, subject_name), question_text(q, lang)
    examples = [shot_text(s, lang) + FEWSHOT_DELIMITER for s in shots if not _same(s, q)]
    for first in range(len(examples)):
        prompt = header + "".join(examples[first:]) + block
        if fits(prompt):
            return prompt, len(examples) - first
    return header + block, 0
