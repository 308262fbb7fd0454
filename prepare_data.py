"""Data stage: instruction and conversation files to a tokenized, correctly masked training set.

Reads alpaca, ShareGPT/Phoenix, OpenAI ``messages``, MOSS and ChatGLM prompt/response(/history) data
(JSON or JSONL, several files may be mixed), renders every example with a prompt or conversation
template, tokenizes it once with the base model's tokenizer and labels each token from the template's
spans. Writes a folder that ``finetune.py`` reads by path:

    OUTPUT_DIR/dataset/{train,validation}   tokenized rows (input_ids, labels, length, source, line)
    OUTPUT_DIR/template.json                the full template used
    OUTPUT_DIR/tokenizer/                   the tokenizer used
    OUTPUT_DIR/data_report.json             row outcomes, bad rows by category with file:line,
                                            length histogram, trained-token ratio per source
    OUTPUT_DIR/pipeline.json                resolved arguments, input hashes, fingerprint (written last)

Examples:
    python prepare_data.py --base_model ../shared/models/stories260K/hf \\
        --data_path ../shared/data/alpaca/gsm8k_train.json --output_dir runs/gsm8k --inspect 2
    python prepare_data.py --base_model MODEL --data_path AdvertiseGen/train.json --output_dir runs/adgen \\
        --prompt_column content --response_column summary
    python prepare_data.py --base_model MODEL --data_path moss.jsonl --output_dir runs/moss --mask_mode moss
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from utils.errors import SuiteError, UsageError
from utils.cli import run

FORMAT_TEMPLATE = {"alpaca": "alpaca", "moss": "moss", "pair": "chatglm"}  # sharegpt/openai: see resolve_template
BATCH = 512


def main(
    base_model: str,
    data_path: list[str],
    output_dir: str,
    *,
    prompt_template_name: str = "auto",
    data_format: Literal["auto", "alpaca", "sharegpt", "openai", "moss", "pair"] = "auto",
    prompt_column: str = "prompt",
    response_column: str = "response",
    history_column: str = "history",
    cutoff_len: int = 256,
    on_overlength: Literal["truncate", "drop", "error"] = "truncate",
    train_on_inputs: bool = False,
    mask_mode: Literal["assistant", "moss"] = "assistant",
    val_set_size: float = 0.05,
    seed: int = 42,
    strict: bool = False,
    max_bad_fraction: float = 0.01,
    log_bad_rows: bool = False,
    inspect: int = 0,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> None:
    """Tokenize and mask instruction / conversation data for fine-tuning.

    Args:
        base_model: Local model folder whose tokenizer is used (nothing is downloaded).
        data_path: One or more JSON / JSONL files (``--data_path a.json b.jsonl``); formats may be mixed.
        output_dir: Folder to write; re-running with the same inputs is a no-op.
        prompt_template_name: Built-in template (alpaca, alpaca_legacy, alpaca_short, vigogne, vicuna_v1.1,
            phoenix, moss, chatglm, llama2, chatml, tokenizer) or a path to a template JSON. With ``auto``,
            alpaca for alpaca data, moss for MOSS, chatglm for prompt/response pairs, and for ShareGPT /
            OpenAI conversations the tokenizer's chat_template if it has one, else vicuna_v1.1.
        data_format: Record format of every file; ``auto`` detects it per file from its records.
        prompt_column: ``pair`` format: the prompt field (ADGEN: ``content``).
        response_column: ``pair`` format: the response field (ADGEN: ``summary``).
        history_column: ``pair`` format: field holding earlier ``[query, response]`` pairs, if present.
        cutoff_len: Maximum tokens per example.
        on_overlength: What to do with longer examples: ``truncate`` (at the last whole assistant turn
            that fits, else mid-response; never to zero trained tokens), ``drop`` (counted) or ``error``.
        train_on_inputs: Put loss on every token, prompts included (alpaca-lora's flag; default: only
            responses are trained).
        mask_mode: ``assistant``: loss on assistant turns only. ``moss``: MOSS's recipe, everything
            except the meta instruction and tool-result bodies.
        val_set_size: Validation examples: a count (>= 1), a fraction (< 1), or 0 for none.
        seed: Seed of the train / validation split.
        strict: Stop at the first malformed row (with its file and line) instead of skipping it.
        max_bad_fraction: Fail before writing if more than this fraction of rows are malformed.
        log_bad_rows: Also print the content of malformed rows (off by default: data may be private).
        inspect: Print this many prepared examples with trained and masked tokens told apart.
        trust_remote_code: Allow the tokenizer's custom code from base_model to run.
        overwrite: Replace an output_dir that holds a different prepared dataset.
    """
    args = dict(locals())
    validate_args(**args)
    from utils.artifacts import claim_output_dir

    claim_output_dir(output_dir, "prepare_data", overwrite)  # before any work (fingerprints come later)
    with interruptible(output_dir) as progress:
        from utils.artifacts import check_output_dir

        tokenizer = load_tokenizer(base_model, trust_remote_code)
        sources, examples = read_sources(data_path, data_format, prompt_column, response_column, history_column)
        template = resolve_template(prompt_template_name, [s["format"] for s in sources], data_path, tokenizer)
        mode = "all" if train_on_inputs else mask_mode
        fingerprint = progress["fingerprint"] = compute_fingerprint(args, sources, base_model, template)
        if check_output_dir(output_dir, "prepare_data", fingerprint, overwrite):
            print(f"prepare_data: {output_dir} already holds this dataset (fingerprint {fingerprint[:12]}); "
                  "nothing to do", file=sys.stderr)
            report = json.loads((Path(output_dir) / "data_report.json").read_text(encoding="utf-8"))
            print_summary(report, sys.stderr)
        else:
            warn_context_length(base_model, cutoff_len)
            encoded, errors = encode_all(examples, tokenizer, template, cutoff_len, on_overlength, mode, strict,
                                         log_bad_rows)
            report = build_report(sources, examples, encoded, errors, cutoff_len)
            check_quality(report, errors, max_bad_fraction)
            write_output(output_dir, args, sources, base_model, tokenizer, template, encoded, report,
                         val_set_size, seed, fingerprint, mode)
            print_summary(report, sys.stderr)
    if inspect:
        show_examples(output_dir, inspect)
    print(os.path.abspath(output_dir))


@contextlib.contextmanager
def interruptible(output_dir: str):
    """SIGTERM or Ctrl-C while preparing: say what is kept and exit 143 / 130, without a traceback. The output
    folder is written whole at the end (a temporary sibling renamed into place) or not at all, so an
    interrupted run leaves nothing behind and a re-run starts over. Yields a dict for the run's fingerprint."""
    import threading

    state: dict = {"fingerprint": None}  # set by main once known: tells this run's output from an older one
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield state
        return

    def stop(signum, frame):
        name = signal.Signals(signum).name
        raise Interrupted(name, 128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    except Interrupted as exc:
        from utils.artifacts import read_meta

        meta = read_meta(output_dir) or {}
        complete = meta.get("stage") == "prepare_data" and meta.get("complete")
        if complete and state["fingerprint"] and meta.get("fingerprint") == state["fingerprint"]:
            kept = f"{output_dir} holds this complete prepared dataset (re-running the command is a no-op)"
        elif complete:
            kept = f"{output_dir} still holds the earlier prepared dataset, unchanged; nothing new was written"
        else:
            kept = (f"nothing was written to {output_dir} (the prepared folder is written whole at the end); "
                    "there is nothing to resume: run the same command again to start over")
        print(f"prepare_data: interrupted by {exc.name} while preparing the data; {kept}", file=sys.stderr)
        raise SystemExit(exc.code) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Interrupted(BaseException):
    """Raised by the signal handler; a BaseException so that no ``except Exception`` on the way swallows it."""

    def __init__(self, name: str, code: int):
        super().__init__(name)
        self.name, self.code = name, code


def warn_context_length(base_model: str, cutoff_len: int) -> None:
    """Warn when examples may be longer than the model can attend to (read from its config.json)."""
    try:
        config = json.loads((Path(base_model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    limit = next((config[k] for k in ("max_position_embeddings", "n_positions", "seq_length") if k in config), None)
    if isinstance(limit, int) and cutoff_len > limit:
        print(f"prepare_data: warning: --cutoff_len {cutoff_len} exceeds the model's context of {limit} tokens "
              f"({base_model}/config.json)", file=sys.stderr)


def validate_args(**a) -> None:
    """Collect every problem with the arguments and raise once."""
    from utils.data.records import missing_path_message
    from utils.weights.folders import missing_folder, tokenizer_problems

    problems = []
    base = Path(a["base_model"])
    if not base.is_dir():
        problems.append(missing_folder(a["base_model"], "--base_model"))
    else:
        problems += tokenizer_problems(a["base_model"])  # the same check and words as every loading stage
    if not a["data_path"]:
        problems.append("--data_path: give at least one file")
    for p in a["data_path"]:
        if not Path(p).is_file():
            problems.append(f"--data_path {p}: a folder, not a data file" if Path(p).is_dir() else
                            missing_path_message("--data_path", p, "file"))
    out = Path(a["output_dir"]).absolute()
    for p in a["data_path"]:
        if Path(p).absolute() == out:
            problems.append(f"--output_dir {a['output_dir']} is an input file")
    if out == base.absolute():
        problems.append("--output_dir must not be the base model folder")
    if a["cutoff_len"] < 2:
        problems.append(f"--cutoff_len must be at least 2, got {a['cutoff_len']}")
    v = a["val_set_size"]
    if v < 0 or (v >= 1 and v != int(v)):
        problems.append(f"--val_set_size must be 0, a fraction below 1, or a whole count; got {v}")
    if not 0 <= a["max_bad_fraction"] <= 1:
        problems.append(f"--max_bad_fraction must be between 0 and 1, got {a['max_bad_fraction']}")
    if a["inspect"] < 0:
        problems.append(f"--inspect must be >= 0, got {a['inspect']}")
    if a["train_on_inputs"] and a["mask_mode"] != "assistant":
        problems.append("--train_on_inputs trains every token; it cannot be combined with --mask_mode moss")
    if problems:
        raise UsageError("\n".join(problems))


def load_tokenizer(base_model: str, trust_remote_code: bool):
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


def read_sources(paths, data_format, prompt_column, response_column, history_column):
    from utils.artifacts import sha256_file
    from utils.data.records import Columns, load_examples

    columns = Columns(prompt_column, response_column, history_column)
    sources, examples = [], []
    for i, path in enumerate(paths):
        fmt, rows = load_examples(path, data_format, columns)
        sources.append({"path": os.path.abspath(path), "sha256": sha256_file(path), "format": fmt, "rows": len(rows)})
        examples.append(rows)
        print(f"prepare_data: {path}: {len(rows)} rows, format {fmt}", file=sys.stderr)
    return sources, examples


def resolve_template(name: str, formats: list[str], paths: list[str], tokenizer):
    from utils.data.templates import load_template

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


def compute_fingerprint(args, sources, base_model, template) -> str:
    from utils.artifacts import sha256_json, tokenizer_fingerprint

    # Everything that changes the output, nothing that does not (paths, --inspect, logging).
    relevant = {k: v for k, v in args.items() if k not in ("base_model", "data_path", "output_dir", "inspect",
                                                             "log_bad_rows", "overwrite", "trust_remote_code")}
    return sha256_json({
        "stage": "prepare_data",
        "args": relevant,
        "inputs": [(s["sha256"], s["format"]) for s in sources],
        "tokenizer": tokenizer_fingerprint(base_model),
        "template": template.to_json(),
    })


def encode_all(examples, tokenizer, template, cutoff_len, on_overlength, mode, strict, log_bad_rows):
    """Encode every parsed row. Returns (encoded rows, row errors) in input order."""
    from tqdm import tqdm

    from utils.data.records import POLICY_DROPS, DataError, RowError
    from utils.data.encode import Encoder
    from utils.training.tracking import on_terminal

    encoder = Encoder(tokenizer, template, cutoff_len=cutoff_len, on_overlength=on_overlength, mask_mode=mode)
    flat = [(src, row) for src, rows in enumerate(examples) for row in rows]
    encoded, errors = [], []

    def fail_or_count(src: int, err: RowError) -> None:
        # --strict is about malformed rows; a length-policy drop is fatal only under --on_overlength error.
        fatal = (strict and err.category not in POLICY_DROPS) or (err.category == "overlength" and on_overlength == "error")
        if log_bad_rows:
            content = json.dumps(err.raw, ensure_ascii=False, default=str)
            print(f"prepare_data: bad row {err}\n  row: {content[:4000]}", file=sys.stderr)
        if fatal:
            hint = "" if err.category == "overlength" else " (drop --strict to skip and count malformed rows)"
            raise DataError(f"{err}{hint}")
        errors.append((src, err))

    with tqdm(total=len(flat), desc="tokenizing", unit="row", file=sys.stderr, disable=not on_terminal()) as bar:
        for start in range(0, len(flat), BATCH):
            chunk = flat[start:start + BATCH]
            results = iter(encoder.encode_batch([ex for _, ex in chunk if not isinstance(ex, RowError)]))
            for src, ex in chunk:  # in file order, so --strict stops at the first bad row
                res = ex if isinstance(ex, RowError) else next(results)
                if isinstance(res, RowError):
                    fail_or_count(src, res)
                else:
                    encoded.append((src, res))
            bar.update(len(chunk))
    return encoded, errors


def build_report(sources, examples, encoded, errors, cutoff_len) -> dict:
    import numpy as np

    from utils.data.records import POLICY_DROPS, ROW_ERRORS

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
    lengths_arr = np.asarray(lengths or [0])
    edges = [round(cutoff_len * k / 8) for k in range(9)] + [cutoff_len * 2, cutoff_len * 4]
    counts = [int(((lengths_arr > lo) & (lengths_arr <= hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    counts.append(int((lengths_arr > edges[-1]).sum()))
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
        "length_histogram": {
            "note": "tokens per example before truncation (kept and length-dropped); bins are (lo, hi]",
            "edges": edges, "counts": counts,
        },
        "length_percentiles": {f"p{q}": int(np.percentile(lengths_arr, q)) for q in (50, 90, 99, 100)},
    }


def check_quality(report, errors, max_bad_fraction) -> None:
    from utils.data.records import POLICY_DROPS, DataError, bad_fraction_error

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


def write_output(output_dir, args, sources, base_model, tokenizer, template, encoded, report, val_set_size, seed,
                 fingerprint, mode) -> None:
    import numpy as np
    import datasets
    from datasets import Dataset, DatasetDict, Features, Sequence, Value

    from utils.artifacts import finish_meta, library_versions, staged_dir, tokenizer_fingerprint, write_json

    n = len(encoded)
    n_val = int(val_set_size) if val_set_size >= 1 else int(round(n * val_set_size))
    if n_val >= n:
        raise SuiteError(f"--val_set_size {val_set_size} leaves no training example ({n} usable examples)")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
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

    report["splits"] = {"train": len(train_idx), "validation": len(val_idx), "seed": seed}
    report["template"] = template.name
    report["mask_mode"] = mode
    datasets.disable_progress_bars()  # a per-split "Saving" bar for a few MB is noise
    with staged_dir(output_dir) as tmp:
        splits = {"train": to_dataset(train_idx)}
        if val_idx:  # datasets cannot load an empty split back, so --val_set_size 0 writes none
            splits["validation"] = to_dataset(val_idx)
        DatasetDict(splits).save_to_disk(str(tmp / "dataset"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_json(tmp / "template.json", template.to_json())
        write_json(tmp / "data_report.json", report)
        finish_meta(tmp, {
            "stage": "prepare_data",
            "fingerprint": fingerprint,
            "args": args,
            "base_model": {"path": os.path.abspath(base_model), "tokenizer_files": tokenizer_fingerprint(base_model)},
            "template": {"name": template.name, "file": "template.json"},
            "tokenizer": "tokenizer",
            "dataset": "dataset",
            "mask_mode": mode,
            "inputs": sources,
            "versions": library_versions("transformers", "tokenizers", "datasets"),
        })


def print_summary(report, file) -> None:
    t = report["totals"]
    print(f"prepare_data: {t['kept']} examples from {t['rows']} rows "
          f"(train {report['splits']['train']}, validation {report['splits']['validation']}); "
          f"bad {t['bad']}, dropped {t['dropped']}, truncated {t['truncated']}; "
          f"trained tokens {t['trained_tokens']}/{t['tokens']}", file=file)
    for s in report["sources"]:
        print(f"  {s['path']}: {s['format']}, kept {s['kept']}/{s['rows']}, trained-token ratio {s['trained_ratio']}, "
              f"bad {s['bad'] or 0}, dropped {s['dropped'] or 0}", file=file)


def show_examples(output_dir: str, n: int) -> None:
    """Print ``n`` prepared training examples; trained text is marked (colour on a terminal)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from utils.data.encode import IGNORE_INDEX

    root = Path(output_dir)
    data = load_from_disk(str(root / "dataset"))["train"]
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    sources = json.loads((root / "data_report.json").read_text(encoding="utf-8"))["sources"]
    color = sys.stdout.isatty()
    on, off = ("\x1b[1;32m", "\x1b[0m") if color else ("⟦", "⟧")
    print("legend: " + (f"{on}trained{off}, plain = masked" if color else "⟦trained⟧, plain = masked (label -100)"))
    for row in data.select(range(min(n, len(data)))):
        ids, labels = row["input_ids"], row["labels"]
        trained = [l != IGNORE_INDEX for l in labels]
        # Decode growing prefixes so SentencePiece spaces and multi-byte characters come out whole.
        pieces, prev_text, start = [], "", 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or trained[i] != trained[start]:
                text = tok.decode(ids[:i], skip_special_tokens=False)
                chunk = text[len(prev_text):] if text.startswith(prev_text) else tok.decode(ids[start:i])
                pieces.append(f"{on}{chunk}{off}" if trained[start] else chunk)
                prev_text, start = text, i
        src = sources[row["source"]]["path"]
        print(f"--- {src}:{row['line']}  tokens {len(ids)}, trained {sum(trained)}")
        print("".join(pieces))


if __name__ == "__main__":
    run(main)
