"""Perplexity of any artifact on a text: sliding windows, every token scored once, exactly summed.

Works on everything the loader accepts: a base model, a finetune.py output folder (LoRA unmerged, prefix and
prompt adapters included), a merged or exported model, 8-bit / 4-bit loading. The text is a plain-text file,
or the ``--field`` of each row of a JSON / JSONL file; documents are joined with ``--join`` (Hugging Face's
wikitext recipe joins with blank lines) or scored one by one with ``--per_document``.

The report (JSON, on stdout): ``ppl``, ``nll_per_token``, ``tokens_scored``, ``bits_per_byte`` (comparable
across tokenizers, as lm-eval reports it), ``word_perplexity``, the window and stride, and what was scored
(the artifact's fingerprint, dtype, the data file's hash). With ``--output_dir`` it is also written there
(with ``documents.jsonl`` under ``--per_document``), and an identical re-run is a no-op.

Examples:
    python eval/perplexity.py --base_model ../shared/models/stories260K/hf --data_file stories.txt
    python eval/perplexity.py --lora_weights runs/lora --data_file heldout.jsonl --field output \\
        --max_length 512 --stride 256 --output_dir runs/lora-ppl
"""

from __future__ import annotations

import re
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
from utils.inference.options import ModelLoading, Prompting, plan_loading  # noqa: E402

STAGE = "perplexity"


@dataclass(frozen=True)
class Text(Group):
    """The text scored and how it is cut into documents."""

    data_file: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    field: str = "text"
    join: str = "\n\n"
    per_document: bool = False
    strict: bool = unfingerprinted(False, why="decides whether a bad row stops the run; the rows used are hashed")

    @property
    def separator(self) -> str:
        """--join with ``\\n`` and ``\\t`` read as newline and tab: a shell passes ``--join "\\n\\n"`` as
        backslashes (Hugging Face's recipe writes it so), and ``$'\\n\\n'`` works as well."""
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), self.join)

    def problems(self) -> list[str]:
        if not self.data_file:
            return ["--data_file is required"]
        return [] if Path(self.data_file).is_file() else [f"--data_file {self.data_file}: no such file"]


@dataclass(frozen=True)
class Windows(Group):
    """The sliding windows."""

    max_length: int = 0
    stride: int = 0
    add_bos: bool | None = None
    batch_size: int = unfingerprinted(8, why="windows scored together: the result does not depend on it")
    progress: bool = unfingerprinted(True, why="how progress is shown")

    def problems(self) -> list[str]:
        problems = []
        if self.max_length < 0 or self.max_length == 1:
            problems.append(f"--max_length must be 0 (the model's context) or at least 2, got {self.max_length}")
        if self.stride < 0 or (self.max_length and self.stride > self.max_length):
            problems.append(f"--stride must be between 1 and --max_length, or 0 (= --max_length), got {self.stride}")
        if self.batch_size < 1:
            problems.append(f"--batch_size must be >= 1, got {self.batch_size}")
        return problems


@dataclass(frozen=True)
class PerplexityArgs(StageArgs):
    STAGE = STAGE

    loading: ModelLoading
    text: Text
    windows: Windows
    destination: Destination


Args = PerplexityArgs


def main(
    base_model: str = "",
    lora_weights: str = "",
    *,
    data_file: str = "",
    field: str = "text",
    join: str = "\n\n",
    per_document: bool = False,
    max_length: int = 0,
    stride: int = 0,
    add_bos: bool | None = None,
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
    """Perplexity of a model, adapter or finetune.py output folder on a text.

    Args:
        base_model: Local model folder, or a finetune.py output folder (its base and adapter are used).
        lora_weights: An adapter folder (LoRA, prefix, p-tuning, prompt tuning) or a finetune.py output folder;
            its base model is read from its metadata unless --base_model is given.
        data_file: The text: a plain-text file, or a JSON array / JSONL file whose rows hold --field.
        field: JSON / JSONL: the field of each row that holds a document.
        join: The separator documents are joined with (and, with --per_document, what splits a plain-text
            file into documents); \\n and \\t in it are a newline and a tab.
        per_document: Score each document on its own (each starts with BOS), instead of joining them.
        max_length: Tokens per window (0: the model's context, less an adapter's virtual tokens).
        stride: Tokens between window starts (0: --max_length, no overlap). A smaller stride gives each scored
            token up to max_length - stride tokens of context.
        add_bos: Put the tokenizer's BOS first (default: when it has one).
        batch_size: Windows per forward pass (the result does not depend on it).
        output_dir: Also write the report (report.json, documents.jsonl with --per_document, pipeline.json)
            into this folder; an identical re-run is then a no-op.
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
    args = PerplexityArgs.from_flags(dict(locals()))
    problems = args.problems()
    if problems:
        raise UsageError("\n".join(problems))
    out = EvalOutput(args.destination, STAGE)  # a folder this stage may not write is refused before any work
    text = args.text
    texts, bad = read_texts_reported(text)
    plan = plan_loading(args.loading, Prompting(), raw=True, stage=STAGE)
    if args.windows.add_bos and getattr(plan.tokenizer, "bos_token_id", None) is None:
        raise UsageError("--add_bos: the tokenizer has no BOS token")
    records = {"model": artifact_record(plan), "data": file_record(text.data_file)}
    fp = fingerprint(args, {"model": records["model"]["fingerprint"], "data": records["data"]["sha256"]})
    stored = out.finished(fp)
    if stored is not None:
        return emit(stored)

    from utils.evaluation.perplexity import context_length, perplexity
    from utils.inference.loading import load_model

    loaded = load_model(plan)
    w = args.windows
    limit = context_length(loaded.model)
    if w.max_length > limit:
        raise SuiteError(f"--max_length {w.max_length} exceeds the model's context of {limit} tokens")
    started = time.perf_counter()
    result = perplexity(loaded.model, loaded.tokenizer, texts, max_length=w.max_length or None,
                        stride=w.stride or None, batch_size=w.batch_size, add_bos=w.add_bos,
                        per_document=text.per_document, join=text.separator, progress=w.progress)
    took = time.perf_counter() - started
    documents = result.pop("documents", None)
    report = {**result, "documents": len(texts), "malformed": {k: len(v) for k, v in bad.items()},
              "field": text.field if text.data_file.endswith((".json", ".jsonl")) else None,
              "dtype": loaded.info.get("dtype"), **records,
              "seconds": round(took, 3), "tokens_per_second": round(result["tokens_scored"] / max(took, 1e-9), 1)}
    print(f"{STAGE}: ppl {report['ppl']:.4f} over {report['tokens_scored']} tokens "
          f"({report['windows']} windows, {took:.1f}s)", file=sys.stderr)
    tables = {"documents.jsonl": [{"document": i + 1, **d} for i, d in enumerate(documents)]} if documents else {}
    out.write(fp, report, tables, args=args.flags(), inputs=records)
    emit(report)


def read_texts_reported(text: Text) -> tuple[list[str], dict[str, list[int]]]:
    """The documents, with malformed rows counted on stderr (utils.evaluation.perplexity.read_texts)."""
    from utils.evaluation.perplexity import read_texts
    from utils.jsonl import line_refs

    texts, bad = read_texts(text.data_file, text.field, text.separator if text.per_document else None, text.strict)
    for reason, lines in bad.items():
        print(f"{STAGE}: skipped {len(lines)} row(s), {reason}: {line_refs(text.data_file, lines)}", file=sys.stderr)
    return texts, bad


def fingerprint(args: PerplexityArgs, inputs: dict) -> str:
    """What determines the report: every flag that counts and ``inputs``, the hashes of the model and the data
    (not their paths: the same files named another way give the same report). Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


if __name__ == "__main__":
    run(main)
