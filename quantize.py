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

import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from utils.args import Group, StageArgs, unfingerprinted
from utils.artifacts import Output, sha256_json
from utils.cli import parse_size, run
from utils.errors import SuiteError, UsageError
from utils.evaluation.stage import artifact_record, file_record
from utils.inference.loading import prepare
from utils.inference.options import ModelInput

STAGE = "quantize"
#: The tokenizer files that define which token an id is (utils.artifacts.TOKENIZER_FILES less the configuration).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")
_PERMISSION = "a permission: it only allows what is otherwise refused"


@dataclass(frozen=True)
class Method(Group):
    """The quantizer and its grid."""

    method: Literal["gptq", "rtn"] = "gptq"
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    sym: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    modules: list[str] = ()

    def problems(self) -> list[str]:
        problems = []
        if self.bits not in (2, 3, 4, 8):
            problems.append(f"--bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            problems.append(f"--group_size must be -1 (one group per output row) or positive, got {self.group_size}")
        if not 0 < self.damp_percent < 1:
            problems.append(f"--damp_percent must be between 0 and 1, got {self.damp_percent}")
        if self.method == "rtn" and (self.act_order or self.static_groups):
            problems.append("--act_order and --static_groups are GPTQ's options (rtn has no column order)")
        return problems


@dataclass(frozen=True)
class Calibration(Group):
    """The calibration text and the held-out text the report's perplexity is measured on."""

    data_path: str = unfingerprinted("", why="counts as its content (the file's hash among the inputs)")
    field: str = "text"
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
        if not self.data_path:
            problems.append("--data_path is required (calibration data: a prepare_data.py folder, a text file, or "
                            "JSON / JSONL rows)")
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


Args = QuantizeArgs


def main(
    base_model: str = "",
    lora_weights: str = "",
    *,
    output_dir: str = "",
    method: Literal["gptq", "rtn"] = "gptq",
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = False,
    static_groups: bool = False,
    true_sequential: bool = True,
    damp_percent: float = 0.01,
    modules: list[str] = (),
    data_path: str = "",
    field: str = "text",
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
    """Quantize a model, merged fine-tune or finetune.py output folder with GPTQ (or RTN) into the GPTQ layout.

    Args:
        base_model: Local model folder, or a finetune.py output folder (its base and adapter are used).
        lora_weights: A LoRA / DoRA adapter folder or finetune.py output folder, merged into its base first.
        output_dir: Where the quantized model goes (written to a temporary folder, then renamed).
        method: gptq (error feedback from calibration inputs) or rtn (round to nearest on the same grid: the
            ablation).
        bits: Bits per weight: 2, 3, 4 or 8.
        group_size: Input columns sharing a scale and zero point (-1: one per output row).
        act_order: GPTQ: quantize columns in order of decreasing Hessian diagonal (desc_act).
        sym: A symmetric grid (zero point in the middle) instead of min-max.
        static_groups: GPTQ with --act_order: fit every group's grid up front, on the original column order.
        true_sequential: GPTQ: within a block, calibrate each group of layers on the outputs of the layers
            quantized before it.
        damp_percent: GPTQ: fraction of the Hessian's mean diagonal added to its diagonal.
        modules: Quantize only the linear layers whose name matches one of these shell patterns, matched against
            the full name or the name inside its block (e.g. 'self_attn.*' or '*.mlp.down_proj'); default: every
            linear layer of the decoder blocks (embeddings and lm_head are never quantized).
        data_path: Calibration data: a prepare_data.py folder (rows rendered with the artifact's template; held
            out: its validation split), a plain-text file, or JSON / JSONL rows whose --field holds text.
        field: JSON / JSONL: the field of each row that holds text.
        nsamples: Calibration samples: slices of --seqlen tokens at random places (seeded) of the calibration text.
        seqlen: Tokens per calibration sample.
        seed: Seed for the slices.
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
                   trust_remote_code=src.trust_remote_code, allow_pickle_weights=src.allow_pickle_weights,
                   allow_base_mismatch=src.allow_base_mismatch)
    if (plan.info.get("quantization") or "").startswith("gptq"):
        raise UsageError(f"--base_model {plan.source.base} is already quantized (GPTQ); quantize its floating-point "
                         "original (requantizing a quantized model is not supported yet)")
    if plan.source.method not in (None, "lora"):
        raise SuiteError(f"--lora_weights {plan.source.adapter}: a {plan.source.method} adapter cannot be merged into "
                         "its base; quantize the base model and load the adapter on it")
    if Path(plan.source.base).resolve() == Path(dest.output_dir).resolve():
        raise UsageError("--output_dir must not be the input model folder")
    data = calibration_data(cal, plan)  # every problem with the data before the model is read
    inputs = {"model": artifact_record(plan)["fingerprint"], "data": data.fingerprint,
              "eval": file_record(cal.eval_data_path)["sha256"] if cal.eval_data_path else None}
    fp = fingerprint(args, inputs)
    if out.up_to_date(fp):
        print(f"{STAGE}: --output_dir {dest.output_dir} already holds this quantization (fingerprint {fp[:12]}); "
              "nothing to do", file=sys.stderr)
        print(os.path.abspath(dest.output_dir))
        return
    report = quantize(args, plan, data, out, fp, inputs)
    print(f"{STAGE}: {report['layers_quantized']} layers quantized, {report['layers_kept']} kept; perplexity "
          f"{report['ppl_before']:.4f} -> {report['ppl_after']:.4f} (delta {report['delta_ppl']:+.4f})", file=sys.stderr)
    print(os.path.abspath(dest.output_dir))


@dataclass
class CalibrationData:
    """The calibration samples (token ids) and the held-out documents (texts, or token ids of a prepared split)."""

    samples: list
    held_out_texts: list[str] | None
    held_out_ids: list[list[int]] | None
    fingerprint: str


def calibration_data(cal: Calibration, plan) -> CalibrationData:
    """From a prepare_data.py folder (rows rendered with the artifact's template, as it was trained: --nsamples rows
    of its train split, seeded; held out: its validation split), or from text (--nsamples slices of --seqlen tokens
    at seeded places; held out: the last tenth of the documents, or --eval_data_path).

    Raises:
        SuiteError: too few usable rows or tokens (saying how many), no held-out text.
    """
    import torch

    from utils.evaluation.perplexity import read_texts

    held_texts = None
    if cal.eval_data_path:
        held_texts, _ = read_texts(cal.eval_data_path, cal.field, None, strict=False, flag="--eval_data_path")
    if Path(cal.data_path).is_dir():
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
        train = [ids for ids, _ in rows.get("train", []) if len(ids) >= 2]
        if len(train) < cal.nsamples:
            raise SuiteError(f"--data_path {cal.data_path}: {len(train)} usable training rows, fewer than "
                             f"--nsamples {cal.nsamples}; lower --nsamples or prepare more data")
        picked = random.Random(cal.seed).sample(range(len(train)), cal.nsamples)
        samples = [torch.tensor(train[i][:cal.seqlen]) for i in picked]
        held_ids = None if held_texts else [ids for ids, _ in rows.get("validation", [])]
        if not held_texts and not held_ids:
            raise SuiteError(f"--data_path {cal.data_path} has no validation split: give --eval_data_path for the "
                             "report's perplexity (held-out text must not be calibrated on)")
        return CalibrationData(samples, held_texts, held_ids, info.fingerprint or "")
    docs, bad = read_texts(cal.data_path, cal.field, None, strict=False, flag="--data_path")
    for reason, lines in bad.items():
        print(f"{STAGE}: --data_path: skipped {len(lines)} row(s), {reason}", file=sys.stderr)
    if held_texts is None:
        if len(docs) < 2:
            raise SuiteError("--data_path holds one document: give --eval_data_path for the report's perplexity "
                             "(held-out text must not be calibrated on)")
        cut = len(docs) - max(1, len(docs) // 10)
        docs, held_texts = docs[:cut], docs[cut:]
    samples = calibration_samples(plan.tokenizer, docs, cal.nsamples, cal.seqlen, cal.seed)
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
    from utils.inference.loading import load_model
    from utils.quant.calibrate import quantize_model
    from utils.quant.gptq import GPTQError, GPTQSettings
    from utils.quant.packing import packable

    m, cal, dest = args.method, args.calibration, args.destination
    started = time.perf_counter()
    loaded = load_model(plan)
    model = loaded.model
    if plan.source.adapter:
        model = model.merge_and_unload()  # LoRA / DoRA: W + BA, in memory (export_hf.py writes the same merge)
    model.eval()
    selected = select_modules(model, m.modules)  # a pattern that matches nothing fails before calibration
    tok = loaded.tokenizer
    context = getattr(model.config, "max_position_embeddings", None) or cal.seqlen
    if cal.seqlen > context:
        raise SuiteError(f"--seqlen {cal.seqlen} exceeds the model's context of {context} tokens")
    samples = data.samples
    window = min(context, 2048)
    before = held_out_ppl(model, tok, data, window)

    def keep(name, layer):
        if name not in selected:
            return "not selected by --modules"
        return packable(layer.in_features, layer.out_features, m.bits)

    settings = GPTQSettings(bits=m.bits, group_size=m.group_size, sym=m.sym, act_order=m.act_order,
                            static_groups=m.static_groups, damp_percent=m.damp_percent)
    try:
        done = quantize_model(model, samples, settings, method=m.method, keep=keep,
                              true_sequential=m.true_sequential, progress=dest.progress)
    except (GPTQError, ValueError) as exc:  # a singular Hessian, non-finite weights: named by layer
        raise SuiteError(str(exc)) from None
    after = held_out_ppl(model, tok, data, window)
    with out.produce(fp, args=args.flags(), inputs=inputs, base_model=loaded.info) as st:
        files = write_checkpoint(st.dir, model, done, m, dest, loaded)
        report = summary(done, m, before, after, files, st.dir, started, len(samples) * cal.seqlen)
        (st.dir / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        st.meta.update(quantization={"method": m.method, "bits": m.bits, "group_size": m.group_size})
    return report


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


def write_checkpoint(folder: Path, model, done, m: Method, dest: Destination, loaded) -> dict[str, int]:
    """The GPTQ layout: packed tensors for each quantized layer, every other tensor as the model holds it, in
    safetensors shards; config.json with quantization_config; quantize_config.json; tokenizer and template."""
    from utils.dtypes import dtype_code
    from utils.quant.packing import pack_gptq, quantize_config
    from utils.weights.shards import ShardWriter

    state = {k: v for k, v in model.state_dict().items()}
    tensors: dict = {}
    for name, value in state.items():
        module = name.rsplit(".", 1)[0]
        if module in done.layers and name.endswith(".weight"):
            for part, t in pack_gptq(done.layers[module]).items():
                tensors[f"{module}.{part}"] = t.contiguous()
        else:
            tensors[name] = value.detach().contiguous()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:  # written once, as transformers saves a tied model
        head = [n for n in tensors if n.endswith("lm_head.weight")]
        for n in head:
            del tensors[n]
    writer = ShardWriter(folder, [(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()],
                         parse_size(dest.max_shard_size))
    try:
        for n, t in tensors.items():
            writer.write(n, t.cpu())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    excluded = [r.name for r in done.report if r.kept]
    qc = quantize_config(m.bits, m.group_size, m.act_order, m.sym, m.static_groups, m.true_sequential,
                         m.damp_percent, excluded=excluded)
    config = model.config.to_dict()
    config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n", encoding="utf-8")
    loaded.tokenizer.save_pretrained(str(folder))
    template = loaded.template
    if getattr(template, "data", None) is not None:  # the artifact's own template travels with it
        (folder / "template.json").write_text(json.dumps(template.data, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    return {n: int(t.numel() * t.element_size()) for n, t in tensors.items()}


def summary(done, m: Method, before: dict, after: dict, files: dict[str, int], folder: Path, started: float,
            tokens: int) -> dict:
    quantized = [r for r in done.report if not r.kept]
    weights = sum(math.prod(r.shape) for r in quantized)
    stored = sum(size for name, size in files.items()
                 if name.rsplit(".", 1)[0] in done.layers and not name.endswith(".bias"))
    return {
        "method": m.method, "bits": m.bits, "group_size": m.group_size, "act_order": m.act_order, "sym": m.sym,
        "static_groups": m.static_groups, "true_sequential": m.true_sequential, "damp_percent": m.damp_percent,
        "ppl_before": before["ppl"], "ppl_after": after["ppl"], "delta_ppl": after["ppl"] - before["ppl"],
        "eval_tokens": after["tokens_scored"], "calibration_tokens": tokens,
        "layers_quantized": len(quantized), "layers_kept": len(done.report) - len(quantized),
        "bits_per_weight": 8 * stored / weights if weights else None,
        "size_on_disk_bytes": sum(p.stat().st_size for p in folder.rglob("*.safetensors")),
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "layers": [{"name": r.name, "shape": list(r.shape), "relative_error": r.relative_error, "kept": r.kept}
                   for r in done.report],
    }


def fingerprint(args: QuantizeArgs, inputs: dict) -> str:
    """What determines the output: every flag that counts and ``inputs`` (the model's, the calibration and
    evaluation texts' hashes). Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


if __name__ == "__main__":
    run(main)
