"""ROUGE-1/2/L and BLEU-4 of generated answers against references, exactly as ChatGLM-6B's P-tuning scores them.

ChatGLM-6B's ``ptuning/main.py`` recipe (``utils.evaluation.text_metrics``): jieba words for ROUGE
(rouge_chinese's F1), characters for BLEU-4 (nltk, smoothing method 3), per-pair scores times 100 rounded to 4
places, then averaged. ``--lang en`` cuts on whitespace instead, for ROUGE and BLEU alike. A pair with an empty
side (nothing but whitespace), on which ChatGLM's script crashes, scores 0 on all four and is listed.

Inputs: ChatGLM's ``generated_predictions.txt`` (JSONL ``{"labels", "predict"}``) on its own; or generate.py's
answers (``--pred_field response``) with the references in the same rows (its output keeps every input field,
so ``--ref_field output`` for alpaca rows) or in another file (``--references``), joined by id. Malformed rows
are skipped and counted with their lines, or stop the run under ``--strict``.

The report (JSON, on stdout): the four metrics, the number of examples, the empty ones, the malformed rows,
the language, the input files (path, size, sha256) and the versions of jieba, rouge-chinese and nltk. With
``--output_dir`` it is also written there with ``scores.jsonl`` (each example's scores), and an identical
re-run is a no-op.

Examples:
    python eval/text_metrics.py --predictions runs/ptuning/generated_predictions.txt
    python eval/text_metrics.py --predictions answers.jsonl --pred_field response \\
        --references dev.json --ref_field output --output_dir runs/lora-rouge
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.args import Group, StageArgs, unfingerprinted  # noqa: E402
from utils.artifacts import library_versions, sha256_json  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import UsageError  # noqa: E402
from utils.evaluation.stage import Destination, EvalOutput, emit, file_record  # noqa: E402
from utils.evaluation.text_metrics import LANGS, LIBRARIES  # noqa: E402
from utils.jsonl import line_refs  # noqa: E402

STAGE = "text_metrics"
#: The most file:line entries a report lists per kind (the counts are always whole; scores.jsonl has every row).
LISTED = 100


@dataclass(frozen=True)
class Inputs(Group):
    """The files, the fields read from their rows and the bad-row rule."""

    predictions: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    references: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    pred_field: str = "predict"
    ref_field: str = "labels"
    id_field: str = ""
    strict: bool = unfingerprinted(False, why="decides whether a bad row stops the run; the rows used are hashed")

    def problems(self) -> list[str]:
        problems = []
        if not self.predictions:
            problems.append("--predictions is required")
        elif not Path(self.predictions).is_file():
            problems.append(f"--predictions {self.predictions}: no such file")
        if self.references and not Path(self.references).is_file():
            problems.append(f"--references {self.references}: no such file")
        problems += [f"--{name} must not be empty" for name in ("pred_field", "ref_field") if not getattr(self, name)]
        if not self.references and self.pred_field and self.pred_field == self.ref_field:
            problems.append(f"--pred_field and --ref_field are both {self.pred_field!r}: each prediction would be "
                            "scored against itself (pass --references for a separate file)")
        return problems


@dataclass(frozen=True)
class Metric(Group):
    """How texts are cut into words."""

    lang: str = "zh"

    def problems(self) -> list[str]:
        return [] if self.lang in LANGS else [f"--lang must be one of {', '.join(LANGS)}, got {self.lang!r}"]


@dataclass(frozen=True)
class TextMetricsArgs(StageArgs):
    STAGE = STAGE

    inputs: Inputs
    metric: Metric
    destination: Destination


Args = TextMetricsArgs


def main(
    *,
    predictions: str = "",
    references: str = "",
    pred_field: str = "predict",
    ref_field: str = "labels",
    id_field: str = "",
    lang: str = "zh",
    strict: bool = False,
    output_dir: str = "",
    overwrite: bool = False,
) -> None:
    """ROUGE-1/2/L and BLEU-4 of predictions against references (ChatGLM-6B's recipe).

    Args:
        predictions: JSONL or JSON array of predictions: ChatGLM's generated_predictions.txt, or generate.py's
            --output_file.
        references: JSONL or JSON array of references, joined with the predictions by id (default: the
            references are in the prediction rows).
        pred_field: Field of a prediction row that holds the prediction (generate.py's: response).
        ref_field: Field that holds the reference (in the references' rows, or in the prediction rows).
        id_field: Field that names a row, in both files (default: id, question_id or conversation_id, else the
            row's number, as generate.py names rows).
        lang: zh (jieba words for ROUGE, characters for BLEU-4: ChatGLM's recipe) or en (whitespace words for
            both).
        strict: Stop at the first malformed row instead of skipping it (skipped rows are counted).
        output_dir: Also write the report (report.json, scores.jsonl, pipeline.json) into this folder; an
            identical re-run is then a no-op.
        overwrite: Replace a different report in --output_dir.
    """
    args = TextMetricsArgs.from_flags(dict(locals()))
    problems = args.problems()
    if problems:
        raise UsageError("\n".join(problems))
    out = EvalOutput(args.destination, STAGE)  # a folder this stage may not write is refused before any work
    inputs = {"predictions": file_record(args.inputs.predictions),
              "references": file_record(args.inputs.references) if args.inputs.references else None,
              "libraries": library_versions(*LIBRARIES)}
    fp = fingerprint(args, {"predictions": inputs["predictions"]["sha256"],
                            "references": inputs["references"] and inputs["references"]["sha256"],
                            "libraries": inputs["libraries"]})
    stored = out.finished(fp)
    if stored is not None:
        return emit(stored)
    report, scores = evaluate(args, inputs)
    out.write(fp, report, {"scores.jsonl": scores}, args=args.flags(), inputs=inputs)
    emit(report)


def evaluate(args: TextMetricsArgs, inputs: dict) -> tuple[dict, list[dict]]:
    """(the report, one score row per example), with what was skipped said on stderr."""
    from utils.evaluation.text_metrics import (empty_side, join_by_id, mean_scores, pairs_of_rows,
                                               read_texts_by_row, score_pair, zero_scores)

    io, lang = args.inputs, args.metric.lang
    if io.references:
        preds = read_texts_by_row(io.predictions, [io.pred_field], io.id_field, io.strict, "--predictions")
        refs = read_texts_by_row(io.references, [io.ref_field], io.id_field, io.strict, "--references")
        pairs, orphans = join_by_id(preds, refs, io.pred_field, io.ref_field, io.strict)
        files = [preds, refs]
    else:
        preds = read_texts_by_row(io.predictions, [io.pred_field, io.ref_field], io.id_field, io.strict,
                                  "--predictions")
        pairs, orphans, refs, files = pairs_of_rows(preds, io.pred_field, io.ref_field), [], None, [preds]
    for rows in files:
        for reason, lines in rows.bad.items():
            print(f"{STAGE}: skipped {len(lines)} row(s), {reason}: {line_refs(rows.path, lines)}", file=sys.stderr)
    if orphans:
        print(f"{STAGE}: {len(orphans)} reference(s) have no prediction: {line_refs(refs.path, orphans)}",
              file=sys.stderr)

    table, empty_rows = [], []
    for pair in pairs:
        found = score_pair(pair.prediction, pair.reference, lang)
        row = {"id": pair.id, "line": pair.line, **(found or zero_scores()), "empty": found is None}
        if pair.reference_line is not None:
            row["reference_line"] = pair.reference_line
        table.append(row)
        if found is None:
            empty_rows.append({"id": pair.id, "where": preds.where(pair.line),
                               **({"reference_where": refs.where(pair.reference_line)} if refs else {}),
                               "empty": empty_side(pair.prediction, pair.reference, lang)})
    if empty_rows:
        print(f"{STAGE}: {len(empty_rows)} example(s) with an empty prediction or reference score 0: "
              f"{', '.join(e['where'] for e in empty_rows[:10])}{', ...' if len(empty_rows) > 10 else ''}",
              file=sys.stderr)
    means = mean_scores(table)
    report = {
        **means,
        "examples": len(table),
        "empty": len(empty_rows),
        "empty_rows": empty_rows[:LISTED],
        "malformed": {rows.flag[2:]: {reason: {"count": len(lines), "rows": [rows.where(n) for n in lines[:LISTED]]}
                                      for reason, lines in rows.bad.items()} for rows in files},
        "skipped": sum(len(lines) for rows in files for lines in rows.bad.values()),
        "references_without_prediction": None if refs is None else {
            "count": len(orphans), "rows": [refs.where(n) for n in orphans[:LISTED]]},
        "lang": lang,
        "fields": {"prediction": io.pred_field, "reference": io.ref_field, "id": io.id_field or None},
        "predictions": inputs["predictions"],
        "references": inputs["references"],
        "libraries": inputs["libraries"],
    }
    print(f"{STAGE}: " + ", ".join(f"{m} {v:.4f}" for m, v in means.items()) + f" over {len(table)} examples",
          file=sys.stderr)
    return report, table


def fingerprint(args: TextMetricsArgs, inputs: dict) -> str:
    """What determines the report: every flag that counts and ``inputs``, the input files' hashes and the
    libraries' versions. Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


if __name__ == "__main__":
    run(main)
