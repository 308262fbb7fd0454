"""LLMZoo's GPT-review protocol: the review prompt, the verdict parsers, the record format and the metric.

LLMZoo (FreedomIntelligence/LLMZoo, ``llmzoo/eval/``) ranks chat models by showing a judge 2 to 9 answers to
one question side by side and asking it to order them (or score them). Its published rankings are only
reproducible if every step is done as its scripts do it, quirks included, so each step here follows them to
the byte; where a quirk loses information we keep their result and report the loss beside it.

* The prompt (``review_messages``): a fixed system message and a user message made of the question, the
  answers as ``[Assistant i]\\n...\\n\\n[End of Assistant i]`` blocks and the rule's prompt, with ``{num}`` and
  ``{num_str}`` filled in (``NUM_STR`` is LLMZoo's ``num2str``, which is why 2 to 9 answers). The rules are a
  JSON ``{dimension: {role, prompt, description}}`` (``load_rules``, ``check_rule``). Sending it, at
  temperature 0, is the caller's job.
* The parsers (``parse_order``, ``parse_score``; ``parse_review`` also says why a verdict was not read):
  LLMZoo's ``parse_order_cot`` and ``parse_score_cot``; an unread verdict is ``[-1] * n``, as there.
* The record (``review_record``): one line of LLMZoo's ``review.jsonl``, keys in the order of its stored
  files, so that its scripts read ours and ours read theirs (``read_review_file``).
* The metric (``llmzoo_metric``): its ``compute_metric_all.py`` and ``summary_ordering.py``, rendered byte for
  byte (``metric_json``, ``ordering_txt``). Their quirks are kept: questions in ``coding`` and ``math`` are
  skipped; a review whose verdict was not read adds nothing, but the denominator stays ``questions -
  skipped`` (so unread reviews pull every mean down), which is why the unread count is reported beside it;
  the first model is the reference (non-horizontal mode), always written under LLMZoo's keys ``gpt3.5`` and
  ``turbo``; an order's score is ``10 / rank`` (10, 5, 3.33, 2.5; not the 10 / 7.5 / 5 / 2.5 of LLMZoo's
  README).
* Battles (``order_battles``, ``score_battles``): the pairwise outcomes inside each review, for rankings that
  come with confidence intervals (``n (n - 1) / 2`` per review of ``n`` models).

Where LLMZoo would write a wrong result or crash, this module refuses with a message naming the file and line
instead: an ordering line that names an assistant twice or one that does not exist is a parse failure (LLMZoo
writes rank 0 there, or fills the wrong slot, and its metric then divides by zero); a review file with
duplicate question ids, torn lines or model ids that change from review to review is rejected (LLMZoo keeps
the last duplicate and attributes scores by position).

Nothing here imports torch or talks to a network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from utils.errors import SuiteError, UsageError
from utils.jsonl import object_lines

#: LLMZoo's system message for every review.
SYSTEM_MESSAGE = "You are a helpful and precise assistant for checking the quality of the answer."
#: LLMZoo's ``num2str``: the number words its prompts use, and so the numbers of answers a review may compare.
NUM_STR = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
MODES = ("order", "score")
#: Categories LLMZoo's metric leaves out (the judge is not trusted on them); they still count as questions.
SKIPPED_CATEGORIES = ("coding", "math")
#: An order's score is ``MAX_SCORE_ORDER / rank`` (LLMZoo's ``MAX_SCORE_ORDER``).
MAX_SCORE_ORDER = 10
#: The names under which LLMZoo writes the reference model (the first one), whatever its id.
REFERENCE_KEY = "gpt3.5"  # metric.json
REFERENCE_NAME = "turbo"  # ordering.txt
#: The role word of LLMZoo's rules and of its parsers.
ROLE = "Assistant"
#: How many file:line problems one error message lists (the count is always whole).
LISTED = 20


# -- the prompt --------------------------------------------------------------------------------------------


def num_str(n: int) -> str:
    """LLMZoo's number word for ``n`` answers.

    Raises:
        UsageError: outside 2 to 9, the numbers LLMZoo's prompts (and so its protocol) know.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n not in NUM_STR:
        raise UsageError(f"LLMZoo's review compares 2 to 9 answers (its num2str covers {min(NUM_STR)}..."
                         f"{max(NUM_STR)}); got {n!r}")
    return NUM_STR[n]


def rule_prompt(rule: dict, n: int) -> str:
    """The rule's prompt with ``{num}`` and ``{num_str}`` filled in for ``n`` answers (``str.format``, as LLMZoo).

    Raises:
        UsageError: ``n`` outside 2 to 9, or a rule without a string ``prompt`` and ``role``, or a prompt with
            other ``{...}`` fields than these two.
    """
    words = num_str(n)
    for key in ("role", "prompt"):
        if not isinstance(rule, dict) or not isinstance(rule.get(key), str) or not rule.get(key):
            raise UsageError(f"a review rule needs a non-empty string {key!r} (the format of LLMZoo's "
                             "prompt_all.json: {dimension: {role, prompt, description}})")
    try:
        return rule["prompt"].format(num=n, num_str=words)
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"a review rule's prompt may use only {{num}} and {{num_str}} (double other braces: "
                         f"{{{{ and }}}}); formatting it failed: {type(exc).__name__}: {exc}") from None


def review_prompt(question: str, answers: list[str], rule: dict) -> str:
    """LLMZoo's user message for one review, byte for byte.

    ``[Question]\\n{question}\\n\\n``, then the answers joined by ``\\n\\n``, each as
    ``[{role} i]\\n{answer}\\n\\n[End of {role} i]``, then ``\\n\\n[System]\\n{prompt}\\n\\n``.

    Raises:
        UsageError: see ``rule_prompt`` (fewer than 2 or more than 9 answers, a malformed rule).
    """
    prompt = rule_prompt(rule, len(answers))
    role = rule["role"]
    blocks = [f"[{role} {i}]\n{answer}\n\n[End of {role} {i}]" for i, answer in enumerate(answers, start=1)]
    return f"[Question]\n{question}\n\n" + "\n\n".join(blocks) + f"\n\n[System]\n{prompt}\n\n"


def review_messages(question: str, answers: list[str], rule: dict) -> list[dict]:
    """The chat messages of one LLMZoo review: its system message, then ``review_prompt``. LLMZoo sends them at
    temperature 0 (the caller's choice).

    Raises:
        UsageError: see ``rule_prompt``.
    """
    return [{"role": "system", "content": SYSTEM_MESSAGE},
            {"role": "user", "content": review_prompt(question, answers, rule)}]


def load_rules(path: str | Path, flag: str = "--rules") -> dict[str, dict]:
    """A rules file in the format of LLMZoo's ``prompt_all.json``: ``{dimension: {role, prompt, description}}``.

    Raises:
        UsageError: the file cannot be read, is not JSON, or is not in that format (every problem listed).
    """
    try:
        rules = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{flag} {path}: cannot be read as JSON ({exc})") from None
    if not isinstance(rules, dict) or not rules:
        raise UsageError(f"{flag} {path}: expected a JSON object {{dimension: {{role, prompt, description}}}}")
    problems = []
    for dimension, rule in rules.items():
        if not isinstance(rule, dict):
            problems.append(f"{flag} {path}: {dimension!r} is not an object {{role, prompt, description}}")
            continue
        for key in ("role", "prompt"):
            if not isinstance(rule.get(key), str) or not rule.get(key):
                problems.append(f"{flag} {path}: {dimension!r} has no non-empty string {key!r}")
        if "description" in rule and not isinstance(rule["description"], str):
            problems.append(f"{flag} {path}: {dimension!r}: 'description' must be a string")
    if problems:
        raise UsageError("\n".join(problems))
    return rules


def check_rule(rules: dict[str, dict], dimension: str, mode: str, n: int, flag: str = "--rules") -> dict:
    """The rule of ``dimension``, checked as LLMZoo checks it: its prompt formats for ``n`` answers and, formatted,
    says ``order`` (order mode) or ``score`` (score mode), so that order rules are not used to score.

    Raises:
        UsageError: every problem at once (unknown dimension or mode, a prompt that does not fit the mode).
    """
    problems = []
    if mode not in MODES:
        problems.append(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    rule = rules.get(dimension)
    if rule is None:
        problems.append(f"--dimension {dimension!r} is not in {flag} (it has: {', '.join(rules)})")
    if problems:
        raise UsageError("\n".join(problems))
    prompt = rule_prompt(rule, n)
    if mode not in prompt:
        raise UsageError(f"{flag}: the {dimension!r} prompt never says {mode!r}, so it does not ask for "
                         f"--mode {mode} verdicts (LLMZoo refuses it too); use the rules of that mode")
    return rule


# -- the parsers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewParse:
    """One verdict read from a judge's text: ``values`` (ranks or scores; ``[-1] * n`` when not read, as LLMZoo)
    and ``error``, why it was not read (None when it was)."""

    values: list
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _failed(n: int, error: str) -> ReviewParse:
    return ReviewParse([-1] * n, error)


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"the number of answers in a review must be a positive integer, got {n!r}")


def _parse_order(text: str, n: int, role: str) -> ReviewParse:
    """LLMZoo's ``parse_order_cot`` (see ``parse_order``), with the reason of a failure."""
    # As LLMZoo: ">=" and ">>" mean "better than" (">=" first, then ">>", each left to right).
    text = text.replace(">=", ">").replace(">>", ">")
    r = re.escape(role)
    # Python's \d, as LLMZoo's: any Unicode decimal digit (int() reads them all).
    chains = [m.group(0) for m in re.finditer(rf"{r} \d(?: [>=] {r} \d)+", text.strip())]
    if not chains:
        return _failed(n, f"no ordering line: nothing like '{role} 1 > {role} 2 = {role} 3' in the text")
    full = [c for c in chains if len(re.findall(r, c)) == n]
    if not full:
        sizes = sorted({len(re.findall(r, c)) for c in chains})
        return _failed(n, f"no ordering of all {n} assistants: the orderings in the text name "
                          f"{', '.join(map(str, sizes))} of them ({chains[0]!r})")
    chain = full[0]  # the first one, as LLMZoo
    named = [int(d) for d in re.findall(rf"{r} (\d)", chain)]
    comparisons = re.findall(rf"\d ([>=]) {r}", chain)
    outside = sorted({i for i in named if not 1 <= i <= n})
    if outside:
        return _failed(n, f"the ordering {chain!r} names {role} {outside[0]}, but there are {n}")
    twice = sorted({i for i in named if named.count(i) > 1})
    if twice:
        missing = sorted(set(range(1, n + 1)) - set(named))
        return _failed(n, f"the ordering {chain!r} names {role} {twice[0]} twice and leaves out "
                          f"{role} {missing[0]}")
    # Competition ranking: equals share a rank, and the next one after them skips as many ranks.
    ranks = [0] * n
    rank, equal = 1, 0
    ranks[named[0] - 1] = rank
    for comparison, i in zip(comparisons, named[1:]):
        if comparison == ">":
            rank += equal + 1
            equal = 0
        else:
            equal += 1
        ranks[i - 1] = rank
    return ReviewParse(ranks)


def _parse_score(text: str, n: int, role: str) -> ReviewParse:
    """LLMZoo's ``parse_score_cot`` (see ``parse_score``), with the reason of a failure."""
    stripped = text.strip()
    last = stripped.split("\n")[-1]
    if re.match(r"^[ \d\.]+$", last):
        # The last line is only digits, dots and spaces. (LLMZoo also turns commas into spaces here, which
        # cannot change a line that has none.)
        parts, where = last.split(" "), f"the last line {last!r}"
    elif re.search(r"[ \d\.]+$", stripped):
        # The text ends with numbers. LLMZoo searches the text as given here, not the stripped one: trailing
        # whitespace after the numbers then defeats it, and so it does here.
        match = re.search(r"([ \d\.]+)$", text)
        tail = match.group(1).strip(" .") if match else ""
        if not tail:
            return _failed(n, "no scores at the end of the text: it ends with a dot or whitespace, and LLMZoo's "
                              "parser then looks for numbers there and nowhere else")
        parts, where = tail.split(" "), f"the numbers that end the text ({tail!r})"
    else:
        parts = []
        for i in range(1, n + 1):
            match = re.search(rf"{re.escape(role)} {i}: ([0-9\.]+)", text)
            if match is None:
                return _failed(n, f"no scores: the last line is not numbers, the text does not end with numbers "
                                  f"and it has no '{role} {i}: <score>'")
            parts.append(match.group(1))
        where = f"the '{role} i: <score>' entries"
    if "" in parts:
        return _failed(n, f"{where}: not numbers separated by single spaces")
    if len(parts) != n:
        return _failed(n, f"{where} give {len(parts)} numbers, not {n}")
    try:
        return ReviewParse([float(p) for p in parts])
    except ValueError:
        return _failed(n, f"{where}: not {n} numbers separated by single spaces")


def parse_review(text: str, n: int, mode: str = "order", role: str = ROLE) -> ReviewParse:
    """A judge's verdict on ``n`` answers, with the reason when it cannot be read.

    Raises:
        UsageError: an unknown ``mode``, or ``n`` not a positive integer.
    """
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check_n(n)
    if not isinstance(text, str):
        return _failed(n, f"the judge's text is not a string ({type(text).__name__})")
    return (_parse_order if mode == "order" else _parse_score)(text, n, role)


def parse_order(text: str, n: int) -> list[int]:
    """The ranks of ``n`` assistants in a judge's text: LLMZoo's ``parse_order_cot``.

    ``>=`` and ``>>`` are read as ``>``; the first ``Assistant i ( [>=] Assistant j)+`` chain that names exactly
    ``n`` assistants is the ordering, ranked as a competition (``"Assistant 2 > Assistant 1 = Assistant 3 >
    Assistant 4"`` gives ``[2, 1, 2, 4]``). ``[-1] * n`` when there is none, or when it names an assistant
    twice or one outside 1..n (``parse_review`` says which).
    """
    return parse_review(text, n, "order").values


def parse_score(text: str, n: int) -> list[float]:
    """The scores of ``n`` assistants in a judge's text: LLMZoo's ``parse_score_cot``.

    The last line when it is only numbers (digits, dots, single spaces); else the numbers the text ends with;
    else ``Assistant i: x`` for each i. ``[-1] * n`` when that does not give ``n`` numbers.
    """
    return parse_review(text, n, "score").values


# -- the record --------------------------------------------------------------------------------------------


def review_record(question: dict, answers: list[dict], text: str, *, mode: str, reviewer_id: str,
                  parsed: ReviewParse | None = None, review_id: int | None = None) -> dict:
    """One line of LLMZoo's ``review.jsonl``.

    Keys in the order of LLMZoo's stored files: ``review_id`` (only when given), ``reviewer_id, lang,
    question_id, answer_ids, category, metadata {question, answers, model_ids}, text`` and ``order`` or
    ``score``; then ``parse_error`` (ours) when the verdict was not read, so that it is kept with its reason.
    LLMZoo's scripts read only the fields they know.

    Args:
        question: ``{question_id, text, category, lang?}`` (``lang`` defaults to ``en``, as in LLMZoo).
        answers: one ``{answer_id, model_id, text}`` per model, in the review's order.
        text: the judge's output, verbatim.
        mode: ``order`` or ``score``.
        reviewer_id: the judge model's name (LLMZoo writes ``gpt-3.5-turbo``).
        parsed: the verdict, if already read (default: ``parse_review(text, len(answers), mode)``).
        review_id: written first when given, as in LLMZoo's stored files.

    Raises:
        SuiteError: a question or answer without one of the fields named above.
    """
    if parsed is None:
        parsed = parse_review(text, len(answers), mode)
    try:
        record = {} if review_id is None else {"review_id": review_id}
        record.update({
            "reviewer_id": reviewer_id,
            "lang": question.get("lang", "en"),
            "question_id": question["question_id"],
            "answer_ids": [a["answer_id"] for a in answers],
            "category": question["category"],
            "metadata": {"question": question["text"], "answers": [a["text"] for a in answers],
                         "model_ids": [a["model_id"] for a in answers]},
            "text": text,
            mode: list(parsed.values),
        })
    except KeyError as exc:
        raise SuiteError(f"a review needs the question's question_id, text and category and each answer's "
                         f"answer_id, model_id and text; {exc.args[0]!r} is missing") from None
    if parsed.error is not None:
        record["parse_error"] = parsed.error
    return record


# -- reading review files ----------------------------------------------------------------------------------


@dataclass
class ReviewSet:
    """The reviews of one file, by question id (ascending, as LLMZoo keys them).

    ``values[qid]`` is the verdict the metric uses: the stored ``order`` / ``score`` field, which LLMZoo's own
    metrics were computed from, or the text re-parsed (``reparse``). ``errors[qid]`` says why a verdict is
    ``-1`` (a parse error kept in the file, or the re-parse's); ``changed`` lists the questions where a
    re-parse disagrees with the stored field."""

    source: str
    mode: str
    reparsed: bool
    records: dict = field(default_factory=dict)
    lines: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    changed: list = field(default_factory=list)

    @property
    def question_ids(self) -> list:
        return list(self.records)

    @property
    def model_ids(self) -> list[str]:
        """The model ids of the first question's review (LLMZoo's source of them); every review has the same."""
        first = next(iter(self.records.values()))
        return list(first["metadata"]["model_ids"])

    def where(self, qid: Any) -> str:
        """``file:line`` of a question's review."""
        return f"{self.source}:{self.lines[qid]}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record_problem(record: Any, mode: str, reparse: bool, model_ids: list | None) -> str | None:
    """Why a record cannot be used by the metric (None if it can)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("question_id", "category", "metadata"):
        if key not in record:
            return f"no {key!r}"
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        return f"question_id {qid!r} is not an integer or a string"
    ids = record["metadata"].get("model_ids") if isinstance(record["metadata"], dict) else None
    if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(m, str) for m in ids):
        return "metadata.model_ids is not a list of 2 or more model names"
    if len(set(ids)) != len(ids):
        return f"metadata.model_ids repeats a model ({ids}); each must be named apart"
    if model_ids is not None and ids != model_ids:
        return (f"metadata.model_ids {ids} differ from the first review's {model_ids} (LLMZoo would credit "
                "the verdicts by position)")
    if reparse:
        if not isinstance(record.get("text"), str):
            return "no judge text ('text') to re-parse"
        return None
    if mode not in record:
        other = next(m for m in MODES if m != mode)
        hint = f"; it has {other!r}: pass --mode {other}" if other in record else ""
        return f"no {mode!r} field (a review of the other mode, or one to --reparse){hint}"
    values = record[mode]
    if not isinstance(values, list) or len(values) != len(ids) or not all(_is_number(v) for v in values):
        return f"{mode} {values!r} is not a list of {len(ids)} numbers (one per model)"
    if mode == "order" and -1 not in values and any(v < 1 for v in values):
        return f"order {values} has a rank below 1 (LLMZoo's metric would divide by it)"
    return None


def review_set(rows: Iterable[tuple[int, Any]], source: str, *, mode: str = "order",
               reparse: bool = False) -> ReviewSet:
    """A ``ReviewSet`` from ``(line number, record)`` pairs (see ``read_review_file``).

    Raises:
        SuiteError: naming ``source:line`` of every review that cannot be used (all at once): missing fields,
            a verdict that is not one number per model, duplicate question ids, model ids that change.
    """
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    reviews = ReviewSet(source, mode, reparse)
    problems, first_line, model_ids, unsorted = [], {}, None, {}
    for line, record in rows:
        problem = _record_problem(record, mode, reparse, model_ids)
        if problem is None:
            qid = record["question_id"]
            if qid in first_line:
                problem = f"question_id {qid!r} again (first at line {first_line[qid]})"
            else:
                first_line[qid] = line
                model_ids = model_ids or list(record["metadata"]["model_ids"])
                unsorted[qid] = (line, record)
        if problem is not None:
            problems.append(f"{source}:{line}: {problem}")
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:LISTED])
        more = f"\n  ... and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
        raise SuiteError(f"{source}: {len(problems)} review(s) cannot be used:\n{shown}{more}")
    if not unsorted:
        raise SuiteError(f"{source}: no reviews")
    try:
        qids = sorted(unsorted)
    except TypeError:
        raise SuiteError(f"{source}: question ids mix integers and strings; they cannot be ordered") from None
    n = len(model_ids)
    for qid in qids:
        line, record = unsorted[qid]
        reviews.records[qid], reviews.lines[qid] = record, line
        stored = record.get(mode)
        if reparse:
            parsed = parse_review(record["text"], n, mode)
            reviews.values[qid] = parsed.values
            if parsed.error is not None:
                reviews.errors[qid] = parsed.error
            if stored is not None and stored != parsed.values:
                reviews.changed.append(qid)
        else:
            reviews.values[qid] = list(stored)
            if -1 in stored:
                kept = record.get("parse_error")
                reviews.errors[qid] = kept if isinstance(kept, str) and kept else (
                    f"stored {mode} is {stored}: the judge's verdict was not read when the review was written")
    return reviews


def read_review_file(path: str | Path, *, mode: str = "order", reparse: bool = False,
                 flag: str = "--review_file") -> ReviewSet:
    """A ``review.jsonl`` written by LLMZoo's scripts or by ours.

    Raises:
        SuiteError: the file cannot be read, a line is not JSON (a torn write included: a metric on part of a
            run would be wrong without saying so), or a review cannot be used (see ``review_set``); each named
            by ``file:line``.
    """
    rows, torn = [], []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{flag} {path}: cannot be read ({exc})") from None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            torn.append(f"{path}:{number}: not JSON ({exc.msg})")
    if torn:
        raise SuiteError(f"{flag} {path}: {len(torn)} line(s) are not JSON (a torn or unfinished write?):\n"
                         + "\n".join(f"  {t}" for t in torn[:LISTED]))
    return review_set(rows, str(path), mode=mode, reparse=reparse)


def read_question_ids(path: str | Path, flag: str = "--question_file") -> list:
    """The question ids of a questions JSONL (``{question_id, ...}`` per line), in file order.

    Raises:
        SuiteError: unreadable lines, lines without a question_id and duplicate ids, each with ``file:line``.
    """
    rows, problems = object_lines(path, flag)
    ids, seen = [], {}
    for number, row in rows:
        qid = row.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            problems.append(f"{path}:{number}: no question_id (an integer or a string)")
        elif qid in seen:
            problems.append(f"{path}:{number}: question_id {qid!r} again (first at line {seen[qid]})")
        else:
            seen[qid] = number
            ids.append(qid)
    if problems:
        raise SuiteError(f"{flag} {path}: {len(problems)} problem(s):\n"
                         + "\n".join(f"  {p}" for p in problems[:LISTED]))
    if not ids:
        raise SuiteError(f"{flag} {path}: no questions")
    return ids


# -- the metric --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMZooMetric:
    """LLMZoo's metric of one review set (``metric``: the content of its ``metric.json``) and what it leaves
    unsaid: which questions were skipped, and which reviews added nothing while still counting in the
    denominator."""

    metric: dict
    mode: str
    horizontal: bool
    reference: str | None
    models: list
    questions: int
    skipped: dict
    denominator: int
    unparsed: list
    counted: int
    outside_questions: int

    def metric_json(self) -> str:
        """``metric.json``'s text."""
        return metric_json(self.metric)

    def ordering(self) -> list[tuple[str, float, int]] | None:
        """``ordering.txt``'s rows (order mode), else None."""
        return ordering_rows(self.metric, self.horizontal) if self.mode == "order" else None

    def ordering_txt(self) -> str | None:
        """``ordering.txt``'s text (order mode), else None."""
        return ordering_txt(self.metric, self.horizontal) if self.mode == "order" else None


def llmzoo_metric(reviews: ReviewSet, *, horizontal: bool = False, question_ids: Iterable | None = None
                  ) -> LLMZooMetric:
    """LLMZoo's ``compute_metric_all.py`` on a review set.

    Questions are taken in ascending id order: ``question_ids`` (a question file's) or the reviews' own. The
    model ids are the first question's. Non-horizontal, the first model is the reference: each other model
    gets ``winning`` (reference better / tie / model better, and the model's wins over the denominator),
    mean ``order`` (order mode) and mean ``score`` with its ratio to the reference's; horizontal, each model
    gets its mean ``order`` and ``score`` only. An order's score is ``10 / rank``; in score mode the score is
    the judge's. The denominator is the number of questions less those in ``coding`` / ``math``, whether or
    not their reviews could be read (LLMZoo's), and ``unparsed`` lists the reviews that added nothing.

    A ratio whose reference sum is 0 (no review read) is None (``null``), where LLMZoo would divide by zero.

    Raises:
        SuiteError: a question without a review, or no question left to score (all coding / math).
    """
    if question_ids is None:
        qids, outside = reviews.question_ids, 0
    else:
        wanted = list(question_ids)
        try:
            qids = sorted(set(wanted))
        except TypeError:
            raise SuiteError("question ids mix integers and strings; they cannot be ordered") from None
        missing = [q for q in qids if q not in reviews.records]
        if missing:
            shown = ", ".join(map(repr, missing[:LISTED])) + (", ..." if len(missing) > LISTED else "")
            raise SuiteError(f"{reviews.source}: no review for {len(missing)} of the {len(qids)} questions: "
                             f"{shown}")
        outside = len(set(reviews.records) - set(qids))
    ids = list(reviews.records[qids[0]]["metadata"]["model_ids"])
    reference = None if horizontal else ids[0]
    models = ids if horizontal else ids[1:]
    mode = reviews.mode
    wins = {m: {"reference": 0, "tie": 0, "model": 0} for m in models}
    rank_sum = {m: 0 for m in ids}
    score_sum = {m: 0 for m in ids}
    skipped = {c: 0 for c in SKIPPED_CATEGORIES}
    unparsed = []
    for qid in qids:
        category = reviews.records[qid]["category"]
        if category in skipped:
            skipped[category] += 1
            continue
        values = reviews.values[qid]
        if -1 in values:
            unparsed.append(qid)
            continue
        ref_value, model_values = (None, values) if horizontal else (values[0], values[1:])
        for model, value in zip(models, model_values):
            if reference is not None:
                # Order mode: the lower rank is better; score mode: the higher score.
                ref_better = ref_value < value if mode == "order" else ref_value > value
                model_better = ref_value > value if mode == "order" else ref_value < value
                wins[model]["reference" if ref_better else "model" if model_better else "tie"] += 1
            _add(rank_sum, score_sum, model, value, mode)
        if reference is not None:
            _add(rank_sum, score_sum, reference, ref_value, mode)
    denominator = len(qids) - sum(skipped.values())
    if denominator <= 0:
        raise SuiteError(f"{reviews.source}: all {len(qids)} questions are in {' or '.join(SKIPPED_CATEGORIES)}, "
                         "which LLMZoo's metric skips: nothing to score")
    metric = {}
    for model in models:
        if horizontal:
            metric[model] = ({"order": rank_sum[model] / denominator} if mode == "order" else {})
            metric[model]["score"] = score_sum[model] / denominator
            continue
        entry = {"winning": {REFERENCE_KEY: wins[model]["reference"], "tie": wins[model]["tie"],
                             "model": wins[model]["model"], "%model": wins[model]["model"] / denominator}}
        if mode == "order":
            entry["order"] = {REFERENCE_KEY: rank_sum[reference] / denominator,
                              "model": rank_sum[model] / denominator}
        entry["score"] = {REFERENCE_KEY: score_sum[reference] / denominator, "model": score_sum[model] / denominator,
                          "%model": score_sum[model] / score_sum[reference] if score_sum[reference] else None}
        metric[model] = entry
    return LLMZooMetric(metric=metric, mode=mode, horizontal=horizontal, reference=reference, models=ids,
                        questions=len(qids), skipped=skipped, denominator=denominator, unparsed=unparsed,
                        counted=denominator - len(unparsed), outside_questions=outside)


def _add(rank_sum: dict, score_sum: dict, model: str, value: Any, mode: str) -> None:
    """One verdict into a model's sums (in question order, as LLMZoo adds them: the floats come out the same)."""
    if mode == "order":
        rank_sum[model] += value
        score_sum[model] += MAX_SCORE_ORDER / value
    else:
        score_sum[model] += value


def metric_json(metric: dict) -> str:
    """``metric.json``'s text, as LLMZoo writes it: ``json.dumps(metric, indent=4)`` and a newline."""
    return json.dumps(metric, indent=4) + "\n"


def ordering_rows(metric: dict, horizontal: bool = False) -> list[tuple[str, float, int]]:
    """LLMZoo's ``summary_ordering.py`` on a metric (order mode): ``(model, mean rank, rank)`` rows.

    The models' mean orders, then (non-horizontal) the reference's as ``turbo``, stably sorted ascending and
    ranked as a competition: ties share a rank and the next rank skips. As in LLMZoo the previous value starts
    at 0, so a mean of 0 (no review read) ranks 0.

    Raises:
        SuiteError: a metric without mean orders (a score-mode one).
    """
    try:
        if horizontal:
            pairs = [(model, value["order"]) for model, value in metric.items()]
        else:
            pairs = [(model, value["order"]["model"]) for model, value in metric.items()]
            pairs.append((REFERENCE_NAME, list(metric.values())[-1]["order"][REFERENCE_KEY]))
    except (KeyError, TypeError, IndexError):
        raise SuiteError("an ordering needs an order-mode metric (mean orders per model"
                         f"{'' if horizontal else ' and a reference'})") from None
    rows, rank, equal, previous = [], 0, 0, 0
    for model, value in sorted(pairs, key=lambda pair: pair[1]):
        if value > previous:
            rank += equal + 1
            equal = 0
        else:
            equal += 1
        rows.append((model, value, rank))
        previous = value
    return rows


def ordering_txt(metric: dict, horizontal: bool = False) -> str:
    """``ordering.txt``'s text, as LLMZoo writes it: 30-character columns (trailing spaces included) under the
    header ``Model``, ``Ranking Score``, ``Rank``."""
    line = "{0:<30}{1:<30}{2:<30}\n"
    return line.format("Model", "Ranking Score", "Rank") + "".join(
        line.format(*row) for row in ordering_rows(metric, horizontal))


# -- battles, for rankings ---------------------------------------------------------------------------------


def battles_from_order(model_ids: Sequence[str], order: Sequence[int]) -> list[tuple[str, str, str]]:
    """The n(n-1)/2 battles of one LLMZoo ordering of n models: the lower rank wins, equal ranks tie, pairs in
    model order ((0, 1), (0, 2), ..., (n-2, n-1)); none when the order holds -1 (a review that did not parse)."""
    if any(rank == -1 for rank in order):
        return []
    out = []
    for i in range(len(model_ids)):
        for j in range(i + 1, len(model_ids)):
            out.append((model_ids[i], model_ids[j],
                        "a" if order[i] < order[j] else "b" if order[i] > order[j] else "tie"))
    return out


def _battles(reviews: ReviewSet | Iterable[dict], mode: str, skip_categories: Iterable[str]
             ) -> list[tuple[str, str, str]]:
    skip = set(skip_categories)
    if isinstance(reviews, ReviewSet):
        items = [(r["metadata"]["model_ids"], reviews.values[q], r.get("category"))
                 for q, r in reviews.records.items()]
    else:
        items = [(r["metadata"]["model_ids"], r[mode], r.get("category")) for r in reviews]
    out = []
    for model_ids, values, category in items:
        if category in skip or -1 in values:
            continue
        # A higher score is a better (lower) rank: one pairing rule for both modes (rankings' own).
        out += battles_from_order(model_ids, values if mode == "order" else [-v for v in values])
    return out


def order_battles(reviews: ReviewSet | Iterable[dict], *, skip_categories: Iterable[str] = SKIPPED_CATEGORIES
                  ) -> list[tuple[str, str, str]]:
    """The pairwise outcomes inside order-mode reviews: ``(model_a, model_b, winner)`` with winner ``"a"``,
    ``"b"`` or ``"tie"``.

    A review of n models gives n (n - 1) / 2 battles, for each pair in the review's order: the lower rank wins,
    equal ranks tie. A review whose verdict was not read (-1) gives none; so do reviews in
    ``skip_categories`` (default: the ones LLMZoo's metric skips, so both rank the same reviews).

    Args:
        reviews: a ``ReviewSet`` (its verdicts, re-parsed or stored) or LLMZoo records (their ``order``).
        skip_categories: categories whose reviews are left out.
    """
    return _battles(reviews, "order", skip_categories)


def score_battles(reviews: ReviewSet | Iterable[dict], *, skip_categories: Iterable[str] = SKIPPED_CATEGORIES
                  ) -> list[tuple[str, str, str]]:
    """As ``order_battles``, for score-mode reviews: the higher score wins, equal scores tie."""
    return _battles(reviews, "score", skip_categories)
