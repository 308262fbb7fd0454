"""Quantization stage: GPTQ (or its RTN ablation) of any model folder the suite writes, in the GPTQ checkpoint layout.

Reads a Hugging Face model folder, an export_hf.py output, or a finetune.py output folder (a LoRA / DoRA adapter is
merged into its base first, in memory); calibrates every linear layer of the decoder blocks one block at a time
(``utils/quant/calibrate.py``) on ``--nsamples`` samples of ``--seqlen`` tokens of ``--data_path`` (rows of a
prepare_data.py folder, rendered with the artifact's template as it was trained; or slices of a text); and writes:

    OUTPUT_DIR/model*.safetensors       qweight / qzeros / scales / g_idx per quantized layer, every other tensor as is
    OUTPUT_DIR/config.json              the model's config with its quantization_config (quant_method "gptq")
    OUTPUT_DIR/quantize_config.json     the same settings, as AutoGPTQ / GPTQModel read them
    OUTPUT_DIR/tokenizer files, template.json (when the artifact carries one)
    OUTPUT_DIR/quant_report.json        per-layer reconstruction error, layers kept in floating point and why,
                                        bits per weight, size, time, peak memory, and perplexity before / after
    OUTPUT_DIR/pipeline.json            resolved arguments, inputs and their hashes, fingerprint (written last)

Layers whose shape the layout cannot pack (4-bit needs in/out multiples of 8, 3-bit of 32: stories260K's 172-wide
MLP) stay in floating point, are listed in the config as excluded and in the report. Perplexity is measured with
eval/perplexity.py's function on held-out data: --eval_data_path, the validation split of a prepared folder, or
the documents of a text --data_path not used for calibration (its last tenth).

Example:
    python quantize.py --base_model ../shared/models/stories260K/hf --output_dir runs/q4 --bits 4 --group_size 32 \\
        --act_order --data_path ../shared/data/tinystories/valid_sample.jsonl --nsamples 128 --seqlen 256
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from utils.args import Group, StageArgs, unfingerprinted
from utils.artifacts import Output, sha256_json
from utils.cli import parse_size, run
from utils.dtypes import dtype_size, torch_dtype_of
from utils.weights.config import set_config_dtype
from utils.errors import SuiteError, UsageError
from utils.evaluation.stage import artifact_record, file_record
from utils.inference.loading import prepare
from utils.inference.options import ModelInput

STAGE = "quantize"
#: The tokenizer files that define which token an id is (utils.artifacts.TOKENIZER_FILES less the configuration).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")
_PERMISSION = "a permission: it only allows what is otherwise refused"


#: Every --method, by family: the GPTQ layout (calibrated; rtn is its ablation), the seeds' own quantizers
#: (ChatGLM's per-row absmax, LLMZoo's group-wise; data-free, measured on the calibration inputs), bitsandbytes
#: (pre-quantized folders) and GGUF (llama.cpp).
GPTQ_LAYOUT = ("gptq", "rtn")
SEEDS = ("int8_row", "int4_row", "groupwise")
BNB = ("bnb_nf4", "bnb_fp4", "bnb_int8")
METHODS = GPTQ_LAYOUT + SEEDS + BNB + ("gguf",)
#: Each method's defaults for the flags whose meaning (or use) depends on the method.
DEFAULT_BITS = {"gptq": 4, "rtn": 4, "int8_row": 8, "int4_row": 4, "groupwise": 8}
DEFAULT_GROUP_SIZE = {"gptq": 128, "rtn": 128, "groupwise": 256}  # groupwise: LLMZoo's CompressionConfig
DEFAULT_SYM = {"gptq": False, "rtn": False, "groupwise": True}  # LLMZoo's default is symmetric


@dataclass(frozen=True)
class Method(Group):
    """The quantizer and its grid. The flags left at None take the method's own default (``resolved``)."""

    method: Literal["gptq", "rtn", "int8_row", "int4_row", "groupwise", "bnb_nf4", "bnb_fp4", "bnb_int8",
                    "gguf"] = "gptq"
    bits: int | None = None
    group_size: int | None = None
    group_dim: int = 1
    act_order: bool = False
    sym: bool | None = None
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    modules: list[str] = ()
    double_quant: bool = True
    gguf_type: Literal["f16", "q8_0"] | None = None
    requantize: bool = False
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    def resolved(self) -> dict:
        """bits, group_size, sym and gguf_type as this method uses them (None where they do not apply)."""
        return {"bits": self.bits if self.bits is not None else DEFAULT_BITS.get(self.method),
                "group_size": self.group_size if self.group_size is not None else
                DEFAULT_GROUP_SIZE.get(self.method),
                "sym": self.sym if self.sym is not None else DEFAULT_SYM.get(self.method),
                "gguf_type": (self.gguf_type or "q8_0") if self.method == "gguf" else None}

    def problems(self) -> list[str]:
        problems, m, r = [], self.method, self.resolved()

        def only(flag: str, given: bool, methods: tuple[str, ...]) -> None:
            if given and m not in methods:
                problems.append(f"--{flag} applies to --method {' / '.join(methods)}, not {m}")

        only("bits", self.bits is not None, GPTQ_LAYOUT + SEEDS)
        only("group_size", self.group_size is not None, GPTQ_LAYOUT + ("groupwise",))
        only("sym", self.sym is not None, GPTQ_LAYOUT + ("groupwise",))
        only("act_order", self.act_order, ("gptq",))
        only("static_groups", self.static_groups, ("gptq",))
        only("damp_percent", self.damp_percent != 0.01, ("gptq",))
        only("group_dim", self.group_dim != 1, ("groupwise",))
        only("double_quant", not self.double_quant, ("bnb_nf4", "bnb_fp4"))
        only("gguf_type", self.gguf_type is not None, ("gguf",))
        only("modules", bool(self.modules), GPTQ_LAYOUT + SEEDS + BNB)
        only("requantize", self.requantize, GPTQ_LAYOUT + SEEDS)
        only("dtype", self.dtype != "auto", GPTQ_LAYOUT + SEEDS)
        bits, group_size = r["bits"], r["group_size"]
        if m in GPTQ_LAYOUT and bits not in (2, 3, 4, 8):
            problems.append(f"--bits must be 2, 3, 4 or 8, got {bits}")
        if m in ("int8_row", "int4_row") and bits != DEFAULT_BITS[m]:
            problems.append(f"--method {m} quantizes to {DEFAULT_BITS[m]} bits; --bits {bits} contradicts it")
        if m == "groupwise" and not 2 <= bits <= 8:
            problems.append(f"--bits must lie in 2..8 for groupwise (one code per byte), got {bits}")
        if group_size is not None and (group_size == 0 or group_size < -1):
            problems.append(f"--group_size must be -1 (one group per output row) or positive, got {group_size}")
        if self.group_dim not in (0, 1):
            problems.append(f"--group_dim must be 0 (output rows) or 1 (input columns), got {self.group_dim}")
        if not 0 < self.damp_percent < 1:
            problems.append(f"--damp_percent must be between 0 and 1, got {self.damp_percent}")
        if self.static_groups and not self.act_order:
            problems.append("--static_groups fits the groups before reordering the columns: it needs --act_order")
        return problems

    @property
    def calibrated(self) -> bool:
        """Whether the method quantizes the decoder blocks' layers one by one on calibration inputs (the GPTQ
        layout and the seeds' quantizers); bitsandbytes and GGUF quantize the whole model at once, data-free."""
        return self.method in GPTQ_LAYOUT + SEEDS


@dataclass(frozen=True)
class Calibration(Group):
    """The calibration text and the held-out text the report's perplexity is measured on."""

    data_path: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    field: str = "text"
    prompt_template: str = ""
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    eval_data_path: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")

    def problems(self) -> list[str]:
        problems = []
        if self.data_path and not Path(self.data_path).exists():
            problems.append(f"--data_path {self.data_path}: no such file or folder")
        if self.eval_data_path and not Path(self.eval_data_path).is_file():
            problems.append(f"--eval_data_path {self.eval_data_path}: no such file")
        if self.nsamples < 1:
            problems.append(f"--nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen < 2:
            problems.append(f"--seqlen must be >= 2, got {self.seqlen}")
        return problems


@dataclass(frozen=True)
class Destination(Group):
    output_dir: str = unfingerprinted("", why="where the output is written, not what it holds")
    max_shard_size: str = unfingerprinted("2GB", why="how the tensors are split into files, not their values")
    overwrite: bool = unfingerprinted(False, why=_PERMISSION)
    progress: bool = unfingerprinted(True, why="how progress is shown")

    def problems(self) -> list[str]:
        problems = [] if self.output_dir else ["--output_dir is required"]
        try:
            parse_size(self.max_shard_size)
        except SuiteError as exc:
            problems.append(str(exc))
        return problems


@dataclass(frozen=True)
class QuantizeArgs(StageArgs):
    STAGE = STAGE

    source: ModelInput
    method: Method
    calibration: Calibration
    destination: Destination

    def problems(self) -> list[str]:
        problems = super().problems()
        cal = self.calibration
        if self.method.calibrated and not cal.data_path:
            problems.append(f"--data_path is required for --method {self.method.method} (calibration data: a "
                            "prepare_data.py folder, data files as finetune.py reads them, a text file, or JSON / "
                            "JSONL rows with a --field of text)")
        elif not (cal.data_path or cal.eval_data_path):
            problems.append(f"--method {self.method.method} needs no calibration, but the report's perplexity needs "
                            "held-out text: give --eval_data_path (or --data_path)")
        return problems


Args = QuantizeArgs


def main(
    base_model: str = "",
    lora_weights: str = "",
    *,
    output_dir: str = "",
    method: Literal["gptq", "rtn", "int8_row", "int4_row", "groupwise", "bnb_nf4", "bnb_fp4", "bnb_int8",
                    "gguf"] = "gptq",
    bits: int | None = None,
    group_size: int | None = None,
    group_dim: int = 1,
    act_order: bool = False,
    sym: bool | None = None,
    static_groups: bool = False,
    true_sequential: bool = True,
    damp_percent: float = 0.01,
    modules: list[str] = (),
    double_quant: bool = True,
    gguf_type: Literal["f16", "q8_0"] | None = None,
    requantize: bool = False,
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto",
    data_path: str = "",
    field: str = "text",
    prompt_template: str = "",
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    eval_data_path: str = "",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    allow_base_mismatch: bool = False,
) -> None:
    """Quantize a model, merged fine-tune or finetune.py output folder, and report what it cost in perplexity.

    Args:
        base_model: Local model folder, or a finetune.py output folder (its base and adapter are used).
        lora_weights: A LoRA / DoRA adapter folder or finetune.py output folder, merged into its base first.
        output_dir: Where the quantized model goes (written to a temporary folder, then renamed).
        method: gptq (error feedback from calibration inputs) or rtn (round to nearest on the same grid: the
            ablation), both in the GPTQ checkpoint layout; int8_row / int4_row (ChatGLM's per-row absmax) or
            groupwise (LLMZoo's compression.py); bnb_nf4 / bnb_fp4 / bnb_int8 (a pre-quantized bitsandbytes
            folder); gguf (a llama.cpp file, see --gguf_type).
        bits: gptq / rtn: 2, 3, 4 or 8 (default 4); groupwise: 2..8 (default 8); int8_row / int4_row: implied.
        group_size: Input columns sharing a scale and zero point, -1 for one group per output row (gptq / rtn:
            default 128; groupwise: elements per group along --group_dim, default 256).
        group_dim: groupwise: the weight dimension split into groups (1: input columns, 0: output rows).
        act_order: GPTQ: quantize columns in order of decreasing Hessian diagonal (desc_act).
        sym: A symmetric grid (zero point in the middle) instead of min-max (default: asymmetric for gptq / rtn,
            symmetric for groupwise, as LLMZoo).
        static_groups: GPTQ with --act_order: fit every group's grid up front, on the original column order.
        true_sequential: Within a block, calibrate (and measure) each group of layers on the outputs of the layers
            quantized before it.
        damp_percent: GPTQ: fraction of the Hessian's mean diagonal added to its diagonal.
        modules: Quantize only the linear layers whose name matches one of these shell patterns, matched against
            the full name or the name inside its block (e.g. 'self_attn.*' or '*.mlp.down_proj'); default: every
            linear layer of the decoder blocks (embeddings and lm_head are never quantized).
        double_quant: bnb_nf4 / bnb_fp4: also quantize the quantization constants.
        gguf_type: gguf: f16, or q8_0 (default; tensors whose rows are not a multiple of 32 stay f16).
        requantize: Merge an adapter into a quantized base: dequantize each layer (a GPTQ, row-wise, group-wise or
            bitsandbytes folder; or the base a qlora adapter was trained on, quantized as it was trained), add
            the LoRA delta, and quantize again with this calibration. The report's perplexity before is the
            floating-point merge (dequantized base + adapter): its delta is the drift the requantization adds.
        dtype: The tensors kept in floating point (embeddings, norms, layers not quantized, the output head):
            fp32, fp16 or bf16; auto: the input's own dtype (its config.json). Calibration computes in fp32.
        data_path: Calibration data: a prepare_data.py folder (held out: its validation split); data files in a
            format finetune.py reads (alpaca, sharegpt, openai, moss, pair: rendered with the artifact's template,
            as it was trained); a plain-text file; or JSON / JSONL rows whose --field holds text.
        field: JSON / JSONL text rows: the field of each row that holds text.
        prompt_template: Template for data files in a chat / instruction format (default: the artifact's own,
            else the format's default as prepare_data.py picks it).
        nsamples: Calibration samples: rows of a prepared folder or data files (seeded pick, each cut to
            --seqlen), or slices of --seqlen tokens at seeded random places of a text.
        seqlen: Tokens per calibration sample.
        seed: Seed for the pick.
        eval_data_path: Held-out text for the report's perplexity (default: the last tenth of --data_path's
            documents, which calibration then does not use).
        max_shard_size: Largest safetensors file, e.g. 2GB or 500MB.
        overwrite: Replace a different quantize output in --output_dir.
        progress: Show progress on stderr.
        trust_remote_code: Allow custom model code from the model folder to run.
        allow_pickle_weights: Accept pytorch_model.bin / adapter_model.bin (loaded with weights_only=True).
        allow_base_mismatch: Apply an adapter to a base whose fingerprint differs from the one it was trained on.
    """
    args = QuantizeArgs.from_flags(dict(locals()))
    problems = args.problems()
    if problems:
        raise UsageError("\n".join(problems))
    dest = args.destination
    out = Output(dest.output_dir, STAGE, dest.overwrite)  # a folder this stage may not write is refused now
    cal = args.calibration
    for flag, path in (("--data_path", cal.data_path), ("--eval_data_path", cal.eval_data_path)):
        if path and Path(path).resolve() == Path(dest.output_dir).resolve():
            raise UsageError(f"{flag} must not be --output_dir")
    src = args.source
    # fp32 on the CPU: calibration needs the full-precision weights (the stage writes fp16 scales either way).
    plan = prepare(src.base_model or None, src.lora_weights or None, dtype="fp32", device="cpu",
                   prompt_template=cal.prompt_template or None, trust_remote_code=src.trust_remote_code,
                   allow_pickle_weights=src.allow_pickle_weights, allow_base_mismatch=src.allow_base_mismatch)
    quantized_base = requantized_base(plan)
    if args.method.requantize and quantized_base is None:
        raise UsageError(f"--requantize: {plan.source.base} is not quantized, and no qlora adapter was trained on "
                         "it; quantize it without --requantize")
    if quantized_base is not None and not args.method.requantize and plan.info.get("quantization"):
        raise UsageError(f"--base_model {plan.source.base} is already quantized ({plan.info['quantization']}); "
                         "quantize its floating-point original, or pass --requantize to dequantize it (merging "
                         "--lora_weights) and quantize again")
    if plan.source.method not in (None, "lora", "qlora"):
        raise SuiteError(f"--lora_weights {plan.source.adapter}: a {plan.source.method} adapter cannot be merged into "
                         "its base; quantize the base model and load the adapter on it")
    if Path(plan.source.base).resolve() == Path(dest.output_dir).resolve():
        raise UsageError("--output_dir must not be the input model folder")
    data = calibration_data(cal, plan, need_samples=args.method.calibrated)  # every data problem, before the model
    inputs = {"model": artifact_record(plan)["fingerprint"], "data": data.fingerprint,
              "eval": file_record(cal.eval_data_path)["sha256"] if cal.eval_data_path else None}
    fp = fingerprint(args, inputs)
    if out.up_to_date(fp):
        print(f"{STAGE}: --output_dir {dest.output_dir} already holds this quantization (fingerprint {fp[:12]}); "
              "nothing to do", file=sys.stderr)
        print(os.path.abspath(dest.output_dir))
        return
    report = quantize(args, plan, data, out, fp, inputs)
    kept = f", {report['layers_kept']} kept" if report.get("layers_kept") is not None else ""
    print(f"{STAGE}: {args.method.method}: {report['layers_quantized']} layers quantized{kept}; perplexity "
          f"{report['ppl_before']:.4f} -> {report['ppl_after']:.4f} (delta {report['delta_ppl']:+.4f})", file=sys.stderr)
    print(os.path.abspath(dest.output_dir))


@dataclass
class CalibrationData:
    """The calibration samples (token ids) and the held-out documents (texts, or token ids of rendered rows)."""

    samples: list
    held_out_texts: list[str] | None
    held_out_ids: list[list[int]] | None
    fingerprint: str


def calibration_data(cal: Calibration, plan, need_samples: bool = True) -> CalibrationData:
    """From a prepare_data.py folder (rows rendered with the artifact's template, as it was trained: --nsamples rows
    of its train split, seeded; held out: its validation split), from data files in a format finetune.py reads
    (rendered here the same way; held out: the last tenth of the rows), or from text (--nsamples slices of --seqlen
    tokens at seeded places; held out: the last tenth of the documents). --eval_data_path replaces the held-out
    part (then all of --data_path calibrates). Without ``need_samples`` (a data-free method) --data_path may be
    absent and only the held-out text is read.

    Raises:
        SuiteError: too few usable rows or tokens (saying how many), no held-out text.
    """
    from utils.evaluation.perplexity import read_texts

    held_texts = None
    if cal.eval_data_path:
        held_texts, _ = read_texts(cal.eval_data_path, cal.field, None, strict=False, flag="--eval_data_path")
    if not cal.data_path:
        return CalibrationData([], held_texts, None, "")
    if Path(cal.data_path).is_dir():
        rows, held_ids, fp = prepared_rows_for(cal, plan)
    else:
        fmt = data_format(cal.data_path, cal.field)
        if fmt is None:
            return text_calibration(cal, plan, held_texts, need_samples)
        rows, fp = rendered_rows(cal, plan, fmt), file_record(cal.data_path)["sha256"]
        held_ids = None
        if held_texts is None:
            if len(rows) < 2:
                raise SuiteError(f"--data_path {cal.data_path} holds one usable row: give --eval_data_path for the "
                                 "report's perplexity (held-out text must not be calibrated on)")
            cut = len(rows) - max(1, len(rows) // 10)
            rows, held_ids = rows[:cut], rows[cut:]
    if held_texts is None and not held_ids:
        raise SuiteError(f"--data_path {cal.data_path} has no validation split: give --eval_data_path for the "
                         "report's perplexity (held-out text must not be calibrated on)")
    samples = []
    if need_samples:
        import torch

        usable = [ids for ids in rows if len(ids) >= 2]
        if len(usable) < cal.nsamples:
            what = "training" if Path(cal.data_path).is_dir() else "calibration"  # a prepared folder's train split
            raise SuiteError(f"--data_path {cal.data_path}: {len(usable)} usable {what} rows, fewer than "
                             f"--nsamples {cal.nsamples}; lower --nsamples or give more data")
        picked = random.Random(cal.seed).sample(range(len(usable)), cal.nsamples)
        samples = [torch.tensor(usable[i][:cal.seqlen]) for i in picked]
    return CalibrationData(samples, held_texts, None if held_texts else held_ids, fp)


def prepared_rows_for(cal: Calibration, plan) -> tuple[list[list[int]], list[list[int]], str]:
    """(train rows, validation rows, fingerprint) of a prepare_data.py folder tokenized with the model's vocabulary."""
    from utils.artifacts import read_output, tokenizer_fingerprint
    from utils.training.prepared import prepared_rows

    info = read_output(cal.data_path)
    if info is None or info.stage != "prepare_data" or not info.complete:
        raise SuiteError(f"--data_path {cal.data_path}: a folder that is not a complete prepare_data.py output")
    # The ids must mean the same tokens: the files that define the vocabulary must match. The tokenizer's
    # config may differ (an export adds its chat template there); calibration reads ids, not rendered text.
    ours, theirs = tokenizer_fingerprint(plan.source.tokenizer_dir), info.base_model.get("tokenizer_files") or {}
    vocabulary = [f for f in VOCAB_FILES if f in ours or f in theirs]
    if not vocabulary or any(ours.get(f) != theirs.get(f) for f in vocabulary):
        raise SuiteError(f"--data_path {cal.data_path} was tokenized with another vocabulary "
                         f"({info.base_model.get('path')}) than the model's ({plan.source.tokenizer_dir})")
    rows = prepared_rows(cal.data_path, "train", "validation")
    return ([ids for ids, _ in rows.get("train", [])], [ids for ids, _ in rows.get("validation", [])],
            info.fingerprint or "")


def data_format(path: str, field: str) -> str | None:
    """The chat / instruction format of a data file (as prepare_data.py detects it), or None for text: a plain
    text file, or JSON rows whose ``field`` holds a string."""
    from utils.data.records import Columns, DataError, Record, detect_format, read_records

    if not path.endswith((".json", ".jsonl")):
        return None
    head = []
    for item in read_records(path):
        head.append(item)
        if len(head) >= 100:
            break
    rows = [r.value for r in head if isinstance(r, Record) and isinstance(r.value, dict)]
    if rows and sum(isinstance(r.get(field), str) for r in rows) * 2 > len(rows):
        return None
    try:
        return detect_format(head, path, Columns())
    except DataError:
        return None  # read_texts then names the rows without --field text


def rendered_rows(cal: Calibration, plan, fmt: str) -> list[list[int]]:
    """The token ids of each row of a data file, rendered with the artifact's template (--prompt_template, else
    the one the artifact carries, else the format's default as prepare_data.py picks it): a chat fine-tune is
    calibrated on chat-formatted text."""
    from utils.data.encode import Encoder
    from utils.data.prepare import FORMAT_TEMPLATE
    from utils.data.records import Columns, RowError, load_examples
    from utils.data.templates import load_template

    template = plan.template
    if template is None:
        chat_default = "tokenizer" if getattr(plan.tokenizer, "chat_template", None) else "vicuna_v1.1"
        template = load_template(FORMAT_TEMPLATE.get(fmt, chat_default), plan.tokenizer)
    _, examples = load_examples(cal.data_path, fmt, Columns())
    good = [ex for ex in examples if not isinstance(ex, RowError)]
    # Whole rows: the held-out ones are scored whole; calibration samples are cut to --seqlen when picked.
    encoder = Encoder(plan.tokenizer, template, cutoff_len=1 << 30, on_overlength="truncate", mask_mode="all")
    encoded = encoder.encode_batch(good)
    bad = [e for e in examples if isinstance(e, RowError)] + [e for e in encoded if isinstance(e, RowError)]
    if bad:
        lines = ", ".join(str(e.line) for e in bad[:5]) + (" ..." if len(bad) > 5 else "")
        print(f"{STAGE}: --data_path {cal.data_path}: skipped {len(bad)} malformed row(s) (lines {lines})",
              file=sys.stderr)
    name = getattr(template, "name", "?")
    print(f"{STAGE}: --data_path {cal.data_path}: {fmt} rows rendered with template {name}", file=sys.stderr)
    return [e.input_ids for e in encoded if not isinstance(e, RowError)]


def text_calibration(cal: Calibration, plan, held_texts: list[str] | None, need_samples: bool) -> CalibrationData:
    from utils.evaluation.perplexity import read_texts

    docs, bad = read_texts(cal.data_path, cal.field, None, strict=False, flag="--data_path")
    for reason, lines in bad.items():
        print(f"{STAGE}: --data_path: skipped {len(lines)} row(s), {reason}", file=sys.stderr)
    if held_texts is None:
        if len(docs) < 2:
            raise SuiteError("--data_path holds one document: give --eval_data_path for the report's perplexity "
                             "(held-out text must not be calibrated on)")
        cut = len(docs) - max(1, len(docs) // 10)
        docs, held_texts = docs[:cut], docs[cut:]
    samples = calibration_samples(plan.tokenizer, docs, cal.nsamples, cal.seqlen, cal.seed) if need_samples else []
    return CalibrationData(samples, held_texts, None, file_record(cal.data_path)["sha256"])


def calibration_samples(tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int) -> list:
    """``nsamples`` slices of ``seqlen`` tokens (BOS first when the tokenizer has one) at seeded random places of
    the joined calibration text."""
    import torch

    from utils.evaluation.perplexity import encode_documents

    ids = encode_documents(tokenizer, ["\n\n".join(texts)], add_bos=False)[0]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    width = seqlen - len(bos)
    if len(ids) < width:
        raise SuiteError(f"--data_path: the calibration text has {len(ids)} tokens, fewer than one --seqlen {seqlen} "
                         "sample; give more text or lower --seqlen")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - width + 1) for _ in range(nsamples)]
    return [torch.tensor(bos + ids[s:s + width]) for s in starts]


def held_out_ppl(model, tok, data: CalibrationData, window: int) -> dict:
    """Perplexity on the held-out documents (eval/perplexity.py's function; token rows scored one by one)."""
    import math

    from utils.evaluation.perplexity import perplexity, score_documents
    from utils.evaluation.scoring import Scorer

    if data.held_out_texts is not None:
        return perplexity(model, tok, data.held_out_texts, max_length=window, progress=False)
    result = score_documents(Scorer(model), data.held_out_ids, window, window, progress=False)
    return {"ppl": math.exp(result.nll_sum / result.tokens_scored), "tokens_scored": result.tokens_scored}


def quantize(args: QuantizeArgs, plan, data: CalibrationData, out: Output, fp: str, inputs: dict) -> dict:
    """Measure, quantize, measure again and write: the method's family decides how (``calibrated_method``
    streams the model block by block; bitsandbytes and GGUF work on the whole merged model)."""
    from utils.quant.streaming import peak_rss_mb

    m = args.method
    started = time.perf_counter()
    with out.produce(fp, args=args.flags(), inputs=inputs, base_model=plan.info) as st:
        if m.requantize:
            report = requantize_method(args, plan, data, st.dir)
        else:
            report = (calibrated_method if m.calibrated else whole_model_method)(args, plan, data, st.dir)
        resolved = {k: v for k, v in m.resolved().items() if v is not None}
        ppl = {"ppl_before": report.pop("ppl_before"), "ppl_after": report["ppl_after"]}
        ppl["delta_ppl"] = ppl["ppl_after"] - ppl["ppl_before"]
        report = {"method": m.method, **resolved, **ppl, **report,
                  "size_on_disk_bytes": sum(f.stat().st_size for f in st.dir.rglob("*") if f.is_file()
                                            and f.suffix in (".safetensors", ".gguf")),
                  "seconds": round(time.perf_counter() - started, 2),
                  # VmHWM, not ru_maxrss: the latter carries over the parent's peak through fork + exec (a
                  # test process holding a model made this stage look 80 MB bigger than it is).
                  "peak_rss_mb": round(max([peak_rss_mb(), *report.get("peak_rss_mb_by_phase", {}).values()]), 1)}
        (st.dir / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        st.meta.update(quantization={"method": m.method, **resolved})
    return report


def model_window(config, seqlen: int) -> int:
    """The perplexity window: the model's context, at most 2048 tokens."""
    return min(getattr(config, "max_position_embeddings", None) or seqlen, 2048)


def calibrated_method(args: QuantizeArgs, plan, data: CalibrationData, folder: Path) -> dict:
    """GPTQ / RTN (the GPTQ layout) and the seeds' quantizers, in bounded memory: the model's decoder blocks are
    read from disk one at a time (an adapter merged tensor by tensor), calibrated, quantized and written to the
    shards before the next is read (``utils.quant.streaming``); only one block's weights and the calibration
    activations are held. The perplexity before is the streamed model's; after, the written folder's, loaded
    with the plain torch kernels (float32 arithmetic on the dequantized weights, what the layers compute)."""
    from utils.quant.calibrate import quantize_model
    from utils.quant.gptq import GPTQError, GPTQSettings

    from utils.quant.streaming import peak_rss_mb, reset_peak_rss

    m, cal, dest = args.method, args.calibration, args.destination
    r, layout = m.resolved(), layout_for(m)
    # Peak memory per phase: the streamed part (what one block at a time bounds) apart from the scoring of the
    # written model, which holds all of it (quantized) by design.
    phases = {"before_streaming": peak_rss_mb()}
    reset_peak_rss()
    sm = open_source(plan)
    selected = select_modules(sm.model, m.modules)  # a pattern that matches nothing fails before calibration
    context = getattr(sm.model.config, "max_position_embeddings", None) or cal.seqlen
    if cal.seqlen > context:
        raise SuiteError(f"--seqlen {cal.seqlen} exceeds the model's context of {context} tokens")
    window = model_window(sm.model.config, cal.seqlen)
    before = held_out_ppl(sm.model, plan.tokenizer, data, window)

    def keep(name, layer):
        if name not in selected:
            return "not selected by --modules"
        return layout.packable(layer.in_features, layer.out_features)

    kept_dtype = output_dtype(m.dtype, plan.source.base)
    writer = PlannedWriter(folder, sm, layout, keep, kept_dtype, parse_size(dest.max_shard_size))
    settings = GPTQSettings(bits=r["bits"], group_size=r["group_size"] or -1, sym=bool(r["sym"]),
                            act_order=m.act_order, static_groups=m.static_groups, damp_percent=m.damp_percent)
    try:
        writer.write_outside_blocks(until_blocks=True)
        done = quantize_model(sm.model, data.samples, settings, method=m.method, quantizer=layout.quantizer,
                              keep=keep, true_sequential=m.true_sequential, progress=dest.progress,
                              block_scope=sm.hold, after_block=writer.write_block)
        writer.write_outside_blocks(until_blocks=False)
        writer.close()
    except (GPTQError, ValueError) as exc:  # a singular Hessian, non-finite weights: named by layer
        raise SuiteError(str(exc)) from None
    finally:
        writer.abort()
    write_quantized_config(folder, sm.model.config, layout, done, kept_dtype)
    write_companions(folder, plan)
    sm.release_all()
    phases["streaming"] = peak_rss_mb()
    reset_peak_rss()
    after = held_out_ppl(load_written(folder, m), plan.tokenizer, data, window)
    phases["scoring_written"] = peak_rss_mb()
    report = calibrated_report(m, kept_dtype, before, after, done, writer.entries)
    report["peak_rss_mb_by_phase"] = {k: round(v, 1) for k, v in phases.items()}
    return report


def open_source(plan):
    """The input model, streamed block by block from disk (``utils.quant.streaming``)."""
    from utils.quant.streaming import open_streaming
    from utils.weights.shards import return_freed_memory

    # Weights are read block after block between activations of every size: from 256 KB up they are mapped
    # and unmapped (a weight matrix is one), else each block read in turn would leave its buffers in the heap.
    return_freed_memory(256 << 10)
    try:
        return open_streaming(plan.source.base, plan.source.adapter, trust_remote_code=plan.trust_remote_code,
                              allow_pickle=plan.allow_pickle_weights)
    except ValueError as exc:
        raise SuiteError(f"--base_model {plan.source.base}: {exc}") from None


class PlannedWriter:
    """The output shards, planned before calibration (``output_entries``) and written in state-dict order: the
    tensors before the decoder blocks, each block once it is quantized (``write_block``, quantize_model's
    ``after_block``), then the rest. Tensors kept in floating point are cast to --dtype."""

    def __init__(self, folder: Path, sm, layout: "Layout", keep, kept_dtype: str, max_shard_size: int):
        from utils.quant.calibrate import block_linears
        from utils.weights.shards import ShardWriter

        self.sm, self.layout = sm, layout
        quantized = {f"{sm.prefix}.{b}.{n}" for b, block in enumerate(sm.blocks)
                     for n, layer in block_linears(block).items() if keep(f"{sm.prefix}.{b}.{n}", layer) is None}
        self.entries = output_entries(sm.model, quantized, layout, kept_dtype)
        self.cast = torch_dtype_of(kept_dtype)
        self.writer = ShardWriter(folder, self.entries, max_shard_size)
        self.pending = [name for name, _, _ in self.entries]
        self.state = sm.model.state_dict()  # outside the blocks: loaded; inside: meta until a block is held

    def _write(self, name: str, tensor, cast: bool = True) -> None:
        """``tensor`` as the next planned one; ``cast``: a floating-point tensor kept as such goes to --dtype
        (a quantized layer's codes and scales keep their own dtypes)."""
        planned = self.pending.pop(0) if self.pending else None
        if planned != name:  # a programming error: the plan and the writing disagree
            raise RuntimeError(f"quantize: writing {name}, but the shard plan expected {planned}")
        tensor = tensor.detach().to(self.cast) if cast and tensor.is_floating_point() else tensor.detach()
        self.writer.write(name, tensor.contiguous())

    def write_outside_blocks(self, until_blocks: bool) -> None:
        """The planned tensors outside the blocks: those before the first block, or (after them) the rest."""
        inside = f"{self.sm.prefix}."
        while self.pending and not (until_blocks and self.pending[0].startswith(inside)):
            self._write(self.pending[0], self.state[self.pending[0]])

    def write_block(self, b: int, layers: dict) -> None:
        """Block ``b``'s tensors: a quantized layer's stored tensors in place of its weight, the others as held."""
        block_state = self.sm.blocks[b].state_dict()
        prefix = f"{self.sm.prefix}.{b}."
        for name in self.sm.block_tensor_names(b):
            module, leaf = name.rsplit(".", 1)
            if module in layers and leaf == "weight":
                for part, t in self.layout.tensors(layers[module]).items():
                    self._write(f"{module}.{part}", t, cast=False)
            else:
                self._write(name, block_state[name[len(prefix):]])

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


def write_quantized_config(folder: Path, config, layout: "Layout", done, kept_dtype: str) -> None:
    """config.json with the layout's quantization_config and --dtype, and the layout's own config files."""
    excluded = [x.name for x in done.report if x.kept]
    values = set_config_dtype(config.to_dict(), kept_dtype)
    values["quantization_config"] = layout.config(sorted(done.layers), excluded)
    (folder / "config.json").write_text(json.dumps(values, indent=2, default=str) + "\n", encoding="utf-8")
    for name, make in layout.extra_files.items():
        (folder / name).write_text(json.dumps(make(sorted(done.layers), excluded), indent=2) + "\n",
                                   encoding="utf-8")


def calibrated_report(m: Method, kept_dtype: str, before: dict, after: dict, done, entries) -> dict:
    """The calibrated method's part of quant_report.json: its options, perplexities, per-layer errors and bits
    per weight of the quantized layers (their stored tensors, bias aside)."""
    stored = sum(math.prod(shape) * dtype_size(code) for name, code, shape in entries
                 if name.rsplit(".", 1)[0] in done.layers and not name.endswith(".bias"))
    weights = sum(math.prod(x.shape) for x in done.report if not x.kept)
    return {"dtype": kept_dtype,
            **({"act_order": m.act_order, "static_groups": m.static_groups, "damp_percent": m.damp_percent}
               if m.method == "gptq" else {}),
            **({"group_dim": m.group_dim} if m.method == "groupwise" else {}),
            "true_sequential": m.true_sequential, "ppl_before": before["ppl"], "ppl_after": after["ppl"],
            "eval_tokens": before["tokens_scored"], "calibration_tokens": done.tokens,
            "layers_quantized": len(done.layers), "layers_kept": sum(1 for x in done.report if x.kept),
            "bits_per_weight": 8 * stored / weights if weights else None,
            "layers": [{"name": x.name, "shape": list(x.shape), "relative_error": x.relative_error, "kept": x.kept}
                       for x in done.report]}


def output_dtype(flag: str, base: str) -> str:
    """--dtype, or for auto the input's own (its config.json's dtype)."""
    from utils.weights.config import config_dtype, read_config

    return flag if flag != "auto" else config_dtype(read_config(base, "--base_model"))


def output_entries(model, quantized: set[str], layout: "Layout", stored: str = "fp32"
                   ) -> list[tuple[str, str, tuple]]:
    """(name, dtype code, shape) of every tensor the output holds, in state-dict order: a quantized layer's
    ``.weight`` replaced by its stored tensors (shapes from quantizing a zero weight of its shape), a tied output
    head left out (written once, as transformers saves it)."""
    import torch

    from utils.dtypes import dtype_code

    shapes: dict[tuple[int, int], dict] = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    entries = []
    for name, t in model.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        if tied and name.endswith("lm_head.weight"):
            continue
        if module in quantized and leaf == "weight":
            key = tuple(t.shape)
            if key not in shapes:
                q = layout.quantizer(torch.zeros(key)) if layout.quantizer else rtn_of_zeros(key, layout)
                shapes[key] = {part: (dtype_code(v.dtype), tuple(v.shape)) for part, v in layout.tensors(q).items()}
            entries += [(f"{module}.{part}", code, shape) for part, (code, shape) in shapes[key].items()]
        else:
            code = dtype_code(torch_dtype_of(stored)) if t.is_floating_point() else dtype_code(t.dtype)
            entries.append((name, code, tuple(t.shape)))
    return entries


def rtn_of_zeros(shape: tuple[int, int], layout: "Layout"):
    import torch

    from utils.quant.grid import rtn

    return rtn(torch.zeros(shape), layout.bits, layout.group_size)


def load_written(folder: Path, m: Method):
    """The written folder as the loader reads it, with float32 torch kernels (see ``calibrated_method``)."""
    import torch

    from utils.quant.checkpoint import load_quantized_model
    from utils.quant.kernels import GPTQLinear

    model = load_quantized_model(folder, "cpu", torch.float32, backend="torch" if m.method in GPTQ_LAYOUT else None)
    for layer in model.modules():
        if isinstance(layer, GPTQLinear):  # rebuilt at each call: a cache would hold the float model whole
            layer.cache_weight, layer._cached_weight = False, None
    return model


def requantized_base(plan) -> dict | None:
    """How the base is quantized, if it is: ``{"label": ...}`` for a quantized folder, ``{"label": ..., "qlora":
    settings}`` for the floating-point base of a qlora adapter (bitsandbytes quantized it as it trained), None
    for a floating-point base."""
    if plan.info.get("quantization"):
        return {"label": plan.info["quantization"]}
    meta = plan.source.meta
    if plan.source.adapter and meta is not None and meta.raw.get("method") == "qlora":
        a = meta.args
        settings = {"bits": a.get("qlora_bits", 4), "quant_type": a.get("qlora_quant_type", "nf4"),
                    "double_quant": a.get("qlora_double_quant", True)}
        return {"label": f"bnb-{'int8' if settings['bits'] == 8 else settings['quant_type']} (qlora, at load)",
                "qlora": settings}
    return None


def requantize_method(args: QuantizeArgs, plan, data: CalibrationData, folder: Path) -> dict:
    """--requantize: the quantized base dequantized into a floating-point scratch folder (the weights the adapter
    was trained against), then the calibrated method on it with the adapter merged tensor by tensor, as for any
    floating-point base. The scratch folder is removed afterwards."""
    import shutil

    import torch

    from utils.quant.checkpoint import dequantize_model, load_quantized_model

    src, how = plan.source, requantized_base(plan)
    scratch = folder / ".dequantized"
    try:
        if "qlora" in how:
            from transformers import AutoModelForCausalLM

            from utils.weights.pretrained import bnb_config

            model = AutoModelForCausalLM.from_pretrained(
                src.base, dtype=torch.float32, local_files_only=True, trust_remote_code=plan.trust_remote_code,
                quantization_config=bnb_config(how["qlora"], torch.float32), device_map={"": "cpu"})
        else:
            model = load_quantized_model(src.base, "cpu", torch.float32, plan.trust_remote_code)
        layers = dequantize_model(model)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(scratch), safe_serialization=True)
        del model
        report = calibrated_method(args, dataclasses.replace(plan, source=dataclasses.replace(src, base=str(scratch))),
                                   data, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["requantize"] = {"base": os.path.abspath(src.base), "base_quantization": how["label"],
                            "adapter": os.path.abspath(src.adapter) if src.adapter else None,
                            "layers_dequantized": len(layers),
                            "ppl_fp_merge": report["ppl_before"],
                            "drift_ppl": report["ppl_after"] - report["ppl_before"]}
    return report


def whole_model_method(args: QuantizeArgs, plan, data: CalibrationData, folder: Path) -> dict:
    """bitsandbytes and GGUF: the merged floating-point model in memory, quantized whole."""
    from utils.inference.loading import load_model

    loaded = load_model(plan)
    model = loaded.model
    if plan.source.adapter:
        model = model.merge_and_unload()  # LoRA / DoRA: W + BA, in memory (export_hf.py writes the same merge)
    model.eval()
    window = model_window(model.config, args.calibration.seqlen)
    before = held_out_ppl(model, plan.tokenizer, data, window)
    job = Job(args, plan, model, data, folder, window)
    report = bnb_method(job) if args.method.method in BNB else gguf_method(job)
    write_companions(folder, plan)
    return {"ppl_before": before["ppl"], "eval_tokens": before["tokens_scored"], **report}


@dataclass
class Job:
    """What bnb_method / gguf_method work on: the merged floating-point model (in eval mode), the held-out data,
    the staging folder and the perplexity window."""

    args: QuantizeArgs
    plan: Any
    model: Any
    data: CalibrationData
    folder: Path
    window: int

    def ppl(self, model) -> float:
        return held_out_ppl(model, self.plan.tokenizer, self.data, self.window)["ppl"]


@dataclass(frozen=True)
class Layout:
    """How a calibrated method quantizes a layer and stores it: ``quantizer`` (float32 weight -> an object with
    ``dequantize()``; None: GPTQ itself, or rtn on its grid), ``packable`` (in, out -> why the layer cannot be
    stored, or None), ``tensors`` (quantized layer -> its stored tensors, named relative to the layer),
    ``config`` (quantized and kept layer names -> config.json's quantization_config) and ``extra_files`` (file
    name -> the same kind of function, for config files of the layout's own)."""

    quantizer: Any
    packable: Any
    tensors: Any
    config: Any
    extra_files: dict
    bits: int = 4
    group_size: int = -1


def layout_for(m: Method) -> Layout:
    r = m.resolved()
    if m.method in GPTQ_LAYOUT:
        from utils.quant.packing import pack_gptq, packable, quantize_config

        def gptq_config(quantized, excluded):
            return quantize_config(r["bits"], r["group_size"], m.act_order, bool(r["sym"]), m.static_groups,
                                   m.true_sequential, m.damp_percent, excluded=excluded)

        # rtn: calibrate.py's default quantizer (the GPTQ grid, no error feedback)
        return Layout(None, lambda i, o: packable(i, o, r["bits"]), pack_gptq, gptq_config,
                      {"quantize_config.json": gptq_config}, r["bits"], r["group_size"])
    from utils.quant import rowwise
    from utils.quant.baselines import CompressionConfig

    if m.method == "groupwise":
        def quantizer(w):
            size = w.shape[m.group_dim] if r["group_size"] == -1 else r["group_size"]
            return rowwise.groupwise_layer(w, CompressionConfig(num_bits=r["bits"], group_size=size,
                                                                group_dim=m.group_dim, symmetric=bool(r["sym"])))
    else:
        def quantizer(w):
            return rowwise.chatglm_layer(w, r["bits"])

    def seed_config(quantized, excluded):
        return rowwise.quantization_config(m.method, r["bits"], r["group_size"], m.group_dim, bool(r["sym"]),
                                           sorted(quantized))

    return Layout(quantizer, lambda i, o: rowwise.rowwise_packable(i, o, m.method, r["bits"]),
                  lambda q: q.tensors(), seed_config, {})


def select_modules(model, patterns) -> set[str]:
    """The full names of the decoder blocks' linear layers that ``patterns`` select (all when there are none).

    Raises:
        UsageError: a pattern that matches no layer (listing the names inside a block).
    """
    from fnmatch import fnmatchcase

    from utils.quant.calibrate import block_linears, decoder_blocks

    prefix, blocks = decoder_blocks(model)
    names = {f"{prefix}.{b}.{n}": n for b, block in enumerate(blocks) for n in block_linears(block)}
    if not patterns:
        return set(names)
    unmatched = [p for p in patterns if not any(fnmatchcase(full, p) or fnmatchcase(short, p)
                                                for full, short in names.items())]
    if unmatched:
        inside = sorted(set(names.values()))
        raise UsageError(f"--modules {' '.join(unmatched)}: matches no linear layer of the decoder blocks; "
                         f"the layers of a block are {', '.join(inside)} (under {prefix}.N.)")
    return {full for full, short in names.items() if any(fnmatchcase(full, p) or fnmatchcase(short, p)
                                                          for p in patterns)}


def write_companions(folder: Path, plan) -> None:
    """The tokenizer and the artifact's own template, so the next stage needs only this folder."""
    plan.tokenizer.save_pretrained(str(folder))
    template = plan.template
    if getattr(template, "data", None) is not None:
        (folder / "template.json").write_text(json.dumps(template.data, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")


def bnb_method(job: Job) -> dict:
    """bitsandbytes: the merged floating-point model is written to a scratch folder, quantized from there as
    from_pretrained does it, saved pre-quantized, and loaded back for the perplexity after."""
    import shutil

    import torch

    from utils.quant.bnb import BnbError, load_bnb_folder, write_bnb

    m, dest = job.args.method, job.args.destination
    kind = {"bnb_nf4": "nf4", "bnb_fp4": "fp4", "bnb_int8": "int8"}[m.method]
    scratch = job.folder / ".fp"
    try:
        job.model.save_pretrained(str(scratch), safe_serialization=True)
        report = write_bnb(scratch, job.folder, kind, double_quant=m.double_quant, compute_dtype=torch.float32,
                           modules=select_modules(job.model, m.modules) if m.modules else None,
                           max_shard_size=dest.max_shard_size)
    except BnbError as exc:
        raise SuiteError(str(exc)) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    after = job.ppl(load_bnb_folder(job.folder, device="cpu"))
    return {**({"double_quant": m.double_quant} if kind != "int8" else {}), "ppl_after": after, **report}


def gguf_method(job: Job) -> dict:
    """GGUF for llama.cpp: one file, with the model's config beside it; the perplexity after is the model's with
    the file's tensors read back and dequantized (llama.cpp computes with exactly these values)."""
    from utils.quant.gguf import read_back_state_dict, write_gguf

    gguf_type = job.args.method.resolved()["gguf_type"]
    path = job.folder / f"model-{gguf_type}.gguf"
    report = write_gguf(job.model, Path(job.plan.source.tokenizer_dir), path, gguf_type,
                        progress=job.args.destination.progress)
    job.model.load_state_dict(read_back_state_dict(path, job.model), strict=False)
    after = job.ppl(job.model)
    job.model.config.to_json_file(str(job.folder / "config.json"))
    return {"file": path.name, "ppl_after": after, **report}


def fingerprint(args: QuantizeArgs, inputs: dict) -> str:
    """What determines the output: every flag that counts and ``inputs`` (the model's, the calibration and
    evaluation texts' hashes). Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


if __name__ == "__main__":
    run(main)
