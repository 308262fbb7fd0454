"""ChatGLM-6B's text metrics on generations: ROUGE-1/2/L F1 over jieba words and character-level BLEU-4.

The recipe is ChatGLM-6B's ``ptuning/main.py`` ``compute_metrics``, step for step, so that a figure here can be
set beside one it printed: each pair is cut into words with ``jieba.cut``, the words are joined with spaces
and scored with ``rouge_chinese.Rouge().get_scores``, taking each F1 times 100 rounded to 4 places; BLEU-4 is
``nltk``'s ``sentence_bleu`` over characters with smoothing method 3, times 100 rounded to 4 places; each
metric is the mean of the rounded per-pair values (``numpy.mean``). ``lang="en"`` cuts on whitespace instead
of jieba, and BLEU-4 is then over those words (a BLEU over the letters of English words means little).

ChatGLM's recipe crashes on a pair with an empty side (rouge_chinese raises ``Hypothesis is empty.``); that
is a text with nothing but whitespace, since rouge_chinese drops whitespace and keeps every other token,
punctuation included. Here such a pair scores 0 on all four metrics and is flagged, so that the averages still
cover every example and the report can list the empty ones.

The inputs are JSONL or JSON-array files (``read_texts_by_row``): ChatGLM's ``generated_predictions.txt``
(``{"labels", "predict"}`` rows) alone, or generate.py's answers with the references in another file, joined
by id (``join_by_id``) as generate.py names its rows (``ID_FIELDS``, else the row's number).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from utils.errors import SuiteError
from utils.jsonl import key_of

ROUGE = ("rouge-1", "rouge-2", "rouge-l")
METRICS = (*ROUGE, "bleu-4")
LANGS = ("zh", "en")
#: The libraries whose versions a report records (their releases can move a figure).
LIBRARIES = ("jieba", "rouge-chinese", "nltk")
#: generate.py's fields that name a row (its ID_FIELDS), tried in this order; a row with none is named by its
#: number: its position in a JSON array, its line in a JSONL file, as generate.py numbers it.
ID_FIELDS = ("id", "question_id", "conversation_id")


# -- the metric --------------------------------------------------------------------------------------------


@functools.cache
def _jieba():
    import jieba

    # jieba logs "Building prefix dict ..." at DEBUG on every run: noise on stderr. Its warnings still show.
    jieba.setLogLevel(logging.WARNING)
    return jieba


def words(text: str, lang: str = "zh") -> list[str]:
    """The words ROUGE counts: jieba's segmentation for ``zh`` (ChatGLM's), whitespace-separated words for ``en``."""
    if lang == "zh":
        return list(_jieba().cut(text))
    if lang == "en":
        return text.split()
    raise ValueError(f"lang must be one of {', '.join(LANGS)}, got {lang!r}")


def is_empty(text_words: list[str]) -> bool:
    """Whether rouge_chinese finds no token in these words (it drops whitespace, so would raise on them)."""
    return not " ".join(text_words).strip()


def empty_side(prediction: str, reference: str, lang: str = "zh") -> str | None:
    """Which side of a pair is empty: "prediction", "reference", "prediction and reference", or None."""
    sides = [name for name, text in (("prediction", prediction), ("reference", reference))
             if is_empty(words(text, lang))]
    return " and ".join(sides) or None


def score_pair(prediction: str, reference: str, lang: str = "zh") -> dict[str, float] | None:
    """ChatGLM's four scores of one pair, each 0-100 rounded to 4 places; None when either side is empty
    (nothing but whitespace: ChatGLM's recipe would crash on it)."""
    hyp, ref = words(prediction, lang), words(reference, lang)
    if is_empty(hyp) or is_empty(ref):
        return None
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    rouge = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    scores = {m: round(rouge[m]["f"] * 100, 4) for m in ROUGE}
    bleu_hyp, bleu_ref = (list(prediction), list(reference)) if lang == "zh" else (hyp, ref)
    bleu = sentence_bleu([bleu_ref], bleu_hyp, smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def zero_scores() -> dict[str, float]:
    """What an empty pair scores."""
    return {m: 0.0 for m in METRICS}


def mean_scores(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over ``rows`` (per-pair scores), as ChatGLM averages them."""
    rows = list(rows)
    if not rows:
        raise ValueError("no scores to average")
    return {m: float(np.mean([r[m] for r in rows])) for m in METRICS}


def text_metrics(pairs: Iterable[tuple[str, str]], lang: str = "zh") -> dict[str, float]:
    """The four metrics over (prediction, reference) pairs, an empty pair counted as 0 on each."""
    return mean_scores(score_pair(p, r, lang) or zero_scores() for p, r in pairs)


# -- the inputs ------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One usable row: its id (``key_of`` form in ``key``), its line in the file and the texts read from it."""

    id: Any
    line: int
    texts: dict[str, str]

    @property
    def key(self) -> str:
        return key_of(self.id)


@dataclass
class Rows:
    """The usable rows of one file, in file order, and the bad ones by reason (their line numbers)."""

    flag: str
    path: str
    rows: list[Row]
    bad: dict[str, list[int]] = field(default_factory=dict)

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"


class _Problems:
    """Bad rows of one file: counted by reason, or (``strict``) the first one fatal."""

    def __init__(self, flag: str, path: str, strict: bool):
        self.flag, self.path, self.strict = flag, path, strict
        self.bad: dict[str, list[int]] = {}

    def __call__(self, reason: str, line: int, detail: str = "") -> None:
        if self.strict:
            raise SuiteError(f"{self.flag} {self.path}:{line}: {detail or reason} (--strict)")
        self.bad.setdefault(reason, []).append(line)


def _numbered_by_position(path: str) -> bool:
    """Whether generate.py numbers this file's rows by position: it reads a file as a JSON array exactly when the
    whole file parses as one (a file it cannot parse has no generate.py answers to join with). Elsewhere a row's
    number is its line, as read_records gives it."""
    try:
        return isinstance(json.loads(Path(path).read_bytes()), list)
    except (ValueError, OSError):
        return False


def read_texts_by_row(path: str, fields: Iterable[str], id_field: str, strict: bool, flag: str) -> Rows:
    """The rows of a JSONL / JSON-array file that hold a string in every one of ``fields``, with their ids.

    A row's id is its ``id_field`` (a row without it is bad), or with ``id_field`` empty the first of
    ``ID_FIELDS`` present, else its number (see ``ID_FIELDS``). Bad rows (not JSON, not an object, a field
    missing or not a string, a duplicate id) are counted by reason with their lines.

    Raises:
        SuiteError: an unreadable or empty file, no usable row, or (``strict``) the first bad row.
    """
    from utils.data.records import DataError, RowError, read_records

    fields = list(fields)
    problem = _Problems(flag, path, strict)
    by_position = _numbered_by_position(path)
    rows: list[Row] = []
    seen: set[str] = set()
    try:
        for position, item in enumerate(read_records(path), 1):
            if isinstance(item, RowError):
                problem("not valid JSON" if item.category == "invalid_json" else "not valid UTF-8", item.line)
                continue
            rec, line = item.value, item.line
            if not isinstance(rec, dict):
                problem("not a JSON object", line)
                continue
            if id_field:
                if id_field not in rec:
                    problem(f"no {id_field!r} field", line)
                    continue
                rid = rec[id_field]
            else:
                rid = next((rec[f] for f in ID_FIELDS if f in rec), position if by_position else line)
            missing = [f for f in fields if f not in rec]
            wrong = [f for f in fields if f in rec and not isinstance(rec[f], str)]
            if missing:
                problem(f"no {missing[0]!r} field", line)
            elif wrong:
                problem(f"{wrong[0]!r} is not a string", line)
            elif key_of(rid) in seen:
                problem("duplicate id", line, f"duplicate id {rid!r}")
            else:
                seen.add(key_of(rid))
                rows.append(Row(rid, line, {f: rec[f] for f in fields}))
    except DataError as exc:
        raise SuiteError(str(exc).replace("--data_path", flag)) from None
    if not rows:
        detail = "; ".join(f"{reason}: {len(lines)}" for reason, lines in problem.bad.items())
        raise SuiteError(f"{flag} {path}: no usable row ({detail or 'no rows'})")
    return Rows(flag, path, rows, problem.bad)


@dataclass
class Pair:
    """A prediction and its reference, with where each was read (``reference_line`` None: the same row)."""

    id: Any
    line: int
    prediction: str
    reference: str
    reference_line: int | None = None


def pairs_of_rows(rows: Rows, pred_field: str, ref_field: str) -> list[Pair]:
    """Each row's prediction and reference, both read from the row itself (ChatGLM's generated_predictions.txt)."""
    return [Pair(r.id, r.line, r.texts[pred_field], r.texts[ref_field]) for r in rows.rows]


def join_by_id(predictions: Rows, references: Rows, pred_field: str, ref_field: str, strict: bool
               ) -> tuple[list[Pair], list[int]]:
    """Each prediction with the reference of the same id, in the predictions' order.

    A prediction whose id has no reference is a bad row of ``predictions`` (counted there, under its reason).

    Returns:
        (the pairs, the lines of the references no prediction names).

    Raises:
        SuiteError: (``strict``) the first prediction without a reference; no prediction has one.
    """
    problem = _Problems(predictions.flag, predictions.path, strict)
    problem.bad = predictions.bad
    by_key = {r.key: r for r in references.rows}
    pairs, used = [], set()
    for row in predictions.rows:
        ref = by_key.get(row.key)
        if ref is None:
            problem("no reference with this id", row.line, f"no reference with id {row.id!r} in {references.path}")
            continue
        used.add(row.key)
        pairs.append(Pair(row.id, row.line, row.texts[pred_field], ref.texts[ref_field], ref.line))
    if not pairs:
        sample = ", ".join(repr(r.id) for r in predictions.rows[:3])
        raise SuiteError(f"{predictions.flag} {predictions.path}: no prediction's id is found in {references.flag} "
                         f"{references.path} (ids such as {sample}); check --id_field")
    return pairs, [r.line for r in references.rows if r.key not in used]
