"""LLMZoo's metric and ranking of a review file, byte for byte: its compute_metric_all.py + summary_ordering.py.

Reads a ``review.jsonl`` in LLMZoo's format (theirs, or eval/review.py's) and writes ``metric.json`` and, in
order mode, ``ordering.txt`` exactly as LLMZoo's two scripts would (``utils.evaluation.llmzoo``): the stored
files of LLMZoo's published review sets, horizontal or not, English or Chinese, come out identical. The
verdicts used are the stored ``order`` / ``score`` fields, from which LLMZoo computed its figures;
``--reparse`` reads the judge's ``text`` again instead.

LLMZoo's quirks are kept, and what they hide is reported: reviews whose verdict could not be read (-1) add
nothing while the denominator stays the number of questions outside ``coding`` / ``math``, so the report
gives the unread count and their file:line beside it; the first model is the reference (written as
``gpt3.5`` and ``turbo``) unless ``--horiz``.

Without ``--question_file`` the questions are the review file's own (enough to reproduce LLMZoo, whose roleplay
question file is not public); with it, every question needs a review.

The report (JSON, on stdout): the metric, the ordering rows, the counts (questions, skipped, denominator,
unparsed with reasons, re-parse changes) and the input files' hashes. With ``--output_dir`` the folder holds
``metric.json``, ``ordering.txt``, ``report.json`` and ``pipeline.json``; an identical re-run is a no-op.

Examples:
    python eval/llmzoo_metric.py --review_file reviews/en/general/review.jsonl --output_dir runs/zoo/general
    python eval/llmzoo_metric.py --review_file review.jsonl --output_dir out --horiz=True --reparse
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.args import Group, StageArgs, unfingerprinted  # noqa: E402
from utils.artifacts import sha256_json, write_json  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import UsageError  # noqa: E402
from utils.evaluation.llmzoo import MODES  # noqa: E402
from utils.evaluation.stage import REPORT_FILE, Destination, EvalOutput, emit, file_record  # noqa: E402

STAGE = "llmzoo_metric"
METRIC_FILE = "metric.json"
ORDERING_FILE = "ordering.txt"
#: The most unparsed / changed reviews a report lists one by one (the counts are always whole).
LISTED = 100


@dataclass(frozen=True)
class Inputs(Group):
    """The review file and, optionally, the question set."""

    review_file: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    question_file: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")

    def problems(self) -> list[str]:
        problems = []
        if not self.review_file:
            problems.append("--review_file is required")
        elif not Path(self.review_file).is_file():
            problems.append(f"--review_file {self.review_file}: no such file")
        if self.question_file and not Path(self.question_file).is_file():
            problems.append(f"--question_file {self.question_file}: no such file")
        return problems


@dataclass(frozen=True)
class Metric(Group):
    """Which verdicts, read how, and whether the first model is the reference."""

    mode: str = "order"
    horiz: bool = False
    reparse: bool = False

    def problems(self) -> list[str]:
        return [] if self.mode in MODES else [f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}"]


@dataclass(frozen=True)
class LLMZooMetricArgs(StageArgs):
    STAGE = STAGE

    inputs: Inputs
    metric: Metric
    destination: Destination


Args = LLMZooMetricArgs


def main(
    *,
    review_file: str = "",
    output_dir: str = "",
    horiz: bool = False,
    mode: str = "order",
    question_file: str = "",
    reparse: bool = False,
    overwrite: bool = False,
) -> None:
    """LLMZoo's metric.json and ordering.txt of a review file, byte for byte, with the unparsed reviews counted.

    Args:
        review_file: review.jsonl in LLMZoo's format (LLMZoo's own, or eval/review.py's).
        output_dir: Write metric.json, ordering.txt (order mode), report.json and pipeline.json here; an
            identical re-run is then a no-op (the report is printed either way).
        horiz: Horizontal mode (LLMZoo's --horiz): every model side by side, {order, score} each. Default: the
            first model is the reference, written as gpt3.5 / turbo, and the others are compared with it.
        mode: order (the judge ranked the answers) or score (it scored them).
        question_file: Questions JSONL whose ids are the question set (default: the review file's own ids);
            each needs a review.
        reparse: Parse the judge's text again instead of using the stored order / score field (which
            LLMZoo's own figures were computed from).
        overwrite: Replace a different result in --output_dir, or write into a folder this suite did not
            write (its other files are kept).
    """
    args = LLMZooMetricArgs.from_flags(dict(locals()))
    problems = args.problems()
    if problems:
        raise UsageError("\n".join(problems))
    out = EvalOutput(args.destination, STAGE)  # a folder this stage may not write is refused before any work
    inputs = {"review_file": file_record(args.inputs.review_file),
              "question_file": file_record(args.inputs.question_file) if args.inputs.question_file else None}
    fp = fingerprint(args, {"review_file": inputs["review_file"]["sha256"],
                            "question_file": inputs["question_file"] and inputs["question_file"]["sha256"]})
    stored = out.finished(fp)
    if stored is not None:
        return emit(stored)
    report, files = evaluate(args, inputs)
    if out.out is not None:
        # EvalOutput.write knows report.json and JSONL tables; LLMZoo's two files are text, written as is.
        with out.out.produce(fp, args=args.flags(), inputs=inputs) as st:
            for name, text in files.items():
                with open(st.dir / name, "w", encoding="utf-8", newline="") as f:
                    f.write(text)
            write_json(st.dir / REPORT_FILE, report)
        print(f"{STAGE}: wrote {out.out.path}", file=sys.stderr)
    emit(report)


def evaluate(args: LLMZooMetricArgs, inputs: dict) -> tuple[dict, dict[str, str]]:
    """(the report, {file name: text} of LLMZoo's files), with the unparsed reviews said on stderr."""
    from utils.evaluation.llmzoo import llmzoo_metric, read_question_ids, read_review_file

    io, m = args.inputs, args.metric
    reviews = read_review_file(io.review_file, mode=m.mode, reparse=m.reparse)
    questions = read_question_ids(io.question_file) if io.question_file else None
    result = llmzoo_metric(reviews, horizontal=m.horiz, question_ids=questions)
    files = {METRIC_FILE: result.metric_json()}
    ordering = result.ordering()
    if ordering is not None:
        files[ORDERING_FILE] = result.ordering_txt()
    unparsed = [{"question_id": q, "where": reviews.where(q), "error": reviews.errors.get(q)}
                for q in result.unparsed]
    if unparsed:
        print(f"{STAGE}: {len(unparsed)} of {result.questions} review(s) have no {m.mode} (-1) and add nothing, "
              f"while the denominator stays {result.denominator} (LLMZoo's rule): "
              + ", ".join(u["where"] for u in unparsed[:10]) + (", ..." if len(unparsed) > 10 else ""),
              file=sys.stderr)
    if reviews.changed:
        print(f"{STAGE}: --reparse: {len(reviews.changed)} verdict(s) differ from the stored {m.mode} field: "
              + ", ".join(reviews.where(q) for q in reviews.changed[:10])
              + (", ..." if len(reviews.changed) > 10 else ""), file=sys.stderr)
    if result.outside_questions:
        print(f"{STAGE}: {result.outside_questions} review(s) are of questions outside --question_file and are "
              "not used", file=sys.stderr)
    report = {
        "metric": result.metric,
        "ordering": [list(row) for row in ordering] if ordering is not None else None,
        "mode": m.mode,
        "horizontal": m.horiz,
        "reference": result.reference,
        "models": result.models,
        "questions": result.questions,
        "skipped": sum(result.skipped.values()),
        "skipped_by_category": result.skipped,
        "denominator": result.denominator,
        "counted": result.counted,
        "unparsed": {"count": len(unparsed), "rows": unparsed[:LISTED]},
        "reparsed": m.reparse,
        "reparse_changed": {"count": len(reviews.changed),
                            "rows": [reviews.where(q) for q in reviews.changed[:LISTED]]} if m.reparse else None,
        "reviews_outside_questions": result.outside_questions,
        "review_file": inputs["review_file"],
        "question_file": inputs["question_file"],
    }
    print(f"{STAGE}: {result.counted} of {result.questions} review(s) counted, {report['skipped']} skipped "
          f"(coding / math), {len(unparsed)} unparsed; denominator {result.denominator}", file=sys.stderr)
    return report, files


def fingerprint(args: LLMZooMetricArgs, inputs: dict) -> str:
    """What determines the result: every flag that counts and ``inputs``, the input files' hashes. Pure:
    nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


if __name__ == "__main__":
    run(main)
