"""An LLM judge, MT-bench style: single-answer grading and pairwise comparison with position swap, against any
OpenAI-compatible endpoint (the suite's own serve.py included).

Modes (``--mode``):

* ``single``: the judge rates each model's answer to each question ``Rating: [[x]]`` on 1-10; the report gives
  each model's mean rating (overall and per category);
* ``pairwise``: each model against ``--baseline``, every pair judged twice, each answer once in position A
  (``[[A]]``, ``[[B]]``, ``[[C]]`` for a tie); a verdict counts only when both orders agree, otherwise the pair
  is a tie counted as ``inconsistent``; the report gives win / tie / loss / inconsistent per model;
* ``all_pairs``: the same for every two models.

A question with a reference answer (its ``reference`` field, or ``--reference_file``) is judged with the
reference-guided prompt; a multi-turn question (``turns: [...]``) on its whole conversation. The prompts are
ours, in ``templates/judge`` (``--prompts`` for your own; see its README).

Bad input is never silent: question and answer files with unreadable lines, missing or repeated ids, or a
question some model did not answer are refused with file:line before any request is sent. A judge output that
gives no verdict is kept verbatim in ``judgments.jsonl`` with its parse error, counted, and never scored.
If the unparsed share of the judgments (failed requests included) exceeds ``--max_unparsed``, everything is
written and the run exits non-zero; with ``--strict`` any unparsed or failed judgment does.

The output folder (``--output_dir``, required) holds ``judgments.jsonl`` (every judgment: question, models,
prompt, messages, the judge's raw output, what was read from it), appended as results arrive and rewritten in
plan order at the end; ``battles.jsonl`` (pairwise modes: ``{model_a, model_b, winner}``, what
``eval/rank.py --battles`` reads); ``report.json`` (also printed on stdout); ``pipeline.json``; and the judge
cache (``cache/`` unless ``--cache_dir``). A killed run resumes: the judgments already in the folder or in the
cache are not asked again. An identical re-run of a finished run is a no-op (a run where requests failed
retries only those).

Examples:
    python eval/judge.py --mode single --question_file q.jsonl --answer_files a.jsonl b.jsonl \\
        --judge_base_url http://127.0.0.1:8000/v1 --judge_model judge --output_dir runs/judge-single
    python eval/judge.py --mode pairwise --baseline gpt-3.5-turbo --question_file q.jsonl \\
        --answer_files gpt35.jsonl mine.jsonl --judge_base_url https://api.openai.com --judge_model gpt-4o \\
        --output_dir runs/judge-vs-gpt35
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.args import Group, StageArgs, unfingerprinted  # noqa: E402
from utils.artifacts import (META_FILE, META_VERSION, Lock, check_output_dir, claim_output_dir,  # noqa: E402
                             read_meta, sha256_file, sha256_json, write_json, write_meta)
from utils.cli import run  # noqa: E402
from utils.errors import SuiteError, UsageError  # noqa: E402
from utils.evaluation import judging  # noqa: E402
from utils.evaluation.stage import REPORT_FILE, UnparsedChecks, emit, file_record  # noqa: E402
from utils.judge import JudgeOptions  # noqa: E402
from utils.jsonl import JsonlAppender, read_jsonl, write_jsonl  # noqa: E402

STAGE = "judge"
REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "templates" / "judge"
JUDGMENTS, BATTLES, CACHE = "judgments.jsonl", "battles.jsonl", "cache"
#: The most unparsed judgments the report lists one by one (the counts are always whole).
LISTED = 100


@dataclass(frozen=True)
class Inputs(Group):
    """The questions, the models' answers, the references and the prompts."""

    question_file: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    answer_files: list[str] = unfingerprinted((), why="count as their content, in order (hashes among the inputs)")
    reference_file: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    prompts: str = unfingerprinted("", why="counts as its content (each prompt file's hash among the inputs)")

    def problems(self) -> list[str]:
        problems = []
        if not self.question_file:
            problems.append("--question_file is required")
        elif not Path(self.question_file).is_file():
            problems.append(f"--question_file {self.question_file}: no such file")
        if not self.answer_files:
            problems.append("--answer_files is required (one file per model)")
        problems += [f"--answer_files {p}: no such file" for p in self.answer_files if not Path(p).is_file()]
        if self.reference_file and not Path(self.reference_file).is_file():
            problems.append(f"--reference_file {self.reference_file}: no such file")
        if self.prompts and not Path(self.prompts).is_dir():
            problems.append(f"--prompts {self.prompts}: no such folder")
        return problems


@dataclass(frozen=True)
class Judging(Group):
    """What is asked of the judge."""

    mode: Literal["single", "pairwise", "all_pairs"] = "single"
    baseline: str = ""
    max_tokens: int = 1024

    def problems(self) -> list[str]:
        problems = []
        if self.mode not in judging.MODES:
            problems.append(f"--mode must be one of {', '.join(judging.MODES)}, got {self.mode!r}")
        if self.mode == "pairwise" and not self.baseline:
            problems.append("--mode pairwise needs --baseline MODEL_ID (the model_id every other model is judged "
                            "against)")
        if self.mode != "pairwise" and self.baseline:
            problems.append(f"--baseline is only for --mode pairwise (--mode is {self.mode})")
        if self.max_tokens < 0:
            problems.append(f"--max_tokens must be >= 0 (0: the server's default), got {self.max_tokens}")
        return problems


@dataclass(frozen=True)
class Folder(Group):
    """The run folder (required: every judge output is kept there)."""

    output_dir: str = unfingerprinted("", why="where the judgments are written, not what they say")
    overwrite: bool = unfingerprinted(False, why="a permission: it only allows what is otherwise refused")

    def problems(self) -> list[str]:
        return [] if self.output_dir else ["--output_dir is required (judgments.jsonl, report.json and the judge "
                                           "cache go there)"]


@dataclass(frozen=True)
class JudgeArgs(StageArgs):
    STAGE = STAGE

    inputs: Inputs
    judging: Judging
    judge: JudgeOptions
    checks: UnparsedChecks
    folder: Folder


Args = JudgeArgs


def main(
    *,
    mode: Literal["single", "pairwise", "all_pairs"] = "single",
    question_file: str = "",
    answer_files: list[str] = (),
    baseline: str = "",
    reference_file: str = "",
    prompts: str = "",
    max_tokens: int = 1024,
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
    """Judge models' answers with an LLM: single grading (1-10) or pairwise with position swap.

    Args:
        mode: single (rate each answer 1-10), pairwise (each model against --baseline) or all_pairs (every two
            models); pairs are judged in both orders.
        question_file: JSONL of {question_id, text | turns, category, reference?}; turns (a list) for a
            multi-turn question, judged on the whole conversation.
        answer_files: One JSONL per model: LLMZoo's {question_id, text, answer_id, model_id} or FastChat's
            {question_id, model_id, choices: [{turns: [...]}]}; each must answer every question.
        baseline: With --mode pairwise: the model_id the others are judged against.
        reference_file: Reference answers (an answer file) for reference-guided judging; they win over the
            questions' own reference field.
        prompts: Folder of judge prompts (single.json, single_ref.json, pairwise.json, pairwise_ref.json;
            default: the suite's templates/judge).
        max_tokens: Most tokens of one judge reply (0: not sent, the server's default).
        judge_base_url: The judge's OpenAI-compatible endpoint (http://host:port or http://host:port/v1).
        judge_model: The judge's model name, as the endpoint knows it.
        judge_api_key_env: Name of the environment variable holding the API key (unset: no key is sent).
        cache_dir: The judge cache (default OUTPUT_DIR/cache); may be shared by several runs.
        max_retries: Retries of a request after a 429, a 5xx, a timeout or a dropped connection.
        timeout: Seconds one request may take.
        concurrency: Most requests in flight at once.
        rpm: Most requests per minute (0: no limit).
        output_dir: The run folder: judgments.jsonl, battles.jsonl, report.json, pipeline.json, the cache. A
            killed run resumes there; an identical re-run of a finished one is a no-op.
        overwrite: Replace a different finished run in --output_dir.
        max_unparsed: Exit non-zero (after writing everything) when more than this share of the judgments gave
            no usable verdict or failed.
        strict: Exit non-zero (after writing everything) on any unparsed or failed judgment.
    """
    args = JudgeArgs.from_flags(dict(locals()))
    problems = args.problems()
    if problems:
        raise UsageError("\n".join(problems))
    out = Path(args.folder.output_dir)
    claim_output_dir(out, STAGE, args.folder.overwrite)  # a folder this stage may not write: refused before any work
    data = read_inputs(args)
    fp = fingerprint(args, data["record"])
    stored = finished_report(out, fp, args.folder.overwrite)
    if stored is not None:
        emit(stored)
        check(stored, args.checks)
        return
    with RunFolder(out, fp, args.folder.overwrite) as folder:
        report = judge_all(args, data, folder)
        folder.finish(args, data["record"], report)
    emit(report)
    check(report, args.checks)


def read_inputs(args: JudgeArgs) -> dict:
    """Every input read and checked (all problems at once, with file:line), nothing sent yet: the questions
    (with their references), the answer sets, the prompts, and the record of the inputs (files with hashes)."""
    io, mode = args.inputs, args.judging.mode
    questions = judging.read_question_file(io.question_file)
    answer_sets, problems = [], []
    for path in io.answer_files:
        try:
            answer_sets.append(judging.read_answer_file(path))
        except SuiteError as exc:
            problems.append(str(exc))
    if problems:
        raise SuiteError("\n".join(problems))
    judging.check_answers(questions, answer_sets)
    references = judging.read_answer_file(io.reference_file, "--reference_file") if io.reference_file else None
    questions = judging.with_references(questions, references)
    models = [a.model for a in answer_sets]
    if mode != "single" and len(models) < 2:
        raise UsageError(f"--mode {mode} compares models: --answer_files needs at least two files, got {len(models)}")
    if mode == "pairwise" and args.judging.baseline not in models:
        raise UsageError(f"--baseline {args.judging.baseline!r} is not among the models of --answer_files "
                         f"({', '.join(models)})")
    folder = Path(io.prompts) if io.prompts else PROMPTS
    prompts = judging.load_prompts(folder, "single" if mode == "single" else "pairwise", questions)
    record = {
        "questions": file_record(io.question_file),
        "answers": [{**file_record(a.path), "model": a.model} for a in answer_sets],
        "references": file_record(io.reference_file) if io.reference_file else None,
        "prompts": {p.name: {"path": str(Path(p.path).resolve()), "sha256": p.sha256} for p in prompts.values()},
    }
    return {"questions": questions, "answer_sets": answer_sets, "models": models, "prompts": prompts,
            "record": record}


def fingerprint(args: JudgeArgs, inputs: dict) -> str:
    """What determines the judgments: every flag that counts (mode, baseline, max_tokens, the judge's endpoint
    and model) and ``inputs`` (the files' and prompts' hashes). Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


def finished_report(out: Path, fp: str, overwrite: bool) -> dict | None:
    """The stored report when ``out`` holds this exact, finished run with no failed request (a no-op re-run),
    else None. A different finished run is refused without --overwrite."""
    if not check_output_dir(out, STAGE, fp, overwrite):
        return None
    try:
        report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SuiteError(f"--output_dir {out}: its {REPORT_FILE} cannot be read ({exc}); pass --overwrite to "
                         "judge again") from None
    if report.get("failed"):
        print(f"{STAGE}: --output_dir {out}: {report['failed']} request(s) failed last time; asking them again "
              "(the rest comes from the folder)", file=sys.stderr)
        return None
    print(f"{STAGE}: --output_dir {out} already holds these judgments (fingerprint {fp[:12]}); nothing to do",
          file=sys.stderr)
    return report


class RunFolder:
    """The run folder from its lock to its finished record: written in place, so that a killed run resumes.

    On entry: the folder (created if missing), its lock (a second run at the same time is refused), and the
    unfinished mark (pipeline.json with ``complete: false``), so that other stages refuse it until it is done.
    ``finish`` writes battles.jsonl, report.json and, last, pipeline.json with the hash of each. A run that
    fails before any judgment is written leaves no trace in a folder it created.
    """

    def __init__(self, out: Path, fingerprint: str, overwrite: bool):
        self.out, self.fp, self.overwrite = Path(out), fingerprint, overwrite
        self.lock, self.created = None, []

    def __enter__(self) -> "RunFolder":
        here = self.out.absolute()
        self.created = [p for p in [here, *here.parents] if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = Lock(self.out / ".lock", f"--output_dir {self.out}").__enter__()
            # Again under the lock: another run may have finished this folder since the first look.
            if claim_output_dir(self.out, STAGE, self.overwrite) == "complete":
                check_output_dir(self.out, STAGE, self.fp, self.overwrite)
            write_json(self.out / META_FILE, {
                "meta_version": META_VERSION, "stage": STAGE, "complete": False, "fingerprint": self.fp,
                "files": {}, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def finish(self, args: JudgeArgs, inputs: dict, report: dict) -> None:
        write_json(self.out / REPORT_FILE, report)
        names = [JUDGMENTS, *([BATTLES] if report["mode"] != "single" else []), REPORT_FILE]
        files = {name: sha256_file(self.out / name) for name in names}  # not the cache: other runs may share it
        write_meta(self.out, {"stage": STAGE, "fingerprint": self.fp, "args": args.flags(), "inputs": inputs},
                   files)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and not (self.out / JUDGMENTS).exists():
                meta = read_meta(self.out)
                if isinstance(meta, dict) and meta.get("stage") == STAGE and not meta.get("complete"):
                    (self.out / META_FILE).unlink(missing_ok=True)
        finally:
            if self.lock is not None:
                self.lock.__exit__(None, None, None)
                self.lock = None
            for folder in self.created:
                try:
                    folder.rmdir()  # only if nothing is left in it
                except OSError:
                    break


def earlier_judgments(path: Path) -> dict[tuple[str, str], dict]:
    """The judgments a killed or earlier run left in ``path``, by (key, request hash); failed ones are asked
    again, and a torn last line (a run killed mid-write) is ignored."""
    if not path.is_file():
        return {}
    try:
        records, _ = read_jsonl(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"--output_dir: {path} cannot be read ({exc}); move it away to judge again") from None
    return {(r["key"], r["request"]): r for r in records
            if isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("request"), str)
            and isinstance(r.get("text"), str)}


def judge_all(args: JudgeArgs, data: dict, folder: RunFolder) -> dict:
    """Ask the judge for every judgment not already in the folder, appending each to judgments.jsonl as it
    arrives; then rewrite judgments.jsonl in plan order, write battles.jsonl and return the report."""
    from utils.judge import ChatRequest, JudgeClient

    mode = args.judging.mode
    planned = judging.plan(mode, data["questions"], data["answer_sets"], data["prompts"],
                           args.judging.baseline or None)
    out = folder.out
    cache = Path(args.judge.cache_dir) if args.judge.cache_dir else out / CACHE
    with JudgeClient(args.judge, cache) as client:
        requests = [ChatRequest(messages=p.messages, temperature=0.0, max_tokens=args.judging.max_tokens or None,
                                key=p.key) for p in planned]
        hashes = [client.cache_key(r) for r in requests]
        earlier = earlier_judgments(out / JUDGMENTS)
        records = [None] * len(planned)
        for i, (p, h) in enumerate(zip(planned, hashes)):
            if (p.key, h) in earlier:
                records[i] = judging.reparse(earlier[p.key, h])
        reused = sum(r is not None for r in records)
        todo = [i for i, r in enumerate(records) if r is None]
        index = {planned[i].key: i for i in todo}
        print(f"{STAGE}: {len(planned)} judgment(s) of {len(data['questions'])} question(s); {reused} already in "
              f"{out / JUDGMENTS}, {len(todo)} to ask {args.judge.judge_model} at {args.judge.judge_base_url}",
              file=sys.stderr)
        with JsonlAppender(out / JUDGMENTS) as sink:
            def arrived(result) -> None:
                i = index[result.request.key]
                records[i] = judging.judgment_record(planned[i], hashes[i], result.text, result.error, result.usage)
                sink.append([records[i]])

            results = client.complete_many([requests[i] for i in todo], on_result=arrived, desc=STAGE)
            for i, result in zip(todo, results):  # a result the callback did not see is kept all the same
                if records[i] is None:
                    arrived(result)
        stats = client.stats()
    write_jsonl(out / JUDGMENTS, records)
    report = summarize(args, data, records, {"reused": reused, **stats})
    if mode != "single":
        pairs = judging.pair_results(records)
        write_jsonl(out / BATTLES, [{"model_a": a, "model_b": b, "winner": w}
                                    for a, b, w in judging.battles(pairs)])
    return report


def summarize(args: JudgeArgs, data: dict, records: list[dict], requests: dict) -> dict:
    """The report: per-model results, the unparsed and failed counts (each listed with its key and reason), the
    request counts, the judge and the inputs."""
    mode, models, questions = args.judging.mode, data["models"], data["questions"]
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "unparsed", "failed")}
    report = {
        "mode": mode,
        "baseline": args.judging.baseline or None,
        "judge": {"base_url": args.judge.judge_base_url, "model": args.judge.judge_model},
        "models": models,
        "questions": len(questions),
        "multi_turn_questions": sum(len(q.turns) > 1 for q in questions),
        "reference_questions": sum(q.reference is not None for q in questions),
        "judgments": len(records),
        **counts,
        "unparsed_fraction": (counts["unparsed"] + counts["failed"]) / len(records) if records else 0.0,
    }
    if mode == "single":
        report["results"] = judging.single_summary(records, models)
    else:
        pairs = judging.pair_results(records)
        summary = judging.pairwise_summary(pairs, models, args.judging.baseline or None)
        report["results"] = summary["models"]
        if "pairs" in summary:
            report["pairs"] = summary["pairs"]
        report["pairs_judged"] = len(pairs)
        report["inconsistent"] = sum(p["inconsistent"] for p in pairs)
        report["battles"] = len(judging.battles(pairs))
    bad = [r for r in records if r["status"] != "ok"]
    report["not_scored"] = [
        {"key": r["key"], "question_id": r["question_id"], "status": r["status"],
         "reason": r["parse_error"] if r["status"] == "unparsed" else r["error"]} for r in bad[:LISTED]]
    report["requests"] = requests
    report["inputs"] = data["record"]
    print_summary(report)
    return report


def print_summary(report: dict) -> None:
    """A table of the results on stderr (the payload, the report, is JSON on stdout)."""
    lines = []
    if report["mode"] == "single":
        lines.append(f"{'model':<32}{'mean rating':>12}{'rated':>8}{'unparsed':>10}{'failed':>8}")
        for model, r in report["results"].items():
            mean = "-" if r["mean_rating"] is None else f"{r['mean_rating']:.3f}"
            lines.append(f"{model:<32}{mean:>12}{r['rated']:>8}{r['unparsed']:>10}{r['failed']:>8}")
    else:
        against = f" (against {report['baseline']})" if report["baseline"] else ""
        lines.append(f"{'model' + against:<40}{'win':>6}{'tie':>6}{'loss':>6}{'inconsistent':>14}"
                     f"{'unparsed':>10}{'failed':>8}{'win rate':>10}")
        for model, r in report["results"].items():
            rate = "-" if r["win_rate_adjusted"] is None else f"{r['win_rate_adjusted']:.3f}"
            lines.append(f"{model:<40}{r['win']:>6}{r['tie']:>6}{r['loss']:>6}{r['inconsistent']:>14}"
                         f"{r['unparsed']:>10}{r['failed']:>8}{rate:>10}")
        lines.append("(tie includes the inconsistent pairs; win rate counts a tie as half a win)")
    req = report["requests"]
    lines.append(f"{report['judgments']} judgment(s): {report['ok']} parsed, {report['unparsed']} unparsed, "
                 f"{report['failed']} failed; requests sent {req.get('requests', 0)}, from the cache "
                 f"{req.get('cached', 0)}, from the folder {req.get('reused', 0)}")
    print("\n".join(f"{STAGE}: {line}" for line in lines), file=sys.stderr)


def check(report: dict, checks: UnparsedChecks) -> None:
    """Fail (after everything is written) when too many judgments gave no verdict, or any did under --strict.

    Raises:
        SuiteError: with the counts and the threshold.
    """
    bad = report["unparsed"] + report["failed"]
    what = f"{report['unparsed']} unparsed and {report['failed']} failed of {report['judgments']} judgment(s)"
    if checks.strict and bad:
        raise SuiteError(f"--strict: {what}; everything is written (see not_scored in the report)")
    if report["unparsed_fraction"] > checks.max_unparsed:
        raise SuiteError(f"{what} ({report['unparsed_fraction']:.1%}) exceeds --max_unparsed "
                         f"{checks.max_unparsed:g}; everything is written (see not_scored in the report)")
    if bad:
        print(f"{STAGE}: {what} ({report['unparsed_fraction']:.1%}), within --max_unparsed "
              f"{checks.max_unparsed:g}; they are kept in {JUDGMENTS} and not scored", file=sys.stderr)


if __name__ == "__main__":
    run(main)
