"""LLM-as-a-judge in the MT-bench manner: single-answer grading and pairwise comparison with position swap.

What ``eval/judge.py`` needs besides the judge client (``utils.judge``), as plain functions that send nothing:

* the inputs, read whole and checked before any request: a question file (``{question_id, text | turns,
  category, reference?}``), answer files in LLMZoo's format (``{question_id, text, answer_id, model_id}``) or
  FastChat's (``{question_id, model_id, choices: [{turns: [...]}]}``), and an optional reference file (an
  answer file); a line that is not a JSON object, a row without ``question_id``, a repeated id, an answer
  missing for a question or with the wrong number of turns is refused with its file:line, all problems at once;
* the prompts (``templates/judge/*.json``, see its README): loaded, their placeholders checked, and the
  messages built for one answer or a pair, one-turn or multi-turn (a multi-turn question is judged on the
  whole conversation);
* the parsers ``parse_rating`` (``Rating: [[x]]``, 1-10) and ``parse_verdict`` (``[[A]]`` / ``[[B]]`` /
  ``[[C]]``), with ``read_rating`` / ``read_verdict`` giving the reason when a text has no usable verdict:
  such a judgment is kept and counted, never scored;
* position swap: every pair is judged with each answer in position A once; ``pair_outcome`` counts a verdict
  only when the two orders agree, else the pair is a tie counted as inconsistent (a judge that always
  prefers position A gets nothing but inconsistent ties);
* the summary (mean rating per model, or win / tie / loss / inconsistent) and the battles
  ``(model_a, model_b, winner)``, winner in ``a`` / ``b`` / ``tie``, that ``utils.evaluation.ranking`` fits.

Question ids are compared by their JSON text (``utils.jsonl.key_of``): ``1`` and ``"1"`` are different ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from utils.errors import SuiteError
from utils.jsonl import key_of, object_lines

MODES = ("single", "pairwise", "all_pairs")
#: The prompt file of each (kind, with a reference answer) in a ``--prompts`` folder.
PROMPT_FILES = {("single", False): "single.json", ("single", True): "single_ref.json",
                ("pairwise", False): "pairwise.json", ("pairwise", True): "pairwise_ref.json"}
#: The most problems one error message lists (the count is always whole).
SHOWN = 20
RATING_RANGE = (1.0, 10.0)

# -- inputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeQuestion:
    """One question: ``turns`` holds one text per user turn (one for a plain question)."""

    id: Any
    turns: tuple[str, ...]
    category: str
    reference: tuple[str, ...] | None
    where: str  # file:line

    @property
    def key(self) -> str:
        return key_of(self.id)


@dataclass(frozen=True)
class AnswerSet:
    """One model's answers: ``turns[key_of(question_id)]`` is its answer to each turn, ``where`` its file:line."""

    path: str
    model: str
    turns: dict[str, tuple[str, ...]]
    where: dict[str, str]


def _problem_error(what: str, problems: list[str]) -> SuiteError:
    shown = problems[:SHOWN] + ([f"... and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else [])
    return SuiteError(f"{what}: {len(problems)} problem(s), nothing was sent to the judge:\n  " + "\n  ".join(shown))


def _rows(path: str, flag: str, problems: list[str]) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a line that is not a JSON object is a problem."""
    rows, bad = object_lines(path, flag)
    problems += bad
    if not rows and not problems:
        problems.append(f"{path}: no rows")
    return rows


def _question_id(row: dict, where: str, problems: list[str]) -> Any:
    """The row's question_id, or None after recording why it cannot be used."""
    qid = row.get("question_id")
    if qid is None:
        problems.append(f"{where}: no question_id")
        return None
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        problems.append(f"{where}: question_id must be an integer or a non-empty string, got {qid!r}")
        return None
    return qid


def _texts(value: Any) -> tuple[str, ...] | None:
    """A non-empty list of strings as a tuple, a string as a one-turn tuple, else None."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def read_question_file(path: str, flag: str = "--question_file") -> list[JudgeQuestion]:
    """The questions of ``path`` in file order.

    A row holds ``question_id``, the question as ``text`` (one turn) or ``turns`` (a list, one entry per user
    turn; it wins over ``text``), an optional ``category`` and an optional ``reference`` (a string, or a list
    with one entry per turn).

    Raises:
        SuiteError: listing every unreadable line, missing or repeated id and malformed field with file:line.
    """
    problems: list[str] = []
    rows = _rows(path, flag, problems)
    questions, seen = [], {}
    for number, row in rows:
        where = f"{path}:{number}"
        qid = _question_id(row, where, problems)
        turns = _texts(row["turns"]) if "turns" in row else _texts(row.get("text"))
        if turns is None:
            problems.append(f"{where}: the question needs text (a string) or turns (a non-empty list of strings)")
        elif not all(t.strip() for t in turns):
            problems.append(f"{where}: an empty question")
            turns = None
        category = row.get("category", "")
        if not isinstance(category, str):
            problems.append(f"{where}: category must be a string, got {category!r}")
        reference = None
        if row.get("reference") is not None:
            reference = _texts(row["reference"])
            if reference is None:
                problems.append(f"{where}: reference must be a string or a list of strings")
            elif turns is not None and len(reference) != len(turns):
                problems.append(f"{where}: {len(reference)} reference answer(s) for {len(turns)} turn(s)")
                reference = None
        if qid is None:
            continue
        if key_of(qid) in seen:
            problems.append(f"{where}: question_id {qid!r} repeats {seen[key_of(qid)]}")
            continue
        seen[key_of(qid)] = where
        if turns is not None and isinstance(category, str):
            questions.append(JudgeQuestion(qid, turns, category, reference, where))
    if problems:
        raise _problem_error(f"{flag} {path}", problems)
    return questions


def read_answer_file(path: str, flag: str = "--answer_files") -> AnswerSet:
    """One model's answers (every row), LLMZoo's rows (``text``) or FastChat's (``choices[0].turns``).

    The model is the rows' ``model_id``, which must be the same on every row; a file whose rows have none is
    named by its file name without ``.jsonl`` (FastChat's rule).

    Raises:
        SuiteError: listing every unreadable line, missing or repeated id, row without an answer and
            ``model_id`` that differs from the first row's, with file:line.
    """
    problems: list[str] = []
    rows = _rows(path, flag, problems)
    turns, where_of, model, model_where = {}, {}, None, None
    for number, row in rows:
        where = f"{path}:{number}"
        qid = _question_id(row, where, problems)
        row_model = row.get("model_id")
        if row_model is not None:
            if not isinstance(row_model, str) or not row_model:
                problems.append(f"{where}: model_id must be a non-empty string, got {row_model!r}")
            elif model is None:
                model, model_where = row_model, where
            elif row_model != model:
                problems.append(f"{where}: model_id {row_model!r} differs from {model!r} ({model_where}); "
                                "one file holds one model's answers")
        answer = None
        choices = row.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict) and "turns" in choices[0]:
            answer = _texts(choices[0]["turns"])
        elif "turns" in row:
            answer = _texts(row["turns"])
        elif isinstance(row.get("text"), str):
            answer = (row["text"],)
        if answer is None:
            problems.append(f"{where}: no answer (text, a string; or choices[0].turns, a list of strings)")
        if qid is None:
            continue
        if key_of(qid) in where_of:
            problems.append(f"{where}: question_id {qid!r} repeats {where_of[key_of(qid)]}")
            continue
        where_of[key_of(qid)] = where
        if answer is not None:
            turns[key_of(qid)] = answer
    if any(row.get("model_id") is None for _, row in rows) and model is not None:
        missing = [f"{path}:{n}" for n, row in rows if row.get("model_id") is None]
        problems.append(f"{', '.join(missing[:5])}: no model_id (the other rows name {model!r})")
    if problems:
        raise _problem_error(f"{flag} {path}", problems)
    name = model if model is not None else (Path(path).name[:-6] if path.endswith(".jsonl") else Path(path).stem)
    return AnswerSet(str(path), name, turns, where_of)


def check_answers(questions: Sequence[JudgeQuestion], answer_sets: Sequence[AnswerSet], flag: str = "--answer_files"
                  ) -> None:
    """Every answer file answers every question, turn for turn, and no two files are the same model.

    Raises:
        SuiteError: naming each file's missing question ids and each answer with the wrong number of turns.
    """
    problems, models = [], {}
    for answers in answer_sets:
        if answers.model in models:
            problems.append(f"{answers.path}: model {answers.model!r} is also {models[answers.model]}'s; "
                            "each file must be another model")
        models.setdefault(answers.model, answers.path)
        missing = [q for q in questions if q.key not in answers.turns]
        if missing:
            ids = ", ".join(repr(q.id) for q in missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "")
            problems.append(f"{answers.path}: no answer to {len(missing)} of the {len(questions)} questions: "
                            f"question_id {ids}")
        for q in questions:
            got = answers.turns.get(q.key)
            if got is not None and len(got) != len(q.turns):
                problems.append(f"{answers.where[q.key]}: {len(got)} answer turn(s) for the {len(q.turns)} turn(s) "
                                f"of question {q.id!r} ({q.where})")
    if problems:
        raise _problem_error(flag, problems)


def with_references(questions: Sequence[JudgeQuestion], references: AnswerSet | None,
                    flag: str = "--reference_file") -> list[JudgeQuestion]:
    """``questions`` with the reference answers of ``references`` (an answer file; it wins over a question's own
    ``reference``). A question it does not cover keeps its own reference, or none.

    Raises:
        SuiteError: a reference with the wrong number of turns (file:line).
    """
    if references is None:
        return list(questions)
    out, problems = [], []
    for q in questions:
        ref = references.turns.get(q.key)
        if ref is not None and len(ref) != len(q.turns):
            problems.append(f"{references.where[q.key]}: {len(ref)} reference turn(s) for the {len(q.turns)} "
                            f"turn(s) of question {q.id!r} ({q.where})")
            ref = None
        out.append(JudgeQuestion(q.id, q.turns, q.category, ref if ref is not None else q.reference, q.where))
    if problems:
        raise _problem_error(f"{flag} {references.path}", problems)
    return out


# -- prompts -----------------------------------------------------------------------------------------------------

_KEYS = {"name", "type", "reference", "description", "system", "user", "multi_turn"}
_MULTI_KEYS = {"system", "user", "turn", "reference_turn"}


def _placeholders(kind: str, reference: bool) -> dict[str, set[str]]:
    """The placeholders each template of a prompt must hold (and the only ones it may)."""
    ref = {"reference"} if reference else set()
    one = {"single": {"question", "answer"}, "pairwise": {"question", "answer_a", "answer_b"}}[kind]
    many = {"single": {"conversation"}, "pairwise": {"conversation_a", "conversation_b"}}[kind]
    out = {"user": one | ref, "system": set(), "multi_turn.user": many | ref, "multi_turn.system": set(),
           "multi_turn.turn": {"number", "question", "answer"}}
    if reference:
        out["multi_turn.reference_turn"] = {"number", "question", "reference"}
    return out


def _fields(template: str) -> tuple[set[str], list[str]]:
    """(the field names of a ``str.format`` template, what is wrong with it)."""
    names, wrong = set(), []
    try:
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is None:
                continue
            if name == "" or name.isdigit():
                wrong.append("a positional placeholder {} (write a literal brace as {{ or }})")
            elif spec or conversion:
                wrong.append(f"placeholder {{{name}}} has a format spec or conversion; write plain {{{name}}}")
            else:
                names.add(name)
    except ValueError as exc:
        wrong.append(f"not a valid template ({exc}; write a literal brace as {{{{ or }}}})")
    return names, wrong


@dataclass(frozen=True)
class JudgePrompt:
    """One prompt file, checked. ``multi_*`` are None when the file has no ``multi_turn`` part."""

    path: str
    name: str
    kind: str
    reference: bool
    system: str
    user: str
    multi_system: str | None
    multi_user: str | None
    turn: str | None
    reference_turn: str | None
    sha256: str

    @property
    def multi_turn(self) -> bool:
        return self.multi_user is not None


def load_prompt(path: str | Path, kind: str, reference: bool) -> JudgePrompt:
    """Read and check one prompt file (see ``templates/judge/README.md``).

    Raises:
        SuiteError: naming the file and every problem: not JSON, an unknown key, the wrong ``type`` or
            ``reference``, a placeholder missing or unknown.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise SuiteError(f"--prompts: cannot read {path} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SuiteError(f"--prompts: {path} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SuiteError(f"--prompts: {path} must hold a JSON object")
    problems = [f"unknown key {k!r} (known: {', '.join(sorted(_KEYS))})" for k in data if k not in _KEYS]
    if data.get("type") != kind:
        problems.append(f"type must be {kind!r} (this file's role), got {data.get('type')!r}")
    if data.get("reference", False) is not reference:
        problems.append(f"reference must be {str(reference).lower()} in this file, got {data.get('reference')!r}")
    multi = data.get("multi_turn")
    if multi is not None and not isinstance(multi, dict):
        problems.append("multi_turn must be an object {system, user, turn" + (", reference_turn}" if reference else "}"))
        multi = None
    multi = multi or {}
    problems += [f"unknown key multi_turn.{k} (known: {', '.join(sorted(_MULTI_KEYS))})" for k in multi
                 if k not in _MULTI_KEYS]
    texts = {"system": data.get("system", ""), "user": data.get("user")}
    if multi:
        texts.update({f"multi_turn.{k}": multi.get(k, "" if k == "system" else None)
                      for k in ("system", "user", "turn", "reference_turn") if k != "reference_turn" or reference})
    wanted = _placeholders(kind, reference)
    for where, text in texts.items():
        is_system = where.endswith("system")  # may be empty: then no system message is sent
        if not isinstance(text, str) or (not is_system and not text):
            problems.append(f"{where} must be a {'string' if is_system else 'non-empty string'}")
            continue
        names, wrong = _fields(text)
        problems += [f"{where}: {w}" for w in wrong]
        need = wanted[where]
        problems += [f"{where}: no {{{n}}}" for n in sorted(need - names)]
        problems += [f"{where}: unknown placeholder {{{n}}} (allowed: "
                     f"{', '.join('{' + a + '}' for a in sorted(need)) or 'none'})" for n in sorted(names - need)]
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        problems.append(f"name must be a non-empty string, got {name!r}")
    if problems:
        raise _problem_error(f"--prompts {path}", problems)
    return JudgePrompt(path=str(path), name=name, kind=kind, reference=reference, system=texts["system"],
                       user=texts["user"], multi_system=texts.get("multi_turn.system"),
                       multi_user=texts.get("multi_turn.user"), turn=texts.get("multi_turn.turn"),
                       reference_turn=texts.get("multi_turn.reference_turn"),
                       sha256=hashlib.sha256(raw).hexdigest())


def load_prompts(folder: str | Path, kind: str, questions: Sequence[JudgeQuestion]) -> dict[bool, JudgePrompt]:
    """The prompts of ``kind`` (single / pairwise) that ``questions`` need, by whether a reference is shown:
    only the files needed are read, and a multi-turn question needs a prompt with a ``multi_turn`` part.

    Raises:
        SuiteError: a needed file is missing or wrong, or has no multi_turn part for a multi-turn question.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SuiteError(f"--prompts {folder}: no such folder (it holds {', '.join(sorted(set(PROMPT_FILES.values())))})")
    prompts, problems = {}, []
    for reference in (False, True):
        needing = [q for q in questions if (q.reference is not None) == reference]
        if not needing:
            continue
        path = folder / PROMPT_FILES[kind, reference]
        if not path.is_file():
            problems.append(f"{path}: no such file (needed by {len(needing)} question(s), the first {needing[0].where})")
            continue
        prompt = prompts[reference] = load_prompt(path, kind, reference)
        multi = [q for q in needing if len(q.turns) > 1]
        if multi and not prompt.multi_turn:
            problems.append(f"{path}: no multi_turn part, and {len(multi)} question(s) have several turns "
                            f"(the first {multi[0].where})")
    if problems:
        raise _problem_error("--prompts", problems)
    return prompts


def _conversation(template: str, questions: Sequence[str], answers: Sequence[str], field: str = "answer") -> str:
    return "".join(template.format(**{"number": i, "question": q, field: a})
                   for i, (q, a) in enumerate(zip(questions, answers), 1))


def _messages(system: str, user: str) -> tuple[dict, ...]:
    return (({"role": "system", "content": system},) if system else ()) + ({"role": "user", "content": user},)


def single_messages(prompt: JudgePrompt, question: JudgeQuestion, answer: Sequence[str]) -> tuple[dict, ...]:
    """The chat messages that ask the judge to rate ``answer`` (one text per turn) to ``question``; a multi-turn
    question is shown as its whole conversation."""
    ref = question.reference if prompt.reference else None
    if len(question.turns) == 1:
        fields = {"question": question.turns[0], "answer": answer[0], **({"reference": ref[0]} if ref else {})}
        return _messages(prompt.system.format(), prompt.user.format(**fields))
    fields = {"conversation": _conversation(prompt.turn, question.turns, answer)}
    if ref:
        fields["reference"] = _conversation(prompt.reference_turn, question.turns, ref, "reference")
    return _messages(prompt.multi_system.format(), prompt.multi_user.format(**fields))


def pair_messages(prompt: JudgePrompt, question: JudgeQuestion, answer_a: Sequence[str], answer_b: Sequence[str]
                  ) -> tuple[dict, ...]:
    """The chat messages that ask the judge to compare ``answer_a`` (shown as assistant A) with ``answer_b``."""
    ref = question.reference if prompt.reference else None
    if len(question.turns) == 1:
        fields = {"question": question.turns[0], "answer_a": answer_a[0], "answer_b": answer_b[0],
                  **({"reference": ref[0]} if ref else {})}
        return _messages(prompt.system.format(), prompt.user.format(**fields))
    fields = {"conversation_a": _conversation(prompt.turn, question.turns, answer_a),
              "conversation_b": _conversation(prompt.turn, question.turns, answer_b)}
    if ref:
        fields["reference"] = _conversation(prompt.reference_turn, question.turns, ref, "reference")
    return _messages(prompt.multi_system.format(), prompt.multi_user.format(**fields))


# -- verdicts ----------------------------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
_RATING = re.compile(r"\[\[\s*" + _NUMBER + r"\s*\]\]")
# With one bracket only after the label: a bare [3] is too often a citation or a list index.
_RATING_SINGLE = re.compile(r"rating\s*:?\s*\[\s*" + _NUMBER + r"\s*\]", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)


def read_rating(text: str | None) -> tuple[float | None, str | None]:
    """(the rating, None) or (None, why there is none) for a judge's single-grading output.

    The rating is the number in ``[[x]]`` (or ``Rating: [x]``). Several different ratings are ambiguous, and a
    rating outside 1-10 is not one: both leave the text unparsed rather than guess.
    """
    if text is None:
        return None, "no output"
    found = _RATING.findall(text) or _RATING_SINGLE.findall(text)
    if not found:
        return None, "no rating in the form Rating: [[x]]"
    values = sorted({float(v) for v in found})
    if len(values) > 1:
        return None, "several different ratings: " + ", ".join(f"[[{v:g}]]" for v in values)
    low, high = RATING_RANGE
    if not low <= values[0] <= high:
        return None, f"rating {values[0]:g} is outside {low:g}-{high:g}"
    return values[0], None


def parse_rating(text: str | None) -> float | None:
    """The judge's 1-10 rating in ``text``, or None (``read_rating`` says why)."""
    return read_rating(text)[0]


def read_verdict(text: str | None) -> tuple[str | None, str | None]:
    """(``A`` / ``B`` / ``C``, None) or (None, why there is none) for a judge's pairwise output.

    ``[[C]]`` is a tie. Two different verdicts in one text are ambiguous: unparsed, not the first one found.
    """
    if text is None:
        return None, "no output"
    found = sorted({v.upper() for v in _VERDICT.findall(text)})
    if not found:
        return None, "no verdict [[A]], [[B]] or [[C]]"
    if len(found) > 1:
        return None, "several different verdicts: " + ", ".join(f"[[{v}]]" for v in found)
    return found[0], None


def parse_verdict(text: str | None) -> str | None:
    """``A``, ``B`` or ``C`` (a tie) from a pairwise judgment, or None (``read_verdict`` says why)."""
    return read_verdict(text)[0]


#: What a verdict says about the pair (model_a, model_b), by which model was shown in position A.
_WINNER = {"ab": {"A": "a", "B": "b", "C": "tie"}, "ba": {"A": "b", "B": "a", "C": "tie"}}


def verdict_winner(verdict: str | None, order: str) -> str | None:
    """``a`` / ``b`` / ``tie`` for the pair's own models, from a verdict given with ``order`` (``ab``: model_a
    was shown as A; ``ba``: model_b was)."""
    return None if verdict is None else _WINNER[order][verdict]


def pair_outcome(first: str | None, second: str | None) -> tuple[str | None, bool]:
    """(winner, inconsistent) of a pair from its two verdicts: ``first`` with model_a in position A, ``second``
    with model_b there. The winner (``a`` / ``b`` / ``tie``) counts only when both orders agree; when they
    disagree the pair is a tie and ``inconsistent``. (None, False) when either verdict is missing."""
    if first is None or second is None:
        return None, False
    one, two = verdict_winner(first, "ab"), verdict_winner(second, "ba")
    if one == two:
        return one, False
    return "tie", True


# -- the plan: one request per judgment --------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One judgment to ask for. Single: ``model``; pairwise: ``model_a``, ``model_b`` and ``order`` (``ab``:
    model_a shown as assistant A, ``ba``: model_b)."""

    key: str
    kind: str
    question: JudgeQuestion
    prompt: JudgePrompt
    messages: tuple[dict, ...]
    model: str | None = None
    model_a: str | None = None
    model_b: str | None = None
    order: str | None = None


def model_pairs(mode: str, models: Sequence[str], baseline: str | None = None) -> list[tuple[str, str]]:
    """The pairs judged: each model against ``baseline`` (``pairwise``; the baseline is model_b) or every
    two models in the given order (``all_pairs``)."""
    if mode == "pairwise":
        return [(m, baseline) for m in models if m != baseline]
    if mode == "all_pairs":
        return list(itertools.combinations(models, 2))
    raise ValueError(f"no pairs in mode {mode!r}")


def plan(mode: str, questions: Sequence[JudgeQuestion], answer_sets: Sequence[AnswerSet],
         prompts: dict[bool, JudgePrompt], baseline: str | None = None) -> list[Planned]:
    """Every judgment of a run, question by question: one per (question, model) in single mode; two per
    (question, pair) otherwise, the pair in both orders."""
    by_model = {a.model: a for a in answer_sets}
    out = []
    for q in questions:
        prompt = prompts[q.reference is not None]
        if mode == "single":
            for a in answer_sets:
                out.append(Planned(f"{q.key}|{a.model}", "single", q, prompt,
                                   single_messages(prompt, q, a.turns[q.key]), model=a.model))
            continue
        for ma, mb in model_pairs(mode, [a.model for a in answer_sets], baseline):
            ta, tb = by_model[ma].turns[q.key], by_model[mb].turns[q.key]
            for order, (first, second) in (("ab", (ta, tb)), ("ba", (tb, ta))):
                out.append(Planned(f"{q.key}|{ma}|{mb}|{order}", "pairwise", q, prompt,
                                   pair_messages(prompt, q, first, second), model_a=ma, model_b=mb, order=order))
    return out


def judgment_record(item: Planned, request: str, text: str | None, error: str | None, usage: dict | None = None
                    ) -> dict:
    """The judgments.jsonl row of one judgment: what was asked (the messages and the request's cache key), the
    judge's raw output verbatim (or the request's error), and what was read from it (or the parse error)."""
    record = {"key": item.key, "question_id": item.question.id, "category": item.question.category,
              "turns": len(item.question.turns), "kind": item.kind}
    if item.kind == "single":
        record["model"] = item.model
    else:
        shown = (item.model_a, item.model_b) if item.order == "ab" else (item.model_b, item.model_a)
        record.update(model_a=item.model_a, model_b=item.model_b, order=item.order,
                      position_a=shown[0], position_b=shown[1])
    record.update(prompt=item.prompt.name, reference=item.prompt.reference, request=request,
                  messages=list(item.messages), text=text, error=error, usage=usage or {})
    return reparse(record)


def reparse(record: dict) -> dict:
    """``record`` with its verdict read again from its ``text`` (so a stored judgment is read by today's parser):
    ``rating`` or ``verdict`` / ``winner``, ``parse_error``, and ``status`` (``ok``, ``unparsed``: the judge
    answered but gave no usable verdict; ``failed``: the request failed)."""
    record = dict(record)
    if record["kind"] == "single":
        value, why = read_rating(record.get("text"))
        record["rating"] = value
    else:
        value, why = read_verdict(record.get("text"))
        record["verdict"] = value
        record["winner"] = verdict_winner(value, record["order"])
    failed = record.get("text") is None
    record["parse_error"] = None if failed else why
    record["status"] = "failed" if failed else ("unparsed" if value is None else "ok")
    return record


# -- the summary -------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def single_summary(records: Iterable[dict], models: Sequence[str]) -> dict:
    """Per model: the mean rating over the judgments that gave one, how many did, how many were unparsed or
    failed, and the mean per category. Unparsed judgments are left out of the mean, never scored."""
    rows = {m: {"ratings": [], "unparsed": 0, "failed": 0, "by_category": {}} for m in models}
    for r in records:
        row = rows[r["model"]]
        if r["status"] == "ok":
            row["ratings"].append(r["rating"])
            row["by_category"].setdefault(r["category"], []).append(r["rating"])
        else:
            row[r["status"]] += 1
    return {m: {"mean_rating": _mean(row["ratings"]), "rated": len(row["ratings"]), "unparsed": row["unparsed"],
                "failed": row["failed"],
                "by_category": {c: {"mean_rating": _mean(v), "rated": len(v)} for c, v in sorted(row["by_category"].items())}}
            for m, row in rows.items()}


def pair_results(records: Iterable[dict]) -> list[dict]:
    """One row per (question, pair) from its two judgments: ``winner`` (``a`` / ``b`` / ``tie``, or None when
    either order is unparsed or failed), ``inconsistent``, and ``status`` (``ok``, else the worse of the two:
    ``failed`` before ``unparsed``)."""
    by_pair: dict[tuple, dict] = {}
    for r in records:
        by_pair.setdefault((key_of(r["question_id"]), r["model_a"], r["model_b"]), {})[r["order"]] = r
    out = []
    for (_, ma, mb), two in by_pair.items():
        first, second = two.get("ab"), two.get("ba")
        statuses = {x["status"] if x else "failed" for x in (first, second)}
        status = "failed" if "failed" in statuses else ("unparsed" if "unparsed" in statuses else "ok")
        winner, inconsistent = (pair_outcome(first["verdict"], second["verdict"]) if status == "ok" else (None, False))
        qid = (first or second)["question_id"]
        out.append({"question_id": qid, "model_a": ma, "model_b": mb, "winner": winner,
                    "inconsistent": inconsistent, "status": status})
    return out


def battles(pairs: Iterable[dict]) -> list[tuple[str, str, str]]:
    """``(model_a, model_b, winner)`` for every pair with an outcome (an inconsistent pair is a tie); pairs that
    are unparsed or failed give none."""
    return [(p["model_a"], p["model_b"], p["winner"]) for p in pairs if p["winner"] is not None]


def _tally() -> dict:
    return {"win": 0, "tie": 0, "loss": 0, "inconsistent": 0, "unparsed": 0, "failed": 0}


def _rates(t: dict) -> dict:
    judged = t["win"] + t["tie"] + t["loss"]
    t["judged"] = judged
    t["win_rate"] = t["win"] / judged if judged else None
    t["win_rate_adjusted"] = (t["win"] + t["tie"] / 2) / judged if judged else None
    return t


def pairwise_summary(pairs: Sequence[dict], models: Sequence[str], baseline: str | None = None) -> dict:
    """Win / tie / loss / inconsistent per model, with ``win_rate`` (wins / judged pairs) and
    ``win_rate_adjusted`` (a tie as half a win). ``tie`` includes the inconsistent pairs; unparsed and failed
    pairs are counted apart and judge nothing. Against a baseline each model's row is against it (the baseline
    has no row); in all-pairs mode a model's row covers all its opponents, and ``pairs`` has one row per pair
    from model_a's side."""
    per_model = {m: _tally() for m in models if m != baseline}
    per_pair: dict[tuple[str, str], dict] = {}
    for p in pairs:
        side = {p["model_a"]: "a", p["model_b"]: "b"}
        pair = per_pair.setdefault((p["model_a"], p["model_b"]), _tally())
        for model, mine in side.items():
            if model not in per_model:
                continue
            t = per_model[model]
            if p["status"] != "ok":
                t[p["status"]] += 1
            elif p["winner"] == "tie":
                t["tie"] += 1
                t["inconsistent"] += p["inconsistent"]
            else:
                t["win" if p["winner"] == mine else "loss"] += 1
        if p["status"] != "ok":
            pair[p["status"]] += 1
        elif p["winner"] == "tie":
            pair["tie"] += 1
            pair["inconsistent"] += p["inconsistent"]
        else:
            pair["win" if p["winner"] == "a" else "loss"] += 1
    out = {"models": {m: _rates(t) for m, t in per_model.items()}}
    if baseline is None:
        out["pairs"] = [{"model_a": a, "model_b": b, **_rates(t)} for (a, b), t in per_pair.items()]
    return out
