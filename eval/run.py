"""One evaluation run from one command, made for cron: answers, reviews and judgments, metrics and rankings.

``eval/run.py`` chains the eval scripts, each called in this process through its own ``main`` (so each keeps its
own checks, resume and no-op rules), into one folder per run, ``OUTPUT_DIR/RUN_NAME``:

1. answers (``eval/answer.py``), for each ``answer_files`` entry of the config that is an object of answer.py's
   flags (a local artifact or an endpoint) instead of a file: ``answers/answer_MODEL.jsonl`` (and answer.py's
   report beside it, ``answer_MODEL.report.json``);
2. LLMZoo reviews (``eval/review.py``), one per ``--dimensions`` entry: ``review/DIMENSION/`` (``review.jsonl``,
   ``metric.json``, ``ordering.txt``, ``report.json``);
3. judgments (``eval/judge.py``), one per ``--judge_modes`` entry (single, pairwise, all_pairs):
   ``judge/MODE/`` (``judgments.jsonl``, ``battles.jsonl``, ``report.json``);
4. rankings (``utils.evaluation.ranking``: Bradley-Terry and online Elo with bootstrap intervals), one per
   source of battles (each order-mode dimension, each pairwise mode) and, with several, all of them pooled;
5. ``summary.json`` (the input files' hashes, the judge, request / cached / failed counts, unparsed counts per
   step, per-model scores, rankings with their intervals), ``results.md`` and ``results.csv`` (the same
   tables), ``rankings.png`` (the pooled ranking, or the only one; each source's in ``rankings/``),
   ``config.json`` (the resolved configuration: the API key's environment variable is named, the key never
   written) and, last, ``pipeline.json``. The judge cache is ``cache/`` unless ``--cache_dir`` names one to share.

The configuration comes from flags, from ``--config FILE`` (JSON, or YAML when PyYAML is installed: an object
whose keys are this script's flag names), or both: a flag given on the command line with a value other than
its default wins over the file. Relative paths in the file are read from the file's folder, so a cron job
works from any directory; on the command line, from the current one. In the file, an ``answer_files`` entry
may be an object of ``eval/answer.py`` flags with a ``model_id`` (``{"model_id": "mine", "lora_weights":
"runs/lora", "max_new_tokens": 512}``, or ``judge_base_url`` / ``judge_model`` for an endpoint): its answers
are made in the run.

The run's name (``--run_name``) defaults to the first 12 hex digits of its fingerprint: the hash of every
setting that changes a result and of the inputs (the files' contents, each answer set's generation settings
and, for a local artifact, its weights' hashes). So the identical command again finds its own folder:

* finished: nothing is sent and no file changes; the stored summary is printed again (and the checks below
  applied again, with this command's thresholds);
* killed or failed half way: it resumes, and each step sends only what is missing (answers, reviews and
  judgments already in the folder or in the judge cache are not asked again);
* in use by another invocation (a lock on ``RUN/.lock``, held for the whole run): refused, exit 1.

``OUTPUT_DIR/latest`` points to the last run that finished, replaced atomically.

Bad input is never silent. Every input (questions, answer files, rules, prompts, references, answer settings)
is read and checked before any request, every problem named with file:line at once. A judge output that
cannot be parsed is kept verbatim in its step's files with its parse error, counted in ``summary.json`` and
on stderr, and never scored. When more than ``--max_unparsed`` of a step's outputs cannot be parsed (any, with
``--strict``), the run still writes everything and finishes, then exits 1. A request that fails after all
retries leaves the run unfinished (exit 1, ``latest`` unchanged): the same command again retries it.

Output: the summary (``summary.json``) as JSON on stdout, the payload as for every eval script; the tables of
``results.md`` and every diagnostic on stderr.

Examples:
    python eval/run.py --config examples/eval_run.json --output_dir runs/eval
    python eval/run.py --question_file q.jsonl --answer_files a.jsonl b.jsonl --rules prompt_all.json \\
        --dimensions general relevance --judge_modes pairwise --baseline gpt-3.5-turbo \\
        --judge_base_url http://127.0.0.1:8000/v1 --judge_model judge --output_dir runs/eval
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import difflib
import importlib
import inspect
import io
import json
import os
import re
import sys
import types
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.args import Group, StageArgs, unfingerprinted  # noqa: E402
from utils.artifacts import (META_FILE, META_VERSION, Lock, check_output_dir, read_meta,  # noqa: E402
                             remove_recorded, sha256_file, sha256_json, transient, write_json, write_meta)
from utils.cli import coerce, run  # noqa: E402
from utils.errors import SuiteError, UsageError  # noqa: E402
from utils.evaluation.ranking import Resampling  # noqa: E402
from utils.evaluation.stage import UnparsedChecks, emit, file_record  # noqa: E402
from utils.judge import JudgeOptions  # noqa: E402

STAGE = "eval_run"
CONFIG_FILE, SUMMARY_FILE = "config.json", "summary.json"
RESULTS_MD, RESULTS_CSV, PLOT_FILE = "results.md", "results.csv", "rankings.png"
ANSWERS_DIR, REVIEW_DIR, JUDGE_DIR, PLOTS_DIR, CACHE_DIR = "answers", "review", "judge", "rankings", "cache"
LATEST = "latest"
JUDGE_MODES = ("single", "pairwise", "all_pairs")
#: Bootstrap rounds beyond which the run is refused (as eval/rank.py: a typo would run for minutes).
#: How many unparsed outputs per step summary.json and stderr show one by one (the counts are always whole; each
#: step's own report lists more, its raw file has them all).
SHOWN = 5
#: The request counts summed over the steps (the judge client's ``stats()``, less ``max_in_flight``).
COUNTS = ("requests", "cached", "failed", "retries", "prompt_tokens", "completion_tokens")
#: Flags of a generated answer set that the run sets itself.
RUN_OWNED = ("question_file", "output_file", "overwrite")
#: Path-valued keys of a generated answer set, read from the config file's folder when relative.
SPEC_PATHS = ("base_model", "lora_weights", "cache_dir")
PATH_FLAGS = ("question_file", "rules", "reference_file", "prompts", "cache_dir", "output_dir")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTENT = "counts as its content (the file's hash among the inputs)"
_PERMISSION = "a permission: it only allows what is otherwise refused"


# -- flags, by concern -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs(Group):
    """The questions and the answer sets compared (their order is the assistants' order in a review)."""

    question_file: str = unfingerprinted("", why=_CONTENT)
    answer_files: list = unfingerprinted((), why="count as their contents, in order: each file's hash, or each "
                                              "generated set's model and settings, among the inputs")

    def problems(self) -> list[str]:
        problems = []
        if not self.question_file:
            problems.append("--question_file is required (JSONL of {question_id, text, category})")
        elif not Path(self.question_file).is_file():
            problems.append(f"--question_file {self.question_file}: no such file")
        if not self.answer_files:
            problems.append("--answer_files is required: one answers JSONL per model (in a --config, an entry may "
                            "also be an object of eval/answer.py flags, answered in the run)")
        problems += [f"--answer_files {p}: no such file" for p in self.answer_files
                     if isinstance(p, str) and not Path(p).is_file()]
        return problems


@dataclass(frozen=True)
class Review(Group):
    """LLMZoo's review, one per dimension (none: no review)."""

    rules: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    dimensions: list[str] = ()
    review_mode: Literal["order", "score"] = "order"
    horiz: bool = False
    review_max_tokens: int = 0

    def problems(self) -> list[str]:
        problems = []
        bad = [d for d in self.dimensions if not isinstance(d, str) or not NAME.fullmatch(d)]
        if bad:
            problems.append(f"--dimensions: {', '.join(map(repr, bad))}: a dimension names a folder (letters, "
                            "digits, ., _ and -)")
        twice = sorted({d for d in self.dimensions if list(self.dimensions).count(d) > 1})
        if twice:
            problems.append(f"--dimensions: named twice: {', '.join(twice)}")
        if self.review_mode not in ("order", "score"):
            problems.append(f"--review_mode must be order or score, got {self.review_mode!r}")
        if self.dimensions and self.review_mode == "order" and not self.rules:
            problems.append("--rules is required with --dimensions in order mode: a JSON in the format of LLMZoo's "
                            "prompt_all.json ({dimension: {role, prompt, description}})")
        if self.rules and not Path(self.rules).is_file():
            problems.append(f"--rules {self.rules}: no such file")
        if self.review_max_tokens < 0:
            problems.append(f"--review_max_tokens must be >= 0 (0: not sent), got {self.review_max_tokens}")
        return problems


@dataclass(frozen=True)
class Judging(Group):
    """FastChat-style judgments, one set per mode (none: no judgment)."""

    judge_modes: list[str] = ()
    baseline: str = ""
    reference_file: str = unfingerprinted("", why=_CONTENT)
    prompts: str = unfingerprinted("", why="counts as its content (each prompt's hash among the inputs)")
    judge_max_tokens: int = 1024

    def problems(self) -> list[str]:
        problems = []
        bad = [m for m in self.judge_modes if m not in JUDGE_MODES]
        if bad:
            problems.append(f"--judge_modes: {', '.join(map(repr, bad))}: each must be one of "
                            f"{', '.join(JUDGE_MODES)}")
        twice = sorted({m for m in self.judge_modes if list(self.judge_modes).count(m) > 1})
        if twice:
            problems.append(f"--judge_modes: named twice: {', '.join(twice)}")
        if "pairwise" in self.judge_modes and not self.baseline:
            problems.append("--judge_modes pairwise needs --baseline MODEL_ID (the model every other is judged "
                            "against)")
        if self.baseline and "pairwise" not in self.judge_modes:
            problems.append("--baseline is only for --judge_modes pairwise")
        if self.reference_file and not Path(self.reference_file).is_file():
            problems.append(f"--reference_file {self.reference_file}: no such file")
        if self.prompts and not Path(self.prompts).is_dir():
            problems.append(f"--prompts {self.prompts}: no such folder")
        if self.judge_max_tokens < 0:
            problems.append(f"--judge_max_tokens must be >= 0 (0: not sent), got {self.judge_max_tokens}")
        return problems


@dataclass(frozen=True)
class Folder(Group):
    """Where the run goes, and the file its settings come from."""

    config: str = unfingerprinted("", why="its values count (merged into the flags), not its path")
    output_dir: str = unfingerprinted("", why="where the run is written, not what it says")
    run_name: str = unfingerprinted("", why="names the run folder; the default is the fingerprint itself")
    overwrite: bool = unfingerprinted(False, why=_PERMISSION)

    def problems(self) -> list[str]:
        problems = []
        if not self.output_dir:
            problems.append("--output_dir is required (each run is a folder in it, and OUTPUT_DIR/latest points "
                            "to the last finished one)")
        if self.run_name and (not NAME.fullmatch(self.run_name) or self.run_name == LATEST):
            problems.append(f"--run_name {self.run_name!r}: a plain folder name (letters, digits, ., _ and -, not "
                            f"starting with . or -), and not {LATEST!r}")
        return problems


@dataclass(frozen=True)
class RunArgs(StageArgs):
    STAGE = STAGE

    inputs: Inputs
    review: Review
    judging: Judging
    judge: JudgeOptions
    ranking: Resampling
    checks: UnparsedChecks
    folder: Folder


Args = RunArgs


def main(
    *,
    config: str = "",
    question_file: str = "",
    answer_files: list[str] = (),
    rules: str = "",
    dimensions: list[str] = (),
    review_mode: Literal["order", "score"] = "order",
    horiz: bool = False,
    review_max_tokens: int = 0,
    judge_modes: list[str] = (),
    baseline: str = "",
    reference_file: str = "",
    prompts: str = "",
    judge_max_tokens: int = 1024,
    judge_base_url: str = "",
    judge_model: str = "",
    judge_api_key_env: str = "OPENAI_API_KEY",
    cache_dir: str = "",
    max_retries: int = 5,
    timeout: float = 60.0,
    concurrency: int = 4,
    rpm: float = 0.0,
    bootstrap: int = 1000,
    seed: int = 0,
    output_dir: str = "",
    run_name: str = "",
    overwrite: bool = False,
    max_unparsed: float = 0.05,
    strict: bool = False,
) -> None:
    """A whole evaluation run: answers, LLMZoo reviews and/or judgments, metrics, rankings, one folder per run.

    Args:
        config: JSON (or YAML, with PyYAML installed) object of these flags' names and values; relative paths in
            it are read from its folder, and an answer_files entry may be an object of eval/answer.py flags
            with a model_id (answered in the run). A flag given here with a non-default value wins over it.
        question_file: JSONL of {question_id, text, category, lang} rows (LLMZoo's questions-en.jsonl).
        answer_files: One answers JSONL per model ({question_id, text, answer_id, model_id}: eval/answer.py's or
            LLMZoo's), each covering every question; their order is the assistants' (in a review the first is
            the reference unless --horiz).
        rules: LLMZoo rules JSON ({dimension: {role, prompt, description}}, prompt_all.json's format); needed by
            order-mode reviews, score mode defaults to templates/judge/llmzoo_score.json.
        dimensions: The LLMZoo review dimensions to run, each a key of --rules (none: no review).
        review_mode: order (the judge orders the answers; gives rankings) or score (it scores each).
        horiz: LLMZoo's horizontal metric (no reference model).
        review_max_tokens: Most tokens per review (0: not sent, as LLMZoo).
        judge_modes: eval/judge.py modes to run: single, pairwise (against --baseline), all_pairs (none: none).
        baseline: The model_id the others are judged against in pairwise mode.
        reference_file: Reference answers (an answers file) for reference-guided judging.
        prompts: Folder of judge prompts (default: templates/judge).
        judge_max_tokens: Most tokens of one judgment (0: not sent).
        judge_base_url: The judge's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (serve.py is one).
        judge_model: The judge's model name, as the endpoint knows it.
        judge_api_key_env: Name of the environment variable holding the judge's API key (the key itself is never
            written anywhere; unset: no key is sent).
        cache_dir: The judge's request cache, shareable between runs (default: cache/ in the run folder).
        max_retries: Retries of a request on 429, 5xx, timeouts and connection errors.
        timeout: Seconds per request.
        concurrency: Requests in flight at most.
        rpm: Requests per minute at most (0: no limit).
        bootstrap: Resamples of the battles behind the rankings' 95% intervals (0: ratings only).
        seed: Seed of the resampling.
        output_dir: Where run folders go (OUTPUT_DIR/RUN_NAME), and OUTPUT_DIR/latest, a link to the last
            finished one.
        run_name: The run folder's name (default: the first 12 hex digits of the run's fingerprint, so the same
            command finds the same folder).
        overwrite: Replace a different run in --output_dir/--run_name (the judge cache is kept, so answers asked
            before cost nothing).
        max_unparsed: Exit non-zero (after writing everything) when more than this share of a step's judge
            outputs cannot be parsed.
        strict: Exit non-zero (after writing everything) when any judge output cannot be parsed.
    """
    args = RunArgs.from_flags(resolve_flags(dict(locals())))
    problems = args.problems() + cross_problems(args)
    if problems:
        raise UsageError("\n".join(problems))
    plan = plan_run(args)
    out = Path(args.folder.output_dir)
    name = args.folder.run_name or plan.fingerprint[:12]
    folder = out / name
    check_latest(out)
    if finished_run(folder, plan.fingerprint, args.folder.overwrite):
        return reprint(folder, args)
    folder.mkdir(parents=True, exist_ok=True)
    with Lock(folder / ".lock", f"--output_dir {out} --run_name {name}"):
        # Again under the lock: another invocation may have finished this run since the first look.
        if finished_run(folder, plan.fingerprint, args.folder.overwrite):
            return reprint(folder, args)
        start(folder, plan, args)
        steps = run_steps(args, plan, folder)
        summary = finish(args, plan, folder, name, steps)
    point_latest(out, name)
    print(f"{STAGE}: wrote {folder}; {out / LATEST} -> {name}", file=sys.stderr)
    show(folder, summary)
    raise_outcome(summary)


# -- the configuration ---------------------------------------------------------------------------------------------


def flag_types() -> dict[str, Any]:
    return typing.get_type_hints(main)


def flag_defaults() -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(main).parameters.items()}


def resolve_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Every flag's value: the command line's where it differs from the default, else the config file's, else the
    default; paths made absolute (a config's relative paths from its folder, the command line's from here).

    Raises:
        UsageError: every problem of the config file at once (unreadable, unknown keys, wrong types).
    """
    defaults, values = flag_defaults(), dict(flags)
    given = {k for k, v in flags.items() if not same_value(v, defaults[k])}
    for key in PATH_FLAGS:
        values[key] = absolute(values[key], Path.cwd())
    values["answer_files"] = [absolute(p, Path.cwd()) for p in values["answer_files"]]
    if flags["config"]:
        path = Path(flags["config"])
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        data = read_config(path)
        base = path.resolve().parent
        problems = []
        for key, value in data.items():
            why = config_problem(key, value)
            if why:
                problems.append(f"--config {path}: {why}")
                continue
            if key in given:
                continue  # the command line wins
            value = coerced(value, flag_types()[key], key)
            if key in PATH_FLAGS:
                value = absolute(value, base)
            elif key == "answer_files":
                value = [absolute(v, base) if isinstance(v, str) else spec_paths(v, base) for v in value]
            values[key] = value
        if problems:
            raise UsageError("\n".join(problems))
    values["answer_files"] = list(values["answer_files"])
    for key in ("dimensions", "judge_modes"):
        values[key] = list(values[key])
    values["config"] = str(Path(flags["config"]).absolute()) if flags["config"] else ""
    return values


def same_value(a: Any, b: Any) -> bool:
    """Equality that takes a list and a tuple of the same items as equal (a list flag's default is a tuple)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b and type(a) is type(b)


def absolute(value: Any, base: Path) -> Any:
    """A path read from ``base`` when relative (``~`` expanded); an empty string stays empty."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def spec_paths(spec: dict, base: Path) -> dict:
    """A generated answer set's paths read from ``base`` (a prompt template too, when it names a .json file)."""
    out = dict(spec)
    for key in SPEC_PATHS:
        if key in out:
            out[key] = absolute(out[key], base)
    template = out.get("prompt_template")
    if isinstance(template, str) and template.endswith(".json"):
        out["prompt_template"] = absolute(template, base)
    return out


def read_config(path: Path) -> dict:
    """The config file's object: JSON, or YAML for a .yaml / .yml file (with PyYAML installed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"--config {path}: a YAML config needs PyYAML (pip install pyyaml); or write it as "
                             "JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise UsageError(f"--config {where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected an object of flag names and values, got "
                         f"{type(data).__name__}")
    return data


def config_problem(key: Any, value: Any) -> str | None:
    """Why a config entry cannot be used (an unknown key, a value of the wrong type), or None."""
    types = flag_types()
    if key == "config" or key not in types:
        names = [n for n in types if n != "config"]
        close = difflib.get_close_matches(str(key), names, n=1)
        return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + \
            "; the keys are this script's flag names (see --help)"
    if key == "answer_files":
        if not isinstance(value, list) or not all(isinstance(v, (str, dict)) for v in value):
            return "answer_files must be a list of answer files (strings) and answer settings (objects)"
        return None
    return type_problem(value, types[key], key)


def type_problem(value: Any, tp: Any, key: str) -> str | None:
    """Why ``value`` (from JSON or YAML) does not fit annotation ``tp``, or None (a string is read as a flag is)."""
    try:
        value = coerced(value, tp, key)
    except ValueError as exc:
        return str(exc)
    origin, params = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if any(type_problem(value, p, key) is None for p in params):
            return None
        return f"{key}: {value!r} is none of {', '.join(getattr(p, '__name__', str(p)) for p in params)}"
    if origin is Literal:
        return None if value in params else f"{key} must be one of {', '.join(map(repr, params))}, got {value!r}"
    if origin in (list, tuple) or tp in (list, tuple):
        item = params[0] if params else str
        if not isinstance(value, list):
            return f"{key} must be a list, got {value!r}"
        bad = [v for v in value if type_problem(v, item, key) is not None]
        return f"{key}: {bad[0]!r} is not a {getattr(item, '__name__', item)}" if bad else None
    if tp is type(None):
        return None if value is None else f"{key} must be null"
    if tp is bool:
        return None if isinstance(value, bool) else f"{key} must be true or false, got {value!r}"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{key} must be an integer, got {value!r}"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{key} must be a number, got {value!r}"
    if tp is str:
        return None if isinstance(value, str) else f"{key} must be a string, got {value!r}"
    return None


def coerced(value: Any, tp: Any, key: str = "") -> Any:
    """A config value as the flag would take it: a string (YAML writes ``1e-3`` as one) read by the command
    line's rules (``utils.cli.coerce``), any other value as it is."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if isinstance(value, str) and tp is not str and not (optional and str in typing.get_args(tp)):
        return coerce(value, tp, key)
    if isinstance(value, int) and not isinstance(value, bool) and tp is float:
        return float(value)
    return value


def cross_problems(args: RunArgs) -> list[str]:
    """What no group can check alone: something to do, a judge to do it, enough answer sets."""
    problems = []
    if not args.review.dimensions and not args.judging.judge_modes:
        problems.append("nothing to evaluate: give --dimensions (LLMZoo reviews) and/or --judge_modes (judgments)")
    problems += args.judge.problems()
    n = len(args.inputs.answer_files)
    if args.review.dimensions and not 2 <= n <= 9:
        problems.append(f"--answer_files: LLMZoo's review compares 2 to 9 answer sets, got {n}")
    if {"pairwise", "all_pairs"} & set(args.judging.judge_modes) and n < 2:
        problems.append(f"--judge_modes pairwise / all_pairs compare models: --answer_files needs at least two, got "
                        f"{n}")
    return problems


# -- the plan: every input read and checked, the fingerprint, before any request -------------------------------------


@dataclass
class AnswerSet:
    """One model's answers: a file given, or a set made in the run (``spec``: eval/answer.py's flags)."""

    model_id: str
    path: str  # the file given, or (once the run folder is known) where the run writes the answers
    spec: dict | None = None
    record: dict | None = None  # generated: the model (the artifact's hashes, or the endpoint) and the settings key


@dataclass
class Plan:
    """The answer sets in order, the record of the inputs (files with paths and hashes) and the fingerprint."""

    answers: list[AnswerSet]
    inputs: dict
    fingerprint: str

    @property
    def models(self) -> list[str]:
        return [a.model_id for a in self.answers]


def script(name: str):
    """An eval script's module (``eval/NAME.py``), imported as the tests import it."""
    return importlib.import_module(f"eval.{name}")


def plan_run(args: RunArgs) -> Plan:
    """Read and check every input, with every problem named at once (file:line), before anything is sent.

    Raises:
        SuiteError: listing every problem found.
    """
    problems: list[str] = []
    file_problems: list[str] = []  # the given answer files' bad lines
    answers = [given_answers(p, file_problems) if isinstance(p, str) else generated_answers(p, i, args, problems)
               for i, p in enumerate(args.inputs.answer_files, 1)]
    answers = [a for a in answers if a is not None]
    models = [a.model_id for a in answers]
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        problems.append(f"--answer_files: model_id {', '.join(map(repr, twice))} names two answer sets; each set is "
                        "another model")
    names = [safe_name(a.model_id) for a in answers if a.spec is not None]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash and not twice:
        problems.append(f"--answer_files: generated answer sets whose model_ids give the same file name: "
                        f"{', '.join(clash)}")
    given = [p for p in args.inputs.answer_files if isinstance(p, str)]
    checked = False
    if args.review.dimensions:
        found, checked = review_input_problems(args, given, len(args.inputs.answer_files))
        problems += found
    # review.py's reader names the same bad lines, with its own words: each problem once.
    problems += [] if checked else file_problems
    given = [a.path for a in answers if a.spec is None]
    if args.judging.judge_modes:
        problems += judge_input_problems(args, given, models)
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise SuiteError(f"{len(problems)} problem(s) in the inputs, nothing sent:\n  " + "\n  ".join(
            "\n  ".join(p.splitlines()) for p in shown))
    inputs = input_record(args, answers)
    return Plan(answers, inputs, fingerprint(args, fingerprint_inputs(inputs)))


def given_answers(path: str, problems: list[str]) -> AnswerSet | None:
    """An answers file: its model (every row's model_id), checked line by line."""
    from utils.evaluation.judging import read_answer_file

    try:
        return AnswerSet(read_answer_file(path).model, path)
    except SuiteError as exc:
        problems.append(str(exc))
        return None


def generated_answers(spec: dict, number: int, args: RunArgs, problems: list[str]) -> AnswerSet | None:
    """An answer set made in the run: eval/answer.py's flags checked as answer.py checks them, and the model
    recorded (a local artifact's hashes, or the endpoint and its model) with the settings' fingerprint, which
    answer.py writes in every answer it makes."""
    answer = script("answer")
    where = f"--answer_files entry {number}"
    names = [n for n in inspect.signature(answer.main).parameters if n not in RUN_OWNED]
    hints = typing.get_type_hints(answer.main)
    bad = []
    for key, value in spec.items():
        if key in RUN_OWNED:
            bad.append(f"{key} is set by the run (the questions are --question_file, the answers go into the run "
                       "folder, --overwrite is the run's)")
        elif key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            bad.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                       + "; the keys are eval/answer.py's flags")
        else:
            why = type_problem(value, hints[key], key)
            if why:
                bad.append(why)
    model_id = spec.get("model_id")
    if not isinstance(model_id, str) or not NAME.fullmatch(model_id or ""):
        bad.append("model_id is required: the name the answers are written under (letters, digits, ., _ and -)")
    if bad:
        problems += [f"{where}: {b}" for b in bad]
        return None
    flags = {k: coerced(v, hints[k], k) for k, v in spec.items()}
    placeholder = f"<run folder>/{ANSWERS_DIR}/answer_{safe_name(model_id)}.jsonl"
    try:
        aargs = answer.AnswerArgs.from_flags({**flags, "question_file": args.inputs.question_file,
                                              "output_file": placeholder})
        answer.validate(aargs)
        record = answer_model(aargs)
    except SuiteError as exc:
        problems += [f"{where} ({model_id}): {line.strip()}" for line in str(exc).splitlines() if line.strip()]
        return None
    return AnswerSet(model_id, placeholder, flags, record)


def answer_model(aargs) -> dict:
    """What eval/answer.py records as the model of a generated set (and the key of its settings, which it writes
    into every answer): a local artifact's hashes (tokenizer and template loaded, no weights), or the endpoint."""
    answer = script("answer")
    if aargs.source == "endpoint":
        model = {"endpoint": aargs.endpoint.judge_base_url, "model": aargs.endpoint.judge_model}
    else:
        from utils.evaluation.stage import artifact_record
        from utils.inference.options import plan_loading

        model = artifact_record(plan_loading(aargs.loading, aargs.prompting, stage="answer"))
    return {"model": model, "key": answer.fingerprint(aargs, {"model": model})}


def review_input_problems(args: RunArgs, given: list[str], n: int) -> tuple[list[str], bool]:
    """eval/review.py's checks of the questions, the given answer files (every question answered, one model each)
    and the rule of every dimension, with their messages; and whether the answer files were checked (they are
    not when the questions cannot be read)."""
    from utils.evaluation.llmzoo import check_rule, load_rules

    answer, review = script("answer"), script("review")
    problems = []
    questions = None
    try:
        questions = answer.read_questions(args.inputs.question_file, need_category=True)
    except SuiteError as exc:
        problems.append(str(exc))
    if questions is not None and given:
        try:
            review.read_answer_files(given, questions)
        except SuiteError as exc:
            problems.append(str(exc))
    rules_file = review.Inputs(rules=args.review.rules, mode=args.review.review_mode).rules_file
    try:
        rules = load_rules(rules_file)
    except SuiteError as exc:
        return problems + [str(exc)], questions is not None
    for dimension in args.review.dimensions:
        try:
            check_rule(rules, dimension, args.review.review_mode, n)
        except SuiteError as exc:
            problems.append(str(exc).replace("--mode", "--review_mode").replace("--dimension ", "--dimensions "))
    return problems, questions is not None


def judge_input_problems(args: RunArgs, given: list[str], models: list[str]) -> list[str]:
    """eval/judge.py's checks of the questions, the given answer files, the references and the prompts."""
    from utils.evaluation import judging

    problems = []
    try:
        questions = judging.read_question_file(args.inputs.question_file)
    except SuiteError as exc:
        # With reviews too, review.py's reader has named the file's bad lines already (the same lines).
        return [] if args.review.dimensions and reviewed_questions_bad(args) else [str(exc)]
    sets = []
    for path in given:
        try:
            sets.append(judging.read_answer_file(path))
        except SuiteError:
            pass  # already reported with the answer sets
    try:
        judging.check_answers(questions, sets)
    except SuiteError as exc:
        problems.append(str(exc))
    try:
        references = (judging.read_answer_file(args.judging.reference_file, "--reference_file")
                      if args.judging.reference_file else None)
        questions = judging.with_references(questions, references)
    except SuiteError as exc:
        problems.append(str(exc))
    folder = Path(args.judging.prompts) if args.judging.prompts else script("judge").PROMPTS
    for kind in sorted({"single" if m == "single" else "pairwise" for m in args.judging.judge_modes}):
        try:
            judging.load_prompts(folder, kind, questions)
        except SuiteError as exc:
            problems.append(str(exc))
    if args.judging.baseline and args.judging.baseline not in models:
        problems.append(f"--baseline {args.judging.baseline!r} is not among the models of --answer_files "
                        f"({', '.join(models)})")
    return problems


def reviewed_questions_bad(args: RunArgs) -> bool:
    try:
        script("answer").read_questions(args.inputs.question_file, need_category=True)
    except SuiteError:
        return True
    return False


def input_record(args: RunArgs, answers: list[AnswerSet]) -> dict:
    """The inputs as summary.json records them: each file's path, size and sha256; each generated set's
    settings and model."""
    record: dict[str, Any] = {"question_file": file_record(args.inputs.question_file), "answer_sets": []}
    for a in answers:
        if a.spec is None:
            record["answer_sets"].append({"model_id": a.model_id, "file": file_record(a.path)})
        else:
            record["answer_sets"].append({"model_id": a.model_id, "generated": {
                "settings": a.spec, "model": a.record["model"], "key": a.record["key"]}})
    if args.review.dimensions:
        record["rules"] = file_record(script("review").Inputs(rules=args.review.rules,
                                                              mode=args.review.review_mode).rules_file)
    if args.judging.judge_modes:
        from utils.evaluation import judging

        record["reference_file"] = file_record(args.judging.reference_file) if args.judging.reference_file else None
        folder = Path(args.judging.prompts) if args.judging.prompts else script("judge").PROMPTS
        kinds = {"single" if m == "single" else "pairwise" for m in args.judging.judge_modes}
        names = sorted({judging.PROMPT_FILES[k, ref] for k in kinds for ref in (False, True)})
        record["prompts"] = {n: file_record(folder / n) for n in names if (folder / n).is_file()}
    return record


def fingerprint_inputs(record: dict) -> dict:
    """The part of the input record that determines the results: contents, not paths."""
    sets = [{"model_id": a["model_id"], "sha256": a["file"]["sha256"]} if "file" in a
            else {"model_id": a["model_id"], "key": a["generated"]["key"]} for a in record["answer_sets"]]
    out = {"question_file": record["question_file"]["sha256"], "answer_sets": sets}
    if "rules" in record:
        out["rules"] = record["rules"]["sha256"]
    if "prompts" in record:
        out["reference_file"] = record["reference_file"] and record["reference_file"]["sha256"]
        out["prompts"] = {n: r["sha256"] for n, r in record["prompts"].items()}
    return out


def fingerprint(args: RunArgs, inputs: dict) -> str:
    """What determines the run: every flag that counts and ``inputs`` (the inputs' hashes and the generated sets'
    keys). Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


def safe_name(model_id: str) -> str:
    """A model id as a file name part."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_id)


# -- the run folder's life cycle ---------------------------------------------------------------------------------


def check_latest(out: Path) -> None:
    """OUTPUT_DIR/latest, if present, must be a link this script can replace (checked before any request)."""
    link = out / LATEST
    if (link.exists() or link.is_symlink()) and not link.is_symlink():
        raise SuiteError(f"--output_dir {out}: {link} exists and is not a link; move it away (this script points "
                         f"{LATEST} at the last finished run)")


def finished_run(folder: Path, fp: str, overwrite: bool) -> bool:
    """Whether ``folder`` holds this exact run, finished (the invocation is a no-op). A folder holding another
    stage's output or files this suite did not write is refused; a different run, finished or not, unless
    ``overwrite`` (its recorded files are removed then, the judge cache kept)."""
    if check_output_dir(folder, STAGE, fp, overwrite, flag="--output_dir/--run_name"):
        return True
    meta = read_meta(folder) if (folder / META_FILE).is_file() else None
    if isinstance(meta, dict) and meta.get("stage") == STAGE and meta.get("fingerprint") != fp:
        if not overwrite:
            raise SuiteError(f"--output_dir/--run_name {folder} holds an unfinished different run (fingerprint "
                             f"{str(meta.get('fingerprint'))[:12]} != {fp[:12]}); pass --overwrite to replace it, "
                             "or choose another --run_name")
    return False


def start(folder: Path, plan: Plan, args: RunArgs) -> None:
    """Mark the folder as this run's, unfinished (other stages refuse it, the next invocation resumes it), and
    write config.json."""
    meta = read_meta(folder) if (folder / META_FILE).is_file() else None
    if isinstance(meta, dict) and meta.get("stage") == STAGE and meta.get("fingerprint") != plan.fingerprint:
        remove_recorded(folder, meta)  # --overwrite of a different run (finished_run refused it otherwise)
    if not (isinstance(meta, dict) and meta.get("fingerprint") == plan.fingerprint and meta.get("complete") is False):
        write_json(folder / META_FILE, {
            "meta_version": META_VERSION, "stage": STAGE, "complete": False, "fingerprint": plan.fingerprint,
            "files": {}, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    write_json(folder / CONFIG_FILE, resolved_config(args, plan))


def resolved_config(args: RunArgs, plan: Plan) -> dict:
    """Every setting as this run used it, paths absolute, in the format of --config (``--config RUN/config.json``
    is the same run again). No secret can be in it: the judge's key is named by its environment variable only,
    and no flag takes a key."""
    flags = {k: v for k, v in args.flags().items() if k != "config"}
    flags["answer_files"] = [a.path if a.spec is None else dict(a.spec) for a in plan.answers]
    return flags


def point_latest(out: Path, name: str) -> None:
    """OUTPUT_DIR/latest -> NAME, atomically: a new link under a temporary name renamed over the old one."""
    tmp = out / f".{LATEST}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.symlink(name, tmp)
    try:
        os.replace(tmp, out / LATEST)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def reprint(folder: Path, args: RunArgs) -> None:
    """The identical command on a finished run: nothing sent, nothing written; the stored summary printed again
    and the checks applied again (with this invocation's thresholds)."""
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SuiteError(f"{folder}: its {SUMMARY_FILE} cannot be read ({exc}); pass --overwrite to run again") \
            from None
    print(f"{STAGE}: {folder} already holds this run (fingerprint {summary.get('fingerprint', '')[:12]}); "
          "nothing sent", file=sys.stderr)
    summary["checks"] = checks(summary["steps"], args.checks)
    show(folder, summary)
    raise_outcome(summary)


def show(folder: Path, summary: dict) -> None:
    """The tables (results.md) on stderr, the summary as JSON on stdout."""
    try:
        table = (folder / RESULTS_MD).read_text(encoding="utf-8")
    except OSError:
        table = ""
    print(table.rstrip("\n"), file=sys.stderr)
    verdict = summary["checks"]
    limit = "--strict" if verdict["strict"] else f"--max_unparsed {verdict['max_unparsed']:g}"
    print(f"{STAGE}: checks ({limit}): " + ("passed" if verdict["passed"] else "FAILED"), file=sys.stderr)
    emit(summary)


# -- the steps ---------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One sub-step's outcome: its report (the sub-script's payload), whether it did anything this time, and why
    it did not finish (requests that failed), if it did not."""

    name: str  # answers/MODEL, review/DIMENSION, judge/MODE
    kind: str
    folder: Path
    report: dict | None
    ran: bool
    unfinished: str | None = None


def call(main_fn, **kwargs) -> tuple[dict | None, SuiteError | None]:
    """A script's ``main`` in this process, its stdout payload (the report) captured. A script that printed its
    report did its work: an error after it is its verdict (returned); one before it is raised."""
    buffer = io.StringIO()
    error = None
    with contextlib.redirect_stdout(buffer):
        try:
            main_fn(**kwargs)
        except SuiteError as exc:
            error = exc
    text = buffer.getvalue().strip()
    try:
        report = json.loads(text) if text else None
    except ValueError:
        report = None
    if report is None and error is not None:
        raise error
    return report, error


def judge_flags(args: RunArgs, cache: Path) -> dict:
    return {**args.judge.values(), "cache_dir": str(cache)}


def run_steps(args: RunArgs, plan: Plan, folder: Path) -> list[Step]:
    """Answers, then reviews, then judgments, each resumed where an earlier invocation left it. A step whose
    requests failed is noted and the others still run, except that reviews and judgments wait for every
    answer."""
    cache = Path(args.judge.cache_dir) if args.judge.cache_dir else folder / CACHE_DIR
    steps: list[Step] = []
    for a in plan.answers:
        if a.spec is not None:
            a.path = str(folder / ANSWERS_DIR / f"answer_{safe_name(a.model_id)}.jsonl")
            steps.append(answer_step(args, a, folder, cache))
    if any(s.unfinished for s in steps):
        return steps
    paths = [a.path for a in plan.answers]
    for dimension in args.review.dimensions:
        steps.append(review_step(args, paths, dimension, folder / REVIEW_DIR / dimension, cache))
    for mode in args.judging.judge_modes:
        steps.append(judge_step(args, paths, mode, folder / JUDGE_DIR / mode, cache))
    return steps


def answer_step(args: RunArgs, a: AnswerSet, folder: Path, cache: Path) -> Step:
    """eval/answer.py for one generated set; its report is kept beside the answers when it did anything (answer.py
    itself writes none), so the counts of the invocation that made them stay on record."""
    name = f"{ANSWERS_DIR}/{a.model_id}"
    print(f"{STAGE}: {name}: eval/answer.py", file=sys.stderr)
    out = Path(a.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = dict(a.spec)
    if flags.get("judge_base_url") and not flags.get("cache_dir"):
        flags["cache_dir"] = str(cache)
    report, error = call(script("answer").main, **flags, question_file=args.inputs.question_file,
                         output_file=str(out), overwrite=args.folder.overwrite)
    stored = out.with_name(out.stem + ".report.json")
    ran = bool(report["new"] or report["failed"])
    if ran or not stored.is_file():
        write_json(stored, report)
    unfinished = (f"{report['failed']} question(s) got no answer ({error})" if report["failed"] else None)
    return Step(name, "answers", out.parent, report, ran, unfinished)


def step_meta(folder: Path) -> bytes | None:
    try:
        return (folder / META_FILE).read_bytes()
    except OSError:
        return None


def was_noop(before: bytes | None, after: bytes | None) -> bool:
    """A step found its output finished and changed nothing: its pipeline.json, complete before, is untouched."""
    if before is None or before != after:
        return False
    try:
        return json.loads(before).get("complete") is True
    except ValueError:
        return False


def review_step(args: RunArgs, answer_files: list[str], dimension: str, out: Path, cache: Path) -> Step:
    """eval/review.py on one dimension. The run applies --max_unparsed / --strict itself, over every step; a
    failed request leaves the review unfinished (no metric), and the next invocation asks it again."""
    name = f"{REVIEW_DIR}/{dimension}"
    print(f"{STAGE}: {name}: eval/review.py", file=sys.stderr)
    before = step_meta(out)
    report, error = call(script("review").main, question_file=args.inputs.question_file, answer_files=answer_files,
                         rules=args.review.rules, dimension=dimension, mode=args.review.review_mode,
                         horiz=args.review.horiz, max_tokens=args.review.review_max_tokens,
                         **judge_flags(args, cache), output_dir=str(out), overwrite=args.folder.overwrite,
                         max_unparsed=1.0, strict=False)
    failed = report["failed"]["count"]
    unfinished = f"{failed} review request(s) failed after all retries ({error})" if failed else None
    return Step(name, "review", out, report, not was_noop(before, step_meta(out)), unfinished)


def judge_step(args: RunArgs, answer_files: list[str], mode: str, out: Path, cache: Path) -> Step:
    """eval/judge.py in one mode. As for reviews, the run applies the checks; a failed request leaves the step
    unfinished here (judge.py itself asks it again on the next invocation)."""
    name = f"{JUDGE_DIR}/{mode}"
    print(f"{STAGE}: {name}: eval/judge.py", file=sys.stderr)
    before = step_meta(out)
    report, _ = call(script("judge").main, mode=mode, question_file=args.inputs.question_file,
                     answer_files=answer_files, baseline=args.judging.baseline if mode == "pairwise" else "",
                     reference_file=args.judging.reference_file, prompts=args.judging.prompts,
                     max_tokens=args.judging.judge_max_tokens, **judge_flags(args, cache), output_dir=str(out),
                     overwrite=args.folder.overwrite, max_unparsed=1.0, strict=False)
    failed = report["failed"]
    unfinished = f"{failed} judgment request(s) failed after all retries" if failed else None
    return Step(name, "judge", out, report, not was_noop(before, step_meta(out)), unfinished)


# -- counts, checks ------------------------------------------------------------------------------------------------


def step_record(step: Step, folder: Path) -> dict:
    """What summary.json says of a step: where its files are, how many outputs, how many could not be parsed
    (the first few with their reasons) or failed, and its requests."""
    r = step.report
    if step.kind == "answers":
        items, unparsed, failed, rows = r["questions"], None, r["failed"], []
    elif step.kind == "review":
        items, unparsed, failed = r["questions"], r["unparsed"]["count"], r["failed"]["count"]
        rows = [{"question_id": u["question_id"], "where": u["where"], "reason": u["error"]}
                for u in r["unparsed"]["rows"][:SHOWN]]
    else:
        items, unparsed, failed = r["judgments"], r["unparsed"], r["failed"]
        rows = [{"question_id": u["question_id"], "key": u["key"], "reason": u["reason"]}
                for u in r["not_scored"] if u["status"] == "unparsed"][:SHOWN]
    recorded = {k: int((r.get("requests") or {}).get(k, 0)) for k in COUNTS}
    return {"kind": step.kind, "folder": step.folder.relative_to(folder).as_posix(), "items": items,
            "unparsed": unparsed, "unparsed_fraction": (unparsed / items if items and unparsed is not None else 0.0),
            "unparsed_examples": rows, "failed": failed, "ran": step.ran,
            "requests": recorded, "requests_sent": recorded if step.ran else {k: 0 for k in COUNTS}}


def checks(steps: dict[str, dict], policy: UnparsedChecks) -> dict:
    """The verdict on the outputs: a step with more than --max_unparsed of its outputs unparsed, or any with
    --strict, fails the run (after everything is written)."""
    problems = []
    for name, s in steps.items():
        if not s["unparsed"]:
            continue
        what = f"{name}: {s['unparsed']} of {s['items']} judge output(s) ({s['unparsed_fraction']:.1%}) could not be "\
               f"parsed (kept in {s['folder']}, with their parse errors)"
        if policy.strict:
            problems.append(f"--strict: {what}")
        elif s["unparsed_fraction"] > policy.max_unparsed:
            problems.append(f"{what}, more than --max_unparsed {policy.max_unparsed:g}")
    return {"max_unparsed": policy.max_unparsed, "strict": policy.strict, "passed": not problems,
            "problems": problems}


def raise_outcome(summary: dict) -> None:
    if not summary["checks"]["passed"]:
        raise SuiteError("\n".join(summary["checks"]["problems"]) + "\neverything is written (see summary.json)")


def sum_counts(records: list[dict]) -> dict:
    return {k: sum(r[k] for r in records) for k in COUNTS}


# -- scores, rankings ---------------------------------------------------------------------------------------------


def review_scores(report: dict) -> dict:
    """Per model, LLMZoo's figures of one review: mean rank (order mode), mean score, LLMZoo's rank in
    ordering.txt, and against the reference its wins / ties / losses. None where no verdict was read at all
    (LLMZoo's means would be 0 there: its denominator counts unparsed reviews)."""
    from utils.evaluation.llmzoo import REFERENCE_KEY, REFERENCE_NAME

    models, metric, horizontal = report["models"], report["metric"] or {}, report["horizontal"]
    reference = None if horizontal else models[0]
    counted = report.get("counted") or 0
    ranks = {(reference if row[0] == REFERENCE_NAME and reference else row[0]): row[2]
             for row in report.get("ordering") or []}
    out = {}
    for model in models:
        if model == reference:
            any_entry = next(iter(metric.values()), {})
            entry = {"mean_rank": (any_entry.get("order") or {}).get(REFERENCE_KEY),
                     "mean_score": (any_entry.get("score") or {}).get(REFERENCE_KEY), "reference": True}
        elif horizontal:
            entry = {"mean_rank": metric.get(model, {}).get("order"), "mean_score": metric.get(model, {}).get("score")}
        else:
            m = metric.get(model, {})
            win = m.get("winning") or {}
            entry = {"mean_rank": (m.get("order") or {}).get("model"), "mean_score": (m.get("score") or {}).get("model"),
                     "vs_reference": {"wins": win.get("model"), "ties": win.get("tie"),
                                      "losses": win.get(REFERENCE_KEY), "win_share": win.get("%model")}}
        entry["llmzoo_rank"] = ranks.get(model)
        if not counted:
            entry.update(mean_rank=None, mean_score=None, llmzoo_rank=None)
        out[model] = entry
    return {"mode": report["mode"], "reference": reference, "questions": report["questions"],
            "denominator": report["denominator"], "counted": counted, "models": out}


def scores_of(steps: list[Step]) -> dict:
    out = {}
    for s in steps:
        if s.kind == "review":
            out[s.name] = review_scores(s.report)
        elif s.kind == "judge":
            out[s.name] = {"mode": s.report["mode"], "baseline": s.report["baseline"], "models": s.report["results"]}
    return out


def ranking_sources(steps: list[Step]) -> list[tuple[str, str, Path]]:
    """(name, kind, file) of every source of battles: order-mode reviews and pairwise judgments."""
    out = []
    for s in steps:
        if s.kind == "review" and s.report["mode"] == "order":
            out.append((s.name, "reviews", s.folder / "review.jsonl"))
        elif s.kind == "judge" and s.report["mode"] != "single":
            out.append((s.name, "battles", s.folder / "battles.jsonl"))
    return out


def rank_all(steps: list[Step], args: RunArgs, folder: Path) -> dict:
    """Bradley-Terry and online Elo with bootstrap intervals (``utils.evaluation.ranking.rankings``), per source
    and, with several sources, of all their battles pooled. A source without a battle (every verdict unparsed)
    says so instead."""
    from utils.evaluation.ranking import read_battles, read_review_battles, rankings

    sources, pooled = {}, []
    for name, kind, path in ranking_sources(steps):
        rel = path.relative_to(folder).as_posix()
        try:
            src = read_review_battles(str(path), "") if kind == "reviews" else read_battles(str(path), "")
        except SuiteError as exc:
            why = str(exc).replace(str(path), rel).strip()  # the run folder's own path, wherever it lies
            sources[name] = {"file": rel, "battles": 0, "result": None, "why_none": why}
            print(f"{STAGE}: no ranking from {name}: {why}", file=sys.stderr)
            continue
        result = rankings(src.battles, bootstrap=args.ranking.bootstrap, seed=args.ranking.seed)
        entry = {"file": rel, "battles": len(src.battles), "result": result}
        if src.unparsed is not None:
            entry.update(reviews_without_order=len(src.unparsed), reviews_skipped=len(src.skipped))
        sources[name] = entry
        pooled.append((name, src.battles))
    out = {"sources": sources, "pooled": None}
    if len(pooled) > 1:
        battles = [b for _, bs in pooled for b in bs]
        out["pooled"] = {"sources": [n for n, _ in pooled], "battles": len(battles),
                         "note": "the battles of every source together, as independent outcomes (a pair judged on "
                                 "several dimensions counts once per dimension, so the intervals are narrower than "
                                 "the evidence warrants); each source's own ranking is beside it",
                         "result": rankings(battles, bootstrap=args.ranking.bootstrap, seed=args.ranking.seed)}
    primary = "pooled" if out["pooled"] else next((n for n, s in sources.items() if s["result"]), None)
    out["figure"] = {"file": PLOT_FILE, "shows": primary}
    return out


def primary_ranking(ranks: dict) -> tuple[str, dict] | None:
    shown = ranks["figure"]["shows"]
    if shown is None:
        return None
    return ("pooled", ranks["pooled"]["result"]) if shown == "pooled" else (shown, ranks["sources"][shown]["result"])


def draw(ranks: dict, folder: Path) -> list[str]:
    """rankings.png (the pooled ranking, or the only one; a figure saying why there is none otherwise) and one
    figure per ranked source in rankings/. Returns the files written."""
    from utils.evaluation.ranking import plot_rankings

    written = []
    (folder / PLOTS_DIR).mkdir(exist_ok=True)
    for name, source in ranks["sources"].items():
        if source["result"] is not None:
            path = folder / PLOTS_DIR / f"{name.replace('/', '-')}.png"
            plot_rankings(source["result"], path)
            written.append(path.relative_to(folder).as_posix())
    primary = primary_ranking(ranks)
    if primary is not None:
        plot_rankings(primary[1], folder / PLOT_FILE)
    else:
        reasons = [s["why_none"] for s in ranks["sources"].values()] or \
            ["no source of battles: rankings need order-mode reviews or pairwise judgments"]
        empty_figure(folder / PLOT_FILE, "No ranking: no battle to rank", reasons)
    return written + [PLOT_FILE]


def empty_figure(path: Path, title: str, lines: list[str]) -> None:
    """A PNG that says why there is no ranking (the folder has the same files, whatever the judge said)."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    text = "\n".join(w for line in lines for w in textwrap.wrap(line, 100)[:4])
    fig = Figure(figsize=(10, 1.5 + 0.25 * text.count("\n")), dpi=100)
    FigureCanvasAgg(fig)
    fig.text(0.02, 0.95, title, fontsize=12, va="top")
    fig.text(0.02, 0.80, text, fontsize=8, va="top", family="monospace")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:6]}")
    try:
        fig.savefig(str(tmp), format="png", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- the summary and its tables ---------------------------------------------------------------------------------


def finish(args: RunArgs, plan: Plan, folder: Path, name: str, steps: list[Step]) -> dict:
    """After the steps: stop (unfinished, exit 1) if requests failed; else rank, write summary.json, results.md,
    results.csv, rankings.png, and pipeline.json last (complete)."""
    records = {s.name: step_record(s, folder) for s in steps}
    sent = sum_counts([r["requests_sent"] for r in records.values()])
    print(f"{STAGE}: this invocation sent {sent['requests']} request(s) ({sent['cached']} from the cache, "
          f"{sent['failed']} failed)", file=sys.stderr)
    for step_name, r in records.items():
        if r["unparsed"]:
            print(f"{STAGE}: {step_name}: {r['unparsed']} of {r['items']} judge output(s) could not be parsed, kept "
                  f"verbatim in {r['folder']}: " + "; ".join(f"{e['question_id']!r}: {e['reason']}"
                                                               for e in r["unparsed_examples"]), file=sys.stderr)
    unfinished = [f"{s.name}: {s.unfinished}" for s in steps if s.unfinished]
    if unfinished:
        raise SuiteError("the run did not finish:\n  " + "\n  ".join(unfinished) + "\neverything received is kept; "
                         "re-run the same command to ask only what is missing")
    ranks = rank_all(steps, args, folder)
    inputs = json.loads(json.dumps(plan.inputs))
    for record, a in zip(inputs["answer_sets"], plan.answers):
        if a.spec is not None:  # made here: its file as it now is, beside the settings that made it
            record["generated"]["file"] = file_record(a.path)
    summary = {
        "run": name,
        "fingerprint": plan.fingerprint,
        "judge": {"base_url": args.judge.judge_base_url, "model": args.judge.judge_model},
        "models": plan.models,
        "inputs": inputs,
        "steps": records,
        "requests": {"total": sum_counts([r["requests"] for r in records.values()]), "last_invocation": sent,
                     "note": "total: each step's counts as its report records them (a step that had nothing to do "
                             "keeps the counts of the invocation that did it); last_invocation: what the invocation "
                             "that wrote this summary sent"},
        "unparsed": {n: {"count": r["unparsed"], "of": r["items"], "fraction": r["unparsed_fraction"],
                         "examples": r["unparsed_examples"]} for n, r in records.items() if r["unparsed"] is not None},
        "scores": scores_of(steps),
        "rankings": ranks,
        "checks": checks(records, args.checks),
    }
    draw(ranks, folder)
    write_text(folder / RESULTS_MD, results_md(summary))
    write_text(folder / RESULTS_CSV, results_csv(summary))
    write_json(folder / SUMMARY_FILE, summary)
    write_meta(folder, {"stage": STAGE, "fingerprint": plan.fingerprint, "args": resolved_config(args, plan),
                        "inputs": inputs}, recorded_files(folder))
    return summary


def recorded_files(folder: Path) -> dict[str, str]:
    """The hash of every file of the run (every step's included), not the judge cache nor locks / temporaries."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (not path.is_file() or rel.parts[0] == CACHE_DIR or any(transient(p) for p in rel.parts)
                or rel.as_posix() == META_FILE):
            continue
        out[rel.as_posix()] = sha256_file(path)
    return out


def write_text(path: Path, text: str) -> None:
    """Atomically, through eval/review.py's writer (unchanged content: the file is not touched)."""
    script("review").write_text(path, text)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def score_columns(summary: dict) -> list[tuple[str, str, str]]:
    """(step, field, header) of the per-model score columns."""
    cols = []
    for step, s in summary["scores"].items():
        if step.startswith(REVIEW_DIR + "/"):
            dim = step.split("/", 1)[1]
            if s["mode"] == "order":
                cols.append((step, "mean_rank", f"{dim}: mean rank (LLMZoo, lower is better)"))
            else:
                cols.append((step, "mean_score", f"{dim}: mean score (LLMZoo)"))
        elif s["mode"] == "single":
            cols.append((step, "mean_rating", "single: mean rating (1-10)"))
        else:
            against = f" vs {s['baseline']}" if s["baseline"] else ""
            cols.append((step, "win_rate_adjusted", f"{s['mode']}{against}: win rate (tie = half)"))
    return cols


def ci_text(fit: dict) -> str:
    if fit["ci_low"] is None:
        return f"{fit['rating']:.1f}"
    return f"{fit['rating']:.1f} [{fit['ci_low']:.1f}, {fit['ci_high']:.1f}]"


def results_md(summary: dict) -> str:
    """The tables a person reads (also printed on stderr): scores per model, each ranking, the steps' counts."""
    judge = summary["judge"]
    lines = [f"# Evaluation run {summary['run']}", "",
             f"Judge: {judge['model']} at {judge['base_url']}; fingerprint {summary['fingerprint'][:12]}.", ""]
    cols = score_columns(summary)
    primary = primary_ranking(summary["rankings"])
    heads = ["model", *(c[2] for c in cols)]
    if primary is not None:
        heads.append(f"Bradley-Terry [95% CI] ({primary[0]})")
    lines += ["## Scores", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for model in summary["models"]:
        row = [model]
        for step, field, _ in cols:
            row.append(fmt((summary["scores"][step]["models"].get(model) or {}).get(field)))
        if primary is not None:
            fit = primary[1]["models"].get(model)
            row.append(ci_text(fit["bt"]) if fit else "-")
        lines.append("| " + " | ".join(row) + " |")
    ranks = summary["rankings"]
    named = [(n, s["result"], s["battles"], s.get("why_none")) for n, s in ranks["sources"].items()]
    if ranks["pooled"]:
        named.append(("pooled (" + " + ".join(ranks["pooled"]["sources"]) + ")", ranks["pooled"]["result"],
                      ranks["pooled"]["battles"], None))
    for name, result, battles, why in named:
        lines += ["", f"## Ranking: {name}, {battles} battles", ""]
        if result is None:
            lines.append(f"No ranking: {why}")
            continue
        lines += ["| rank | rank (CI) | model | Bradley-Terry [95% CI] | online Elo [95% CI] | wins / ties / losses |",
                  "|---|---|---|---|---|---|"]
        for model, r in result["models"].items():
            lines.append(f"| {r['rank']} | {fmt(r['rank_ci'])} | {model} | {ci_text(r['bt'])} | {ci_text(r['elo'])} "
                         f"| {r['wins']} / {r['ties']} / {r['losses']} |")
    lines += ["", "## Steps", "",
              "| step | outputs | unparsed | failed | requests sent | from the cache |", "|---|---|---|---|---|---|"]
    for name, s in summary["steps"].items():
        lines.append(f"| {name} | {s['items']} | {fmt(s['unparsed'])} | {s['failed']} | {s['requests']['requests']} "
                     f"| {s['requests']['cached']} |")
    return "\n".join(lines) + "\n"


def results_csv(summary: dict) -> str:
    """The same figures, one per row: table, source, model, metric, value, ci_low, ci_high."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "source", "model", "metric", "value", "ci_low", "ci_high"])
    for step, s in summary["scores"].items():
        for model, values in s["models"].items():
            for metric, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
                    writer.writerow(["score", step, model, metric, "" if value is None else value, "", ""])
    ranks = summary["rankings"]
    named = [(n, s["result"]) for n, s in ranks["sources"].items() if s["result"]]
    if ranks["pooled"]:
        named.append(("pooled", ranks["pooled"]["result"]))
    for name, result in named:
        for model, r in result["models"].items():
            for fit in ("bt", "elo"):
                writer.writerow(["ranking", name, model, fit, r[fit]["rating"],
                                 "" if r[fit]["ci_low"] is None else r[fit]["ci_low"],
                                 "" if r[fit]["ci_high"] is None else r[fit]["ci_high"]])
            writer.writerow(["ranking", name, model, "rank", r["rank"], "", ""])
            writer.writerow(["ranking", name, model, "rank_ci", "" if r["rank_ci"] is None else r["rank_ci"], "", ""])
    for name, s in summary["steps"].items():
        for metric in ("items", "unparsed", "failed"):
            writer.writerow(["counts", name, "", metric, "" if s[metric] is None else s[metric], "", ""])
        for metric in ("requests", "cached"):
            writer.writerow(["counts", name, "", metric, s["requests"][metric], "", ""])
    return buffer.getvalue()



if __name__ == "__main__":
    run(main)
