"""Multiple-choice log-likelihood benchmarks (MMLU / C-Eval style) on any artifact, on data you give.

Reads MMLU's per-subject CSV folder (headerless ``question,A,B,C,D,answer``; ``{subject}_dev.csv`` and
``{subject}_test.csv``), C-Eval's (with an ``id,question,A,B,C,D,answer[,explanation]`` header), or a JSONL file
of ``{subject, question, choices, answer}`` rows (2 to 10 choices; ``--dev_file`` for the shots). Nothing is
downloaded: no benchmark data ships with the suite.

Each question is asked with the first ``--k_shot`` dev rows of its subject as examples (the oldest dropped first
while the prompt does not fit the context), in Hendrycks' English prompt or C-Eval's Chinese one, optionally
inside the artifact's chat template (``--chat_template``; the template is always recorded, since scores move with
it). ``acc`` compares the log-likelihood of each answer letter; ``acc_norm`` that of each choice's text divided
by its length in characters (lm-eval's definitions, with lm-eval's token split, so the figures compare).

The report (JSON, on stdout): acc / acc_norm per subject, their macro and micro averages, counts (questions,
malformed rows skipped, prompts too long). With ``--output_dir`` it is also written there with
``predictions.jsonl`` (every question's per-choice log-likelihoods and picks, to audit a result), and an identical
re-run is a no-op.

Examples:
    python eval/multiple_choice.py --base_model MODEL --data_dir data/mmlu --k_shot 5 --output_dir runs/mmlu
    python eval/multiple_choice.py --lora_weights runs/lora --data_dir data/ceval --split val --lang zh
    python eval/multiple_choice.py --lora_weights runs/lora --data_file my_questions.jsonl --dev_file shots.jsonl
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.args import Group, StageArgs, unfingerprinted  # noqa: E402
from utils.artifacts import sha256_json  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import SuiteError, UsageError  # noqa: E402
from utils.evaluation.stage import Destination, EvalOutput, artifact_record, emit, file_record  # noqa: E402
from utils.inference.loading import template_problems  # noqa: E402
from utils.inference.options import ModelLoading, plan_loading, render_prompt  # noqa: E402

STAGE = "multiple_choice"


@dataclass(frozen=True)
class Benchmark(Group):
    """The questions and how they are asked."""

    data_dir: str = unfingerprinted("", why="counts as its content (every file read is hashed among the inputs)")
    data_file: str = unfingerprinted("", why="counts as its content (hashed among the inputs)")
    dev_file: str = unfingerprinted("", why="counts as its content (hashed among the inputs)")
    split: Literal["dev", "val", "test"] = "test"
    subjects: list[str] = ()
    k_shot: int = 5
    lang: Literal["auto", "en", "zh"] = "auto"
    subject_names: str = unfingerprinted("", why="counts as its content (the names are among the inputs)")
    strict: bool = unfingerprinted(False, why="decides whether a bad row stops the run; the rows used are hashed")

    def problems(self) -> list[str]:
        problems = []
        if self.k_shot < 0:
            problems.append(f"--k_shot must be >= 0, got {self.k_shot}")
        for flag, value, kind in (("--data_dir", self.data_dir, "dir"), ("--data_file", self.data_file, "file"),
                                  ("--dev_file", self.dev_file, "file"), ("--subject_names", self.subject_names, "file")):
            if value and not (Path(value).is_dir() if kind == "dir" else Path(value).is_file()):
                problems.append(f"{flag} {value}: no such {'folder' if kind == 'dir' else 'file'}")
        if bool(self.data_dir) == bool(self.data_file):
            problems.append("give one of --data_dir (MMLU / C-Eval CSV folder) or --data_file (JSONL)"
                            + (", not both" if self.data_dir else ""))
        if self.dev_file and not self.data_file:
            problems.append("--dev_file goes with --data_file (with --data_dir the *_dev.csv files are the shots)")
        return problems


@dataclass(frozen=True)
class ChatTemplate(Group):
    """Whether the prompts go inside a chat template, and which (scores move with it: always recorded)."""

    chat_template: bool = False
    prompt_template: str = ""
    system: str | None = None

    def problems(self) -> list[str]:
        problems = template_problems(self.prompt_template)
        if (self.prompt_template or self.system is not None) and not self.chat_template:
            problems.append("--prompt_template and --system go with --chat_template (the benchmark prompts are "
                            "otherwise sent as they are)")
        return problems


@dataclass(frozen=True)
class Scoring(Group):
    """How the scoring runs (none of it changes a figure)."""

    batch_size: int = unfingerprinted(8, why="questions scored together: the picks do not depend on it")
    progress: bool = unfingerprinted(True, why="how progress is shown")

    def problems(self) -> list[str]:
        return [] if self.batch_size >= 1 else [f"--batch_size must be >= 1, got {self.batch_size}"]


@dataclass(frozen=True)
class MultipleChoiceArgs(StageArgs):
    STAGE = STAGE

    loading: ModelLoading
    template: ChatTemplate
    benchmark: Benchmark
    scoring: Scoring
    destination: Destination


Args = MultipleChoiceArgs


def main(
    base_model: str = "",
    lora_weights: str = "",
    *,
    data_dir: str = "",
    data_file: str = "",
    dev_file: str = "",
    split: Literal["dev", "val", "test"] = "test",
    subjects: list[str] = (),
    k_shot: int = 5,
    lang: Literal["auto", "en", "zh"] = "auto",
    subject_names: str = "",
    chat_template: bool = False,
    prompt_template: str = "",
    system: str | None = None,
    batch_size: int = 8,
    output_dir: str = "",
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    load_8bit: bool = False,
    load_4bit: bool = False,
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    device: str = "auto",
    device_map: Literal["auto", "balanced", "sequential"] | None = None,
    max_memory: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    allow_base_mismatch: bool = False,
) -> None:
    """Score MMLU / C-Eval style multiple-choice questions by log-likelihood.

    Args:
        base_model: Local model folder, or a finetune.py output folder (its base and adapter are used).
        lora_weights: An adapter folder (LoRA, prefix, p-tuning, prompt tuning) or a finetune.py output folder;
            its base model is read from its metadata unless --base_model is given.
        data_dir: Folder of MMLU CSV files ({subject}_dev.csv, {subject}_test.csv; flat or in dev/ test/ val/)
            or of C-Eval's (with a header row).
        data_file: JSONL (or JSON array) of {subject, question, choices, answer} rows; answer a letter or a
            0-based index.
        dev_file: With --data_file: the few-shot rows, same format.
        split: With --data_dir: which *_{split}.csv files are scored (C-Eval publishes answers for dev and val only).
        subjects: Score only these subjects (default: all).
        k_shot: Examples per prompt: the first k dev rows of the question's subject (fewer when the prompt would
            not fit the context: the oldest go first).
        lang: The prompt: en (Hendrycks' MMLU prompt), zh (C-Eval's), or auto (zh for C-Eval's CSV, else en).
        subject_names: JSON file mapping a subject to the name the prompt shows (a string, or C-Eval's
            subject_mapping.json lists [English, Chinese, category]); default: the subject with spaces.
        chat_template: Put each prompt in the artifact's template (or --prompt_template) as the user's turn.
        prompt_template: With --chat_template: the template name or JSON path (default: the artifact's).
        system: With --chat_template: the system message (default: the template's).
        batch_size: Questions per forward pass (the picks do not depend on it).
        output_dir: Also write the report (report.json, predictions.jsonl, pipeline.json) into this folder; an
            identical re-run is then a no-op.
        overwrite: Replace a different report in --output_dir.
        strict: Stop at the first malformed row instead of skipping it (skipped rows are counted).
        progress: Show a progress bar on stderr.
        load_8bit: Load the base model in 8-bit (bitsandbytes).
        load_4bit: Load the base model in 4-bit NF4 (bitsandbytes).
        dtype: auto (fp32 on CPU, bf16 or fp16 on GPUs), fp32, bf16 or fp16 (not on CPU).
        device: auto, cpu, cuda, cuda:N or mps.
        device_map: Spread the model over all GPUs by layer: auto / balanced or sequential.
        max_memory: Memory per device for --device_map, e.g. 0=20GiB,1=20GiB,cpu=64GiB.
        trust_remote_code: Allow custom model code from the model folder to run.
        allow_pickle_weights: Accept pytorch_model.bin / adapter_model.bin (loaded with weights_only=True).
        allow_base_mismatch: Apply an adapter to a base whose fingerprint differs from the one it was trained on.
    """
    args = MultipleChoiceArgs.from_flags(dict(locals()))
    problems = args.problems()
    if problems:
        raise UsageError("\n".join(problems))
    out = EvalOutput(args.destination, STAGE)  # a folder this stage may not write is refused before any work
    bench = args.benchmark
    questions, names = read_benchmark(bench)
    lang = bench.lang if bench.lang != "auto" else ("zh" if questions.format == "ceval" else "en")
    chat = args.template
    plan = plan_loading(args.loading, chat, raw=not chat.chat_template, stage=STAGE)
    records = {"model": artifact_record(plan), "data": [file_record(f) for f in questions.files]}
    fp = fingerprint(args, {"model": records["model"]["fingerprint"],
                            "data": sorted(d["sha256"] for d in records["data"]), "names": names})
    stored = out.finished(fp)
    if stored is not None:
        return emit(stored)

    from utils.evaluation.choice_scoring import accuracy, prompt_questions, score_prompted
    from utils.evaluation.perplexity import context_length
    from utils.evaluation.scoring import Scorer
    from utils.inference.loading import load_model

    loaded = load_model(plan)
    render = chat_renderer(loaded.template, chat.system) if chat.chat_template else None

    started = time.perf_counter()
    prompted, too_long = prompt_questions(loaded.tokenizer, questions, bench.k_shot, lang,
                                          context_length(loaded.model), names, render)
    if not prompted:
        raise SuiteError(f"no question fits the model's context of {context_length(loaded.model)} tokens, even "
                         f"with no example ({len(too_long)} too long)")
    if too_long:
        print(f"{STAGE}: skipped {len(too_long)} question(s) longer than the context even with no example "
              f"(first: {too_long[0].source})", file=sys.stderr)
    predictions = score_prompted(Scorer(loaded.model), prompted, args.scoring.batch_size, args.scoring.progress)
    took = time.perf_counter() - started
    report = {**accuracy(predictions),
              "k_shot": bench.k_shot, "shots_cut": sum(1 for p in prompted if p.shots < p.offered),
              "too_long": len(too_long), "too_long_rows": [q.source for q in too_long[:100]],
              "malformed": {k: len(v) for k, v in questions.bad.items()},
              "malformed_rows": {k: v[:100] for k, v in questions.bad.items()},
              "format": questions.format, "split": bench.split if questions.format != "jsonl" else None,
              "lang": lang, "chat_template": chat.chat_template,
              "template": getattr(loaded.template, "name", None) if chat.chat_template else None,
              "system": chat.system, "dtype": loaded.info.get("dtype"), **records,
              "seconds": round(took, 3), "questions_per_second": round(len(predictions) / max(took, 1e-9), 2)}
    print(f"{STAGE}: acc {report['acc']:.4f}, acc_norm {report['acc_norm']:.4f} over {report['questions']} "
          f"questions in {len(report['subjects'])} subject(s) ({took:.1f}s)", file=sys.stderr)
    out.write(fp, report, {"predictions.jsonl": predictions}, args=args.flags(), inputs={**records, "names": names})
    emit(report)


def chat_renderer(template, system: str | None):
    """The benchmark prompt as the user's turn of ``template``: prompt -> (text, add_special_tokens)."""
    from utils.data.templates import Message

    def render(prompt: str) -> tuple[str, bool]:
        return render_prompt(template, ([Message("system", system)] if system else []) + [Message("user", prompt)])

    return render


def read_benchmark(bench: Benchmark):
    """(questions, subject -> display name), malformed rows counted on stderr."""
    from utils.evaluation.choice_data import read_questions

    questions = read_questions(data_dir=bench.data_dir, data_file=bench.data_file, dev_file=bench.dev_file,
                               split=bench.split, subjects=bench.subjects, strict=bench.strict)
    for reason, rows in questions.bad.items():
        print(f"{STAGE}: skipped {len(rows)} row(s), {reason}: {', '.join(rows[:5])}"
              + (", ..." if len(rows) > 5 else ""), file=sys.stderr)
    return questions, subject_names(bench.subject_names, "zh" if bench.lang == "zh" or (
        bench.lang == "auto" and questions.format == "ceval") else "en")


def subject_names(path: str, lang: str) -> dict[str, str]:
    """--subject_names: subject -> the name shown in the prompt (C-Eval's [English, Chinese, category] lists
    give the name of the prompt's language)."""
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SuiteError(f"--subject_names {path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"--subject_names {path}: expected a JSON object mapping subjects to names")
    names = {}
    for subject, value in raw.items():
        if isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) for v in value[:2]):
            value = value[1] if lang == "zh" else value[0]
        if not isinstance(value, str):
            raise SuiteError(f"--subject_names {path}: the name of {subject!r} is not a string (or an "
                             "[English, Chinese, ...] list)")
        names[subject] = value
    return names


def fingerprint(args: MultipleChoiceArgs, inputs: dict) -> str:
    """What determines the report: every flag that counts and ``inputs``, the hashes of the model and the data
    files and the subjects' names. Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


if __name__ == "__main__":
    run(main)
