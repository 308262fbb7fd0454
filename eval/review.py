"""LLMZoo's GPT review of 2 to 9 models' answers, against any OpenAI-compatible judge, resumable and counted.

LLMZoo's ``eval_gpt_review_all.py``, faithful first: for every question (ascending ``question_id``) the judge is
shown the question and every model's answer, in the order of ``--answer_files``, in LLMZoo's user message
byte for byte, after LLMZoo's system message, at temperature 0, and asked to order them (``--mode order``) or
score them (``--mode score``) on one ``--dimension`` of a rules file in the format of LLMZoo's
``prompt_all.json`` (``utils.evaluation.llmzoo``). Its verdict is parsed with LLMZoo's parsers and written
to ``review.jsonl`` in LLMZoo's record format, which their ``compute_metric_all.py`` reads, then LLMZoo's
``metric.json`` and (order mode) ``ordering.txt`` are computed from it as ``eval/llmzoo_metric.py`` does.

Then better: the judge is any endpoint (``utils.judge``: retries, a disk cache, a concurrency limit and a rate
limit); each review is appended to ``review.jsonl`` as it arrives, so a killed run keeps what it had and a
re-run sends only the reviews still missing (an identical re-run of a finished one sends nothing and changes
no file); and nothing fails silently:

* a question file or answer file with an unreadable line, a row without its fields, or a duplicate id, an
  answer file that leaves a question unanswered (its missing ids named) or mixes models, is refused with
  file:line before any request;
* a judge output whose verdict cannot be parsed is kept verbatim, with ``order`` / ``score`` ``[-1] * n``
  as LLMZoo writes it and a ``parse_error`` saying why, and counted (stderr, ``report.json``); LLMZoo's metric
  then counts it in its denominator while it adds nothing (its quirk, reproduced and reported). More than
  ``--max_unparsed`` of them (default 5%), or any with ``--strict``, ends the run non-zero after everything
  is written;
* a request that still fails after all retries is listed with the server's message and left out of
  ``review.jsonl``; the metric is not written (it would be of part of the questions), the run ends non-zero,
  and a re-run asks again.

Each record also carries ``review_key``, a hash of what was asked (judge model, messages, sampling): a
review made with another judge, rules or answers is never taken for this one (``--overwrite`` replaces it).
The endpoint's address is not part of it, but it is part of the folder's fingerprint: the same judge at
another address needs ``--overwrite`` on a finished folder, and then sends nothing (every review is kept).

The output folder (``--output_dir``): ``review.jsonl``, ``metric.json``, ``ordering.txt``, ``report.json`` (the
counts, unparsed reviews with their reasons, failures, the metric and ordering, the judge's request counts and
token usage, the input files' hashes), ``pipeline.json`` (written when every review is in), and the judge
cache (``cache/``, unless ``--cache_dir`` names one to share). The report is also printed on stdout.

Examples:
    python eval/review.py --question_file questions-en.jsonl --rules prompt_all.json --dimension general \\
        --answer_files answer_gpt35.jsonl answer_mylora.jsonl --judge_base_url http://127.0.0.1:8000/v1 \\
        --judge_model gpt-3.5-turbo --output_dir runs/review/general
    python eval/review.py --mode score --dimension relevance --question_file q.jsonl \\
        --answer_files a.jsonl b.jsonl c.jsonl --judge_base_url https://api.openai.com/v1 \\
        --judge_model gpt-4o-mini --output_dir runs/review/relevance-score
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.args import Group, StageArgs, unfingerprinted  # noqa: E402
from utils.artifacts import (META_FILE, META_VERSION, Lock, check_output_dir, read_meta, sha256_file,  # noqa: E402
                             sha256_json, write_json, write_meta)
from utils.cli import run  # noqa: E402
from utils.errors import SuiteError, UsageError  # noqa: E402
from utils.evaluation.llmzoo import NUM_STR  # noqa: E402
from utils.evaluation.stage import REPORT_FILE, Destination, UnparsedChecks, emit, file_record  # noqa: E402
from utils.jsonl import JsonlAppender, key_of, read_jsonl, write_jsonl  # noqa: E402
from utils.judge import JudgeOptions  # noqa: E402

STAGE = "review"
REVIEW_FILE = "review.jsonl"
METRIC_FILE = "metric.json"
ORDERING_FILE = "ordering.txt"
CACHE_DIR = "cache"
#: Our score-mode rules (LLMZoo publishes none: its prompts/score/ folder is missing).
SCORE_RULES = Path(__file__).resolve().parents[1] / "templates" / "judge" / "llmzoo_score.json"
#: The most entries an error or report lists one by one (the counts are always whole).
LISTED = 100
SHOWN = 20
_PERMISSION = "a permission: it only allows what is otherwise refused"


# -- flags, by concern -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs(Group):
    """The questions, the answers compared (their order is the assistants' order) and the rule asked."""

    question_file: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    answer_files: list[str] = unfingerprinted((), why="count as their contents, in order (hashed among the inputs)")
    rules: str = unfingerprinted("", why="counts as its content (the rule of --dimension is hashed among the inputs)")
    dimension: str = ""
    mode: Literal["order", "score"] = "order"

    def problems(self) -> list[str]:
        problems = []
        if not self.question_file:
            problems.append("--question_file is required")
        elif not Path(self.question_file).is_file():
            problems.append(f"--question_file {self.question_file}: no such file")
        n = len(self.answer_files)
        if not min(NUM_STR) <= n <= max(NUM_STR):
            problems.append(f"--answer_files: LLMZoo's review compares {min(NUM_STR)} to {max(NUM_STR)} answer "
                            f"files (its prompts name the assistants in words: num2str), got {n}")
        problems += [f"--answer_files {p}: no such file" for p in self.answer_files if not Path(p).is_file()]
        if not self.rules and self.mode == "order":
            problems.append("--rules is required in order mode: a JSON in the format of LLMZoo's prompt_all.json "
                            "({dimension: {role, prompt, description}}), e.g. LLMZoo's "
                            "llmzoo/eval/prompts/order/prompt_all.json")
        elif self.rules and not Path(self.rules).is_file():
            problems.append(f"--rules {self.rules}: no such file")
        if not self.dimension:
            problems.append("--dimension is required (a key of --rules: general, relevance, ...)")
        return problems

    @property
    def rules_file(self) -> str:
        """--rules, or in score mode our rules by default."""
        return self.rules or str(SCORE_RULES)


@dataclass(frozen=True)
class Request(Group):
    """What is asked of the judge besides the messages (LLMZoo: temperature 0, no max_tokens)."""

    max_tokens: int = 0

    def problems(self) -> list[str]:
        return [] if self.max_tokens >= 0 else [f"--max_tokens must be >= 0 (0: not sent), got {self.max_tokens}"]


@dataclass(frozen=True)
class Metric(Group):
    """How LLMZoo's metric reads the verdicts."""

    horiz: bool = False


@dataclass(frozen=True)
class ReviewArgs(StageArgs):
    STAGE = STAGE

    inputs: Inputs
    request: Request
    judge: JudgeOptions
    metric: Metric
    policy: UnparsedChecks
    destination: Destination


Args = ReviewArgs


def main(
    *,
    question_file: str = "",
    answer_files: list[str] = (),
    rules: str = "",
    dimension: str = "",
    mode: Literal["order", "score"] = "order",
    horiz: bool = False,
    max_tokens: int = 0,
    judge_base_url: str = "",
    judge_model: str = "",
    judge_api_key_env: str = "OPENAI_API_KEY",
    cache_dir: str = "",
    max_retries: int = 5,
    timeout: float = 60.0,
    concurrency: int = 4,
    rpm: float = 0.0,
    output_dir: str = "",
    overwrite: bool = False,
    max_unparsed: float = 0.05,
    strict: bool = False,
) -> None:
    """LLMZoo's review of 2 to 9 models' answers by an LLM judge: review.jsonl, metric.json, ordering.txt.

    Args:
        question_file: JSONL of {question_id, text, category, lang} rows (LLMZoo's questions-en.jsonl).
        answer_files: 2 to 9 answer JSONL files ({question_id, text, answer_id, model_id}, eval/answer.py's or
            LLMZoo's), each covering every question; their order is the assistants' (the first is the
            reference unless --horiz).
        rules: JSON in the format of LLMZoo's prompt_all.json ({dimension: {role, prompt, description}});
            required in order mode; score mode defaults to templates/judge/llmzoo_score.json.
        dimension: The rule to ask (general, relevance, diversity, coherence, immersion, integrity, ...).
        mode: order (the judge orders the answers) or score (it scores each one); the rule's prompt must say it.
        horiz: LLMZoo's horizontal metric (every model side by side); default: the first answer file's model
            is the reference (written as gpt3.5 / turbo).
        max_tokens: Most tokens per review (0: not sent, as LLMZoo).
        judge_base_url: The judge's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (serve.py's
            server is one).
        judge_model: The judge's model name (also written as each review's reviewer_id).
        judge_api_key_env: Name of the environment variable holding the judge's API key (the key itself is
            never written anywhere; unset: no key is sent).
        cache_dir: The judge's request cache, shareable between runs (default: cache/ in --output_dir).
        max_retries: Retries of a request on 429, 5xx, timeouts and connection errors.
        timeout: Seconds per request.
        concurrency: Requests in flight at most.
        rpm: Requests per minute at most (0: no limit).
        output_dir: The review folder (review.jsonl, metric.json, ordering.txt, report.json, pipeline.json);
            a killed run resumes in it, a finished one re-run is a no-op.
        overwrite: Replace reviews or a finished result in --output_dir made otherwise (reviews asked the
            same way are kept), or write into a folder this suite did not write (its other files are kept).
        max_unparsed: End non-zero (after writing everything) when more than this fraction of the verdicts
            cannot be parsed.
        strict: End non-zero when any verdict cannot be parsed or any request fails.
    """
    args = ReviewArgs.from_flags(dict(locals()))
    problems = args.problems() + ([] if args.destination.output_dir else ["--output_dir is required (the review "
                                                                          "folder)"])
    if problems:
        raise UsageError("\n".join(problems))
    plan = plan_reviews(args)
    out = Path(args.destination.output_dir)
    resumable = (lambda folder: (folder / REVIEW_FILE).is_file())
    if check_output_dir(out, STAGE, plan.fingerprint, args.destination.overwrite, resumable=resumable):
        return finished(out, plan, args.policy)
    out.mkdir(parents=True, exist_ok=True)
    with Lock(out / ".lock", f"--output_dir {out}"):
        # Again under the lock: another run may have finished it meanwhile.
        if check_output_dir(out, STAGE, plan.fingerprint, args.destination.overwrite, resumable=resumable):
            return finished(out, plan, args.policy)
        items = review_items(args, plan)
        done, rewrite = previous_reviews(out / REVIEW_FILE, items, args.destination.overwrite)
        mark_unfinished(out)
        report = review(args, plan, out, items, done, rewrite)
    emit(report)
    raise_outcome(report, args.policy)


# -- the plan: inputs read and checked before any request --------------------------------------------------


@dataclass
class Plan:
    """Everything a run asks, worked out before any request: the questions (ascending id), each model's answer
    to each, the rule, the input records and the fingerprint of the whole."""

    questions: list
    answers: list[dict[str, dict]]  # per answer file: key_of(question_id) -> {answer_id, model_id, text}
    rule: dict
    inputs: dict
    fingerprint: str


def plan_reviews(args: ReviewArgs) -> Plan:
    """Read and check every input (all problems at once), before the output folder is touched."""
    from eval.answer import read_questions
    from utils.evaluation.llmzoo import check_rule, load_rules

    io = args.inputs
    rules = load_rules(io.rules_file)
    rule = check_rule(rules, io.dimension, io.mode, len(io.answer_files))
    questions = read_questions(io.question_file, need_category=True)
    try:
        questions = sorted(questions, key=lambda q: q.id)  # LLMZoo reviews in ascending question_id
    except TypeError:
        raise SuiteError(f"--question_file {io.question_file}: question ids mix integers and strings; they cannot "
                         "be put in LLMZoo's ascending order") from None
    answers = read_answer_files(io.answer_files, questions)
    inputs = {"question_file": file_record(io.question_file),
              "answer_files": [file_record(p) for p in io.answer_files],
              "rules": file_record(io.rules_file), "rule": rule}
    fp = fingerprint(args, {"question_file": inputs["question_file"]["sha256"],
                            "answer_files": [r["sha256"] for r in inputs["answer_files"]], "rule": sha256_json(rule)})
    return Plan(questions, answers, rule, inputs, fp)


def read_answer_files(paths: list[str], questions: list) -> list[dict[str, dict]]:
    """Each file's answers by ``key_of(question_id)``, checked together: every question answered by every file,
    one model per file and a different one in each (the metric names models by their model_id).

    Raises:
        SuiteError: every problem of every file at once, with file:line (missing answers by question id).
    """
    problems, sets, models = [], [], {}
    for path in paths:
        answers, bad = read_answer_file(path)
        problems += bad
        sets.append(answers)
        missing = [q.id for q in questions if key_of(q.id) not in answers]
        if missing and not bad:
            shown = ", ".join(map(repr, missing[:SHOWN])) + (", ..." if len(missing) > SHOWN else "")
            problems.append(f"--answer_files {path}: no answer to {len(missing)} of the {len(questions)} questions: "
                            f"question_id {shown}")
        ids = {answers[key_of(q.id)]["model_id"] for q in questions if key_of(q.id) in answers}
        if len(ids) > 1:
            problems.append(f"--answer_files {path}: answers of several models ({', '.join(sorted(ids))}); one file "
                            "holds one model's answers")
        for model in ids:
            if model in models:
                problems.append(f"--answer_files {path}: model_id {model!r} is also {models[model]}'s; each file "
                                "must be another model")
            models.setdefault(model, path)
    if problems:
        shown = problems[:SHOWN] + ([f"... and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else [])
        raise SuiteError(f"--answer_files: {len(problems)} problem(s), nothing sent to the judge:\n  "
                         + "\n  ".join(shown))
    return sets


def read_answer_file(path: str) -> tuple[dict[str, dict], list[str]]:
    """(answers by ``key_of(question_id)``, problems with file:line) of one LLMZoo answers JSONL: each row needs
    ``question_id``, ``text`` (a string), ``answer_id`` and ``model_id``; an id may appear once."""
    try:
        raw = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return {}, [f"--answer_files {path}: cannot read it ({exc})"]
    answers, problems, first = {}, [], {}
    for n, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        qid = row.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            problems.append(f"{where}: no question_id (an integer or a string)")
            continue
        wrong = [f for f in ("answer_id", "model_id") if not isinstance(row.get(f), str) or not row[f]] + \
            (["text"] if not isinstance(row.get("text"), str) else [])
        if wrong:
            problems.append(f"{where}: no {' or '.join(wrong)} (a string)")
            continue
        if key_of(qid) in first:
            problems.append(f"{where}: duplicate question_id {qid!r} (first at line {first[key_of(qid)]})")
            continue
        first[key_of(qid)] = n
        answers[key_of(qid)] = {"answer_id": row["answer_id"], "model_id": row["model_id"], "text": row["text"]}
    if not answers and not problems:
        problems.append(f"--answer_files {path}: no answers in it")
    return answers, problems


def fingerprint(args: ReviewArgs, inputs: dict) -> str:
    """What determines the review folder: every flag that counts and ``inputs``, the hashes of the question and
    answer files and of the rule. Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


# -- the folder's life cycle -------------------------------------------------------------------------------


def mark_unfinished(out: Path) -> None:
    """Mark ``out`` as this stage's unfinished output (pipeline.json, complete: false) until every review is in:
    a crash leaves a folder the next run knows as its own (and resumes)."""
    meta = read_meta(out) if (out / META_FILE).is_file() else None
    if isinstance(meta, dict) and meta.get("stage") == STAGE and meta.get("complete") is False:
        return
    write_json(out / META_FILE, {"meta_version": META_VERSION, "stage": STAGE, "complete": False, "files": {},
                                 "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})


def finished(out: Path, plan: Plan, policy: UnparsedChecks) -> None:
    """An identical re-run of a finished review: print the stored report (and end as the run did)."""
    try:
        report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SuiteError(f"--output_dir {out}: its {REPORT_FILE} cannot be read ({exc}); pass --overwrite to "
                         "review again") from None
    print(f"{STAGE}: --output_dir {out} already holds this review (fingerprint {plan.fingerprint[:12]}); "
          "nothing sent", file=sys.stderr)
    emit(report)
    raise_outcome(report, policy)


def raise_outcome(report: dict, policy: UnparsedChecks) -> None:
    """End non-zero when requests failed, or too many verdicts (any, with --strict) could not be parsed."""
    problems = []
    failed, unparsed, total = report["failed"]["count"], report["unparsed"]["count"], report["questions"]
    if failed:
        problems.append(f"{failed} review request(s) failed after all retries (listed above); the metric is not "
                        "written; re-run the same command to ask again (reviews already in are kept)")
    if unparsed and policy.strict:
        problems.append(f"--strict: {unparsed} of {total} verdict(s) could not be parsed (kept in {REVIEW_FILE} "
                        "with their parse_error)")
    elif total and unparsed / total > policy.max_unparsed:
        problems.append(f"{unparsed} of {total} verdict(s) ({unparsed / total:.1%}) could not be parsed, more than "
                        f"--max_unparsed {policy.max_unparsed:.1%} (kept in {REVIEW_FILE} with their parse_error)")
    if problems:
        raise SuiteError("\n".join(problems))


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, and not at all when it already holds exactly that."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- the reviews -------------------------------------------------------------------------------------------


def review_key(judge_model: str, messages: list[dict], mode: str, max_tokens: int | None) -> str:
    """What identifies a review: the judge model and everything sent to it (not the endpoint's address: the same
    model moved to another host gives the same reviews)."""
    return sha256_json({"judge_model": judge_model, "messages": messages, "temperature": 0.0,
                        "max_tokens": max_tokens, "mode": mode})


@dataclass
class Item:
    """One question's review to be: the question, its answers in the assistants' order, the messages and key."""

    question: Any
    answers: list[dict]
    messages: list[dict]
    key: str
    review_id: int  # 1-based position in question order, as in LLMZoo's stored files


def review_items(args: ReviewArgs, plan: Plan) -> list[Item]:
    """One item per question, in ascending question order (LLMZoo's), answers in --answer_files order."""
    from utils.evaluation.llmzoo import review_messages

    max_tokens = args.request.max_tokens or None
    items = []
    for number, q in enumerate(plan.questions, 1):
        answers = [a[key_of(q.id)] for a in plan.answers]
        messages = review_messages(q.text, [a["text"] for a in answers], plan.rule)
        items.append(Item(q, answers, messages, review_key(args.judge.judge_model, messages, args.inputs.mode,
                                                           max_tokens), number))
    return items


def previous_reviews(path: Path, items: list[Item], overwrite: bool) -> tuple[dict[str, dict], bool]:
    """(reviews already in ``path`` asked exactly as ``items`` ask them, by question key; whether the file must
    be rewritten at the end). Reviews asked otherwise are refused, or with --overwrite dropped."""
    if not path.is_file():
        return {}, False
    try:
        records, bad_lines = read_jsonl(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"--output_dir: {path} cannot be read ({exc})") from None
    wanted = {key_of(item.question.id): item for item in items}
    done, stale, renumbered = {}, 0, False
    for record in records:
        qkey = key_of(record.get("question_id")) if isinstance(record, dict) else None
        if qkey in wanted and record.get("review_key") == wanted[qkey].key and qkey not in done:
            if record.get("review_id") != wanted[qkey].review_id:  # questions added or removed before it
                record = {"review_id": wanted[qkey].review_id, **{k: v for k, v in record.items() if k != "review_id"}}
                renumbered = True
            done[qkey] = record
        else:
            stale += 1
    if stale and not overwrite:
        raise SuiteError(f"--output_dir: {path} holds {stale} review(s) asked otherwise (another judge, rules, "
                         "question or answers); pass --overwrite to replace them (reviews asked the same way are "
                         "kept), or choose another folder")
    return done, bool(stale or bad_lines or renumbered)


def review(args: ReviewArgs, plan: Plan, out: Path, items: list[Item], done: dict[str, dict],
           rewrite: bool) -> dict:
    """Ask the judge for the reviews of ``items`` not ``done`` yet, appending each to review.jsonl as it
    arrives, then write the metric and the report (``rewrite``: review.jsonl must be rewritten even if nothing
    new comes, to drop reviews asked otherwise or a damaged line)."""
    from utils.evaluation.llmzoo import review_record
    from utils.judge import ChatRequest, JudgeClient

    io, judge = args.inputs, args.judge
    path = out / REVIEW_FILE
    todo = [item for item in items if key_of(item.question.id) not in done]
    print(f"{STAGE}: {len(items)} questions, {len(items) - len(todo)} already reviewed, {len(todo)} to ask "
          f"{judge.judge_model} at {judge.judge_base_url} ({io.dimension}, {io.mode} mode, "
          f"{len(plan.answers)} answers each)", file=sys.stderr)
    failures, new, stats = [], {}, {}
    if todo:
        by_key = {key_of(item.question.id): item for item in todo}
        requests = [ChatRequest(messages=tuple(item.messages), temperature=0.0,
                                max_tokens=args.request.max_tokens or None, key=key_of(item.question.id))
                    for item in todo]
        with JudgeClient(judge, judge.cache_dir or out / CACHE_DIR) as client, JsonlAppender(path) as appender:
            def on_result(result) -> None:
                item = by_key[result.request.key]
                q = item.question
                if result.text is None:
                    failures.append({"question_id": q.id, "where": f"{io.question_file}:{q.line}",
                                     "error": result.error})
                    print(f"{STAGE}: the review of question {q.id!r} failed: {result.error}", file=sys.stderr)
                    return
                question = {"question_id": q.id, "text": q.text, "category": q.category,
                            **({"lang": q.lang} if q.lang is not None else {})}
                record = review_record(question, item.answers, result.text, mode=io.mode,
                                       reviewer_id=judge.judge_model, review_id=item.review_id)
                record["review_key"] = item.key
                appender.append([record])
                new[key_of(q.id)] = record

            client.complete_many(requests, on_result=on_result, desc=STAGE)
            stats = client.stats()
    records = {**done, **new}
    ordered = [records[key_of(item.question.id)] for item in items if key_of(item.question.id) in records]
    if new or rewrite:
        write_jsonl(path, ordered)  # in question order, whatever order the reviews arrived in
    report = report_of(args, plan, ordered, failures, len(new), stats, path)
    files = [REVIEW_FILE]
    if not failures:
        files += write_metric(out, report)
    else:  # a metric of part of the questions would not say so: none, until a re-run has them all
        for name in (METRIC_FILE, ORDERING_FILE):
            (out / name).unlink(missing_ok=True)
    write_json(out / REPORT_FILE, report)
    if not failures:
        files.append(REPORT_FILE)
        write_meta(out, {"stage": STAGE, "fingerprint": plan.fingerprint, "args": args.flags(),
                         "inputs": plan.inputs}, {name: sha256_file(out / name) for name in files})
    print(f"{STAGE}: {len(ordered)} review(s) in {path} ({len(new)} new), {report['unparsed']['count']} unparsed, "
          f"{len(failures)} failed", file=sys.stderr)
    return report


def report_of(args: ReviewArgs, plan: Plan, records: list[dict], failures: list[dict], new: int, stats: dict,
              path: Path) -> dict:
    """The report: counts, every unparsed review with its reason and file:line, the failures, and (filled by
    ``write_metric``) LLMZoo's metric."""
    io = args.inputs
    unparsed = [{"question_id": r["question_id"], "where": f"{path}:{line}", "error": r.get("parse_error")}
                for line, r in enumerate(records, 1) if -1 in r[io.mode]]
    if unparsed:
        print(f"{STAGE}: {len(unparsed)} of {len(records)} verdict(s) could not be parsed (kept verbatim with their "
              "parse_error): " + "; ".join(f"question {u['question_id']!r}: {u['error']}" for u in unparsed[:5])
              + ("; ..." if len(unparsed) > 5 else ""), file=sys.stderr)
    total = len(plan.questions)
    return {
        "dimension": io.dimension, "mode": io.mode, "horizontal": args.metric.horiz,
        "judge": {"base_url": args.judge.judge_base_url, "model": args.judge.judge_model},
        "models": [a[key_of(plan.questions[0].id)]["model_id"] for a in plan.answers],
        "questions": total, "reviews": len(records), "new": new,
        "unparsed": {"count": len(unparsed), "fraction": len(unparsed) / total if total else 0.0,
                     "rows": unparsed[:LISTED]},
        "failed": {"count": len(failures), "rows": failures[:LISTED]},
        "metric": None, "ordering": None, "denominator": None, "skipped": None, "counted": None,
        "requests": stats,
        "inputs": plan.inputs,
    }


def write_metric(out: Path, report: dict) -> list[str]:
    """LLMZoo's metric.json and (order mode) ordering.txt of the reviews, as eval/llmzoo_metric.py writes them;
    the figures go into ``report`` too. Returns the names written."""
    from utils.evaluation.llmzoo import llmzoo_metric, review_set

    path = out / REVIEW_FILE
    records, _ = read_jsonl(path)
    reviews = review_set(list(enumerate(records, 1)), str(path), mode=report["mode"])
    result = llmzoo_metric(reviews, horizontal=report["horizontal"])
    write_text(out / METRIC_FILE, result.metric_json())
    names = [METRIC_FILE]
    ordering = result.ordering()
    if ordering is not None:
        write_text(out / ORDERING_FILE, result.ordering_txt())
        names.append(ORDERING_FILE)
    else:
        (out / ORDERING_FILE).unlink(missing_ok=True)
    report.update(metric=result.metric, ordering=[list(row) for row in ordering] if ordering is not None else None,
                  denominator=result.denominator, skipped=result.skipped, counted=result.counted)
    return names


if __name__ == "__main__":
    run(main)
