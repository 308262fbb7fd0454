"""Preparing a data set: instruction and conversation files to a tokenized, correctly masked training set.

The work of ``prepare_data.py``, here because ``finetune.py`` also prepares raw data files (into
OUTPUT_DIR/data) and a stage never imports another stage. ``prepare_dataset(PrepareArgs)`` validates,
claims the output folder before any work, is a no-op when the folder already holds the same dataset,
writes the folder whole (or nothing) and prints a summary on stderr; stdout is left to the caller
(prepare_data.py prints the folder's path there).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from utils.args import Group, StageArgs, unfingerprinted
from utils.artifacts import (Output, library_versions, read_output, sha256_file, sha256_json, tokenizer_fingerprint,
                             write_json)
from utils.data.encode import IGNORE_INDEX, Encoder
from utils.data.records import (POLICY_DROPS, ROW_ERRORS, Columns, DataError, RowError, bad_fraction_error,
                                load_examples, missing_path_message)
from utils.errors import SuiteError, UsageError
from utils.training import tracking
from utils.weights.folders import missing_folder, tokenizer_problems
from utils.data.templates import load_template

STAGE = "prepare_data"
FORMAT_TEMPLATE = {"alpaca": "alpaca", "moss": "moss", "pair": "chatglm"}  # sharegpt/openai: see _resolve_template
BATCH = 512


# -- the flags, by concern ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InputArgs(Group):
    """What is read: the tokenizer's folder and the data files."""

    base_model: str = unfingerprinted(why="a path: the tokenizer counts by the hashes of its files (inputs)")
    data_path: tuple[str, ...] = unfingerprinted(why="paths: each file counts by its hash and format (inputs)")
    trust_remote_code: bool = unfingerprinted(False, why="a permission: it only allows a tokenizer that is "
                                                         "otherwise refused; the tokenizer files count")

    def __post_init__(self):
        if isinstance(self.data_path, list):  # frozen groups hold lists as tuples
            object.__setattr__(self, "data_path", tuple(self.data_path))

    def problems(self) -> list[str]:
        return [] if self.data_path else ["--data_path: give at least one file"]


@dataclass(frozen=True)
class RecordArgs(Group):
    """How the files' records are read."""

    data_format: Literal["auto", "alpaca", "sharegpt", "openai", "moss", "pair"] = "auto"
    prompt_column: str = "prompt"
    response_column: str = "response"
    history_column: str = "history"

    def columns(self) -> Columns:
        return Columns(self.prompt_column, self.response_column, self.history_column)


@dataclass(frozen=True)
class EncodingArgs(Group):
    """How each example becomes tokens and labels."""

    prompt_template_name: str = "auto"
    cutoff_len: int = 256
    on_overlength: Literal["truncate", "drop", "error"] = "truncate"
    train_on_inputs: bool = False
    mask_mode: Literal["assistant", "moss"] = "assistant"

    @property
    def label_mode(self) -> str:
        """The encoder's mask mode: ``all`` under --train_on_inputs."""
        return "all" if self.train_on_inputs else self.mask_mode

    def problems(self) -> list[str]:
        problems = []
        if self.cutoff_len < 2:
            problems.append(f"--cutoff_len must be at least 2, got {self.cutoff_len}")
        if self.train_on_inputs and self.mask_mode != "assistant":
            problems.append("--train_on_inputs trains every token; it cannot be combined with --mask_mode moss")
        return problems


@dataclass(frozen=True)
class SplitArgs(Group):
    """The train / validation split."""

    val_set_size: float = 0.05
    seed: int = 42

    def problems(self) -> list[str]:
        v = self.val_set_size
        if v < 0 or (v >= 1 and v != int(v)):
            return [f"--val_set_size must be 0, a fraction below 1, or a whole count; got {v}"]
        return []


# --strict and --max_bad_fraction write no different bytes: they decide whether a run fails. They count all
# the same: with them out, re-running with a stricter rule on a folder prepared under a looser one would be a
# no-op that accepts an output the stricter command refuses.
_DECIDES_ACCEPTANCE = ("counted although no written byte depends on it: it decides whether this data is "
                       "accepted, so a re-run under another rule is not a no-op on an output that rule may refuse")


@dataclass(frozen=True)
class QualityArgs(Group):
    """What to do with malformed rows."""

    strict: bool = field(default=False, metadata={"why": _DECIDES_ACCEPTANCE})
    max_bad_fraction: float = field(default=0.01, metadata={"why": _DECIDES_ACCEPTANCE})
    log_bad_rows: bool = unfingerprinted(False, why="logging: it prints rows on stderr, writes nothing")

    def problems(self) -> list[str]:
        if not 0 <= self.max_bad_fraction <= 1:
            return [f"--max_bad_fraction must be between 0 and 1, got {self.max_bad_fraction}"]
        return []


@dataclass(frozen=True)
class OutputArgs(Group):
    """Where the folder is written, and what is shown of it."""

    output_dir: str = unfingerprinted(why="where the output is written, not what it holds")
    overwrite: bool = unfingerprinted(False, why="a permission: it only allows replacing what is otherwise refused")
    inspect: int = unfingerprinted(0, why="display: it prints prepared examples after writing, writes nothing")

    def problems(self) -> list[str]:
        return [f"--inspect must be >= 0, got {self.inspect}"] if self.inspect < 0 else []


@dataclass(frozen=True)
class PrepareArgs(StageArgs):
    """prepare_data.py's flags (finetune.py fills the same groups for raw data files)."""

    STAGE = STAGE
    inputs: InputArgs
    records: RecordArgs
    encoding: EncodingArgs
    split: SplitArgs
    quality: QualityArgs
    output: OutputArgs


def fingerprint(args: PrepareArgs, inputs: dict) -> str:
    """The output's fingerprint: the flags that determine it and ``inputs`` (see ``input_hashes``)."""
    return sha256_json({"stage": STAGE, "args": args.fingerprint_values(), "inputs": inputs})


def input_hashes(sources: list[dict], base_model: str, template) -> dict:
    """What identifies the inputs: each data file's hash and format, the tokenizer files, the resolved template."""
    return {
        "data": [(s["sha256"], s["format"]) for s in sources],
        "tokenizer": tokenizer_fingerprint(base_model),
        "template": template.to_json(),
    }


# -- the stage -----------------------------------------------------------------------------------------


def prepare_dataset(args: PrepareArgs) -> None:
    """Validate, claim the output folder, then prepare and write it (or say it is already there)."""
    _check_args(args)
    out = Output(args.output.output_dir, STAGE, args.output.overwrite)  # the claim, before any work
    with _interruptible(args.output.output_dir) as progress:
        tokenizer = _load_tokenizer(args.inputs.base_model, args.inputs.trust_remote_code)
        sources, examples = _read_sources(args.inputs.data_path, args.records)
        template = _resolve_template(args.encoding.prompt_template_name, [s["format"] for s in sources],
                                    args.inputs.data_path, tokenizer)
        fp = progress["fingerprint"] = fingerprint(args, input_hashes(sources, args.inputs.base_model, template))
        if out.up_to_date(fp):
            print(f"prepare_data: {args.output.output_dir} already holds this dataset (fingerprint {fp[:12]}); "
                  "nothing to do", file=sys.stderr)
            report = json.loads((Path(args.output.output_dir) / "data_report.json").read_text(encoding="utf-8"))
        else:
            _warn_context_length(args.inputs.base_model, args.encoding.cutoff_len)
            encoded, errors = _encode_all(examples, tokenizer, template, args.encoding, args.quality)
            report = _build_report(sources, examples, encoded, errors, args.encoding.cutoff_len)
            _check_quality(report, args.quality.max_bad_fraction)
            _write_output(out, fp, args, sources, tokenizer, template, encoded, report)
        _print_summary(report, sys.stderr)
    if args.output.inspect:
        _show_examples(args.output.output_dir, args.output.inspect)


def _check_args(args: PrepareArgs) -> None:
    """Every problem with the arguments, the file system's and each group's, in one UsageError."""
    problems = _path_problems(args.inputs, args.output.output_dir) + args.problems()
    if problems:
        raise UsageError("\n".join(problems))


def _path_problems(inputs: InputArgs, output_dir: str) -> list[str]:
    """The tokenizer folder and data files exist; the output is none of them."""
    problems = []
    base = Path(inputs.base_model)
    if not base.is_dir():
        problems.append(missing_folder(inputs.base_model, "--base_model"))
    else:
        problems += tokenizer_problems(inputs.base_model)  # the same check and words as every loading stage
    for p in inputs.data_path:
        if not Path(p).is_file():
            problems.append(f"--data_path {p}: a folder, not a data file" if Path(p).is_dir() else
                            missing_path_message("--data_path", p, "file"))
    out = Path(output_dir).absolute()
    for p in inputs.data_path:
        if Path(p).absolute() == out:
            problems.append(f"--output_dir {output_dir} is an input file")
    if out == base.absolute():
        problems.append("--output_dir must not be the base model folder")
    return problems


@contextlib.contextmanager
def _interruptible(output_dir: str):
    """SIGTERM or Ctrl-C while preparing: say what is kept and exit 143 / 130, without a traceback. The output
    folder is written whole at the end (a temporary sibling renamed into place) or not at all, so an
    interrupted run leaves nothing behind and a re-run starts over. Yields a dict for the run's fingerprint."""
    state: dict = {"fingerprint": None}  # set once known: tells this run's output from an older one
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield state
        return

    def stop(signum, frame):
        raise _Interrupted(signal.Signals(signum).name, 128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    except _Interrupted as exc:
        print(f"prepare_data: interrupted by {exc.name} while preparing the data; "
              f"{_what_is_kept(output_dir, state['fingerprint'])}", file=sys.stderr)
        raise SystemExit(exc.code) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _what_is_kept(output_dir: str, fingerprint: str | None) -> str:
    """What an interrupted run leaves in ``output_dir``, in words."""
    info = read_output(output_dir)
    complete = info is not None and info.stage == STAGE and info.complete
    if complete and fingerprint and info.fingerprint == fingerprint:
        return f"{output_dir} holds this complete prepared dataset (re-running the command is a no-op)"
    if complete:
        return f"{output_dir} still holds the earlier prepared dataset, unchanged; nothing new was written"
    return (f"nothing was written to {output_dir} (the prepared folder is written whole at the end); "
            "there is nothing to resume: run the same command again to start over")


class _Interrupted(BaseException):
    """Raised by the signal handler; a BaseException so that no ``except Exception`` on the way swallows it."""

    def __init__(self, name: str, code: int):
        super().__init__(name)
        self.name, self.code = name, code


def _warn_context_length(base_model: str, cutoff_len: int) -> None:
    """Warn when examples may be longer than the model can attend to (read from its config.json)."""
    try:
        config = json.loads((Path(base_model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    limit = next((config[k] for k in ("max_position_embeddings", "n_positions", "seq_length") if k in config), None)
    if isinstance(limit, int) and cutoff_len > limit:
        print(f"prepare_data: warning: --cutoff_len {cutoff_len} exceeds the model's context of {limit} tokens "
              f"({base_model}/config.json)", file=sys.stderr)


def _load_tokenizer(base_model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise SuiteError(f"--base_model {base_model}: its tokenizer needs custom code; pass --trust_remote_code "
                             "if you trust it") from None
        raise SuiteError(f"--base_model {base_model}: cannot load tokenizer: {exc}") from None
    except OSError as exc:
        raise SuiteError(f"--base_model {base_model}: cannot load tokenizer: {exc}") from None
    if not tok.is_fast:
        raise SuiteError(f"--base_model {base_model}: a fast tokenizer (tokenizer.json) is required")
    if tok.eos_token_id is None:
        raise SuiteError(f"--base_model {base_model}: the tokenizer has no EOS token")
    return tok


def _read_sources(paths, records: RecordArgs):
    """Parse every file: (one source record per file, with its hash; one list of rows per file)."""
    sources, examples = [], []
    for path in paths:
        fmt, rows = load_examples(path, records.data_format, records.columns())
        sources.append({"path": os.path.abspath(path), "sha256": sha256_file(path), "format": fmt, "rows": len(rows)})
        examples.append(rows)
        print(f"prepare_data: {path}: {len(rows)} rows, format {fmt}", file=sys.stderr)
    return sources, examples


def _resolve_template(name: str, formats: list[str], paths, tokenizer):

    if name != "auto":
        return load_template(name, tokenizer)
    chat_default = "tokenizer" if getattr(tokenizer, "chat_template", None) else "vicuna_v1.1"
    wanted = {fmt: FORMAT_TEMPLATE.get(fmt, chat_default) for fmt in formats}
    if len(set(wanted.values())) > 1:
        detail = "; ".join(f"{p} ({f}) -> {wanted[f]}" for p, f in zip(paths, formats))
        raise UsageError(f"the files call for different templates ({detail}); choose one with --prompt_template_name")
    chosen = next(iter(wanted.values()))
    print(f"prepare_data: template {chosen} (auto, from format {formats[0]})", file=sys.stderr)
    return load_template(chosen, tokenizer)


# -- encoding and the report ---------------------------------------------------------------------------


def _encode_all(examples, tokenizer, template, encoding: EncodingArgs, quality: QualityArgs):
    """Encode every parsed row. Returns (encoded rows, row errors) in input order."""
    from tqdm import tqdm

    encoder = Encoder(tokenizer, template, cutoff_len=encoding.cutoff_len, on_overlength=encoding.on_overlength,
                      mask_mode=encoding.label_mode)
    flat = [(src, row) for src, rows in enumerate(examples) for row in rows]
    encoded, errors = [], []
    with tqdm(total=len(flat), desc="tokenizing", unit="row", file=sys.stderr,
              disable=not tracking.on_terminal()) as bar:
        for start in range(0, len(flat), BATCH):
            chunk = flat[start:start + BATCH]
            results = iter(encoder.encode_batch([ex for _, ex in chunk if not isinstance(ex, RowError)]))
            for src, ex in chunk:  # in file order, so --strict stops at the first bad row
                res = ex if isinstance(ex, RowError) else next(results)
                if isinstance(res, RowError):
                    _fail_or_count(res, encoding, quality)
                    errors.append((src, res))
                else:
                    encoded.append((src, res))
            bar.update(len(chunk))
    return encoded, errors


def _fail_or_count(err: RowError, encoding: EncodingArgs, quality: QualityArgs) -> None:
    """Log a bad row if asked; raise if it stops the run (else the caller counts it)."""
    # --strict is about malformed rows; a length-policy drop is fatal only under --on_overlength error.
    fatal = ((quality.strict and err.category not in POLICY_DROPS)
             or (err.category == "overlength" and encoding.on_overlength == "error"))
    if quality.log_bad_rows:
        content = json.dumps(err.raw, ensure_ascii=False, default=str)
        print(f"prepare_data: bad row {err}\n  row: {content[:4000]}", file=sys.stderr)
    if fatal:
        hint = "" if err.category == "overlength" else " (drop --strict to skip and count malformed rows)"
        raise DataError(f"{err}{hint}")


def _build_report(sources, examples, encoded, errors, cutoff_len) -> dict:
    """data_report.json: row outcomes by source, bad rows by category with file:line, lengths."""
    per, locations, lengths = _source_counts(sources, examples, encoded, errors)
    total_rows = sum(s["rows"] for s in sources)
    n_bad = sum(sum(p["bad"].values()) for p in per)
    return {
        "totals": {
            "rows": total_rows,
            "kept": len(encoded),
            "bad": n_bad,
            "bad_fraction": round(n_bad / total_rows, 6) if total_rows else 0.0,
            "dropped": sum(sum(p["dropped"].values()) for p in per),
            "truncated": sum(p["truncated"] for p in per),
            "tokens": sum(p["tokens"] for p in per),
            "trained_tokens": sum(p["trained_tokens"] for p in per),
        },
        "sources": per,
        "errors": {cat: {"count": sum(p["bad"].get(cat, 0) + p["dropped"].get(cat, 0) for p in per),
                         "meaning": ROW_ERRORS.get(cat) or POLICY_DROPS.get(cat), "first": locs}
                   for cat, locs in locations.items()},
        **_length_stats(lengths, cutoff_len),
    }


def _source_counts(sources, examples, encoded, errors):
    """Per source: kept, bad and dropped by category, truncated, tokens, notes. Also the first locations of
    each error category and every example's full length (kept and length-dropped)."""
    per = [{**s, "kept": 0, "bad": Counter(), "dropped": Counter(), "truncated": 0, "tokens": 0,
            "trained_tokens": 0, "notes": Counter()} for s in sources]
    for src, rows in enumerate(examples):
        for row in rows:
            for note in getattr(row, "notes", []):
                per[src]["notes"][note] += 1
    locations: dict[str, list[str]] = defaultdict(list)
    for src, err in errors:
        bucket = "dropped" if err.category in POLICY_DROPS else "bad"
        per[src][bucket][err.category] += 1
        if len(locations[err.category]) < 10:
            locations[err.category].append(err.where())
    lengths = [err.length for _, err in errors if err.length]
    for src, enc in encoded:
        p = per[src]
        p["kept"] += 1
        p["truncated"] += enc.truncated
        p["tokens"] += len(enc.input_ids)
        p["trained_tokens"] += enc.n_trained
        lengths.append(enc.full_length)
    for p in per:
        p["trained_ratio"] = round(p["trained_tokens"] / p["tokens"], 4) if p["tokens"] else 0.0
        for key in ("bad", "dropped", "notes"):
            p[key] = dict(p[key])
    return per, locations, lengths


def _length_stats(lengths: list[int], cutoff_len: int) -> dict:
    """The report's length histogram (bins relative to --cutoff_len) and percentiles."""
    lengths_arr = np.asarray(lengths or [0])
    edges = [round(cutoff_len * k / 8) for k in range(9)] + [cutoff_len * 2, cutoff_len * 4]
    counts = [int(((lengths_arr > lo) & (lengths_arr <= hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    counts.append(int((lengths_arr > edges[-1]).sum()))
    return {
        "length_histogram": {
            "note": "tokens per example before truncation (kept and length-dropped); bins are (lo, hi]",
            "edges": edges, "counts": counts,
        },
        "length_percentiles": {f"p{q}": int(np.percentile(lengths_arr, q)) for q in (50, 90, 99, 100)},
    }


def _check_quality(report: dict, max_bad_fraction: float) -> None:
    """Fail before writing if no example is usable or too many rows are malformed."""
    t = report["totals"]

    def listing(categories: dict) -> str:
        return "; ".join(f"{cat}: {e['count']} (first at {', '.join(e['first'][:3])})" for cat, e in categories.items())

    # Malformed rows count against --max_bad_fraction; rows dropped by the length policy do not, so the
    # message keeps the two apart.
    malformed = {cat: e for cat, e in report["errors"].items() if cat not in POLICY_DROPS}
    dropped = {cat: e for cat, e in report["errors"].items() if cat in POLICY_DROPS}
    parts = []
    if malformed:
        parts.append(f"Malformed: {listing(malformed)}.")
    if dropped:
        cutoff = report["length_histogram"]["edges"][8]
        parts.append(f"Dropped by the length policy (--cutoff_len {cutoff}, --on_overlength; not counted as "
                     f"malformed): {listing(dropped)}.")
        if sum(e["count"] for e in dropped.values()) > t["kept"]:
            p = report["length_percentiles"]
            parts.append(f"Most examples are longer than --cutoff_len {cutoff} (median {p['p50']}, p90 {p['p90']} "
                         "tokens): raise --cutoff_len.")
    summary = " ".join(parts)
    if t["kept"] == 0:
        raise DataError(f"no usable example in {t['rows']} rows; nothing written. {summary}")
    if message := bad_fraction_error(t["bad"], t["rows"], max_bad_fraction, summary):
        raise DataError(message)


# -- writing and showing -------------------------------------------------------------------------------


def _split_indices(n: int, split: SplitArgs) -> tuple[list[int], list[int]]:
    """(train, validation) row indices, each in input order; the validation rows drawn with --seed."""
    n_val = int(split.val_set_size) if split.val_set_size >= 1 else int(round(n * split.val_set_size))
    if n_val >= n:
        raise SuiteError(f"--val_set_size {split.val_set_size} leaves no training example ({n} usable examples)")
    perm = np.random.default_rng(split.seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def _to_datasets(encoded, train_idx: list[int], val_idx: list[int]):
    """The rows as a datasets.DatasetDict (no validation split when it is empty)."""
    from datasets import Dataset, DatasetDict, Features, Sequence, Value

    features = Features({
        "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
        "length": Value("int32"), "source": Value("int32"), "line": Value("int32"),
    })

    def to_dataset(idx):
        rows = [encoded[i] for i in idx]
        return Dataset.from_dict({
            "input_ids": [e.input_ids for _, e in rows], "labels": [e.labels for _, e in rows],
            "length": [len(e.input_ids) for _, e in rows], "source": [s for s, _ in rows],
            "line": [e.line for _, e in rows],
        }, features=features)

    splits = {"train": to_dataset(train_idx)}
    if val_idx:  # datasets cannot load an empty split back, so --val_set_size 0 writes none
        splits["validation"] = to_dataset(val_idx)
    return DatasetDict(splits)


def _write_output(out: Output, fp: str, args: PrepareArgs, sources, tokenizer, template, encoded, report) -> None:
    """Split, then write the folder whole: dataset, tokenizer, template, report; pipeline.json last."""
    import datasets

    train_idx, val_idx = _split_indices(len(encoded), args.split)
    report["splits"] = {"train": len(train_idx), "validation": len(val_idx), "seed": args.split.seed}
    report["template"] = template.name
    report["mask_mode"] = args.encoding.label_mode
    base_model = args.inputs.base_model
    datasets.disable_progress_bars()  # a per-split "Saving" bar for a few MB is noise
    with out.produce(fp, args=args.flags(),
                     base_model={"path": os.path.abspath(base_model),
                                 "tokenizer_files": tokenizer_fingerprint(base_model)},
                     template={"name": template.name, "file": "template.json"}, tokenizer="tokenizer",
                     dataset="dataset", mask_mode=args.encoding.label_mode, inputs=sources,
                     versions=library_versions("transformers", "tokenizers", "datasets")) as st:
        _to_datasets(encoded, train_idx, val_idx).save_to_disk(str(st.dir / "dataset"))
        tokenizer.save_pretrained(str(st.dir / "tokenizer"))
        write_json(st.dir / "template.json", template.to_json())
        write_json(st.dir / "data_report.json", report)


def _print_summary(report, file) -> None:
    t = report["totals"]
    print(f"prepare_data: {t['kept']} examples from {t['rows']} rows "
          f"(train {report['splits']['train']}, validation {report['splits']['validation']}); "
          f"bad {t['bad']}, dropped {t['dropped']}, truncated {t['truncated']}; "
          f"trained tokens {t['trained_tokens']}/{t['tokens']}", file=file)
    for s in report["sources"]:
        print(f"  {s['path']}: {s['format']}, kept {s['kept']}/{s['rows']}, trained-token ratio {s['trained_ratio']}, "
              f"bad {s['bad'] or 0}, dropped {s['dropped'] or 0}", file=file)


def _show_examples(output_dir: str, n: int) -> None:
    """Print ``n`` prepared training examples; trained text is marked (colour on a terminal)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    root = Path(output_dir)
    data = load_from_disk(str(root / "dataset"))["train"]
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    sources = json.loads((root / "data_report.json").read_text(encoding="utf-8"))["sources"]
    color = sys.stdout.isatty()
    on, off = ("\x1b[1;32m", "\x1b[0m") if color else ("⟦", "⟧")
    print("legend: " + (f"{on}trained{off}, plain = masked" if color else "⟦trained⟧, plain = masked (label -100)"))
    for row in data.select(range(min(n, len(data)))):
        trained = [label != IGNORE_INDEX for label in row["labels"]]
        src = sources[row["source"]]["path"]
        print(f"--- {src}:{row['line']}  tokens {len(row['input_ids'])}, trained {sum(trained)}")
        print(_marked_text(tok, row["input_ids"], trained, on, off))


def _marked_text(tok, ids: list[int], trained: list[bool], on: str, off: str) -> str:
    """The decoded example with each run of trained tokens between ``on`` and ``off``."""
    # Decode growing prefixes so SentencePiece spaces and multi-byte characters come out whole.
    pieces, prev_text, start = [], "", 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = tok.decode(ids[:i], skip_special_tokens=False)
            chunk = text[len(prev_text):] if text.startswith(prev_text) else tok.decode(ids[start:i])
            pieces.append(f"{on}{chunk}{off}" if trained[start] else chunk)
            prev_text, start = text, i
    return "".join(pieces)
