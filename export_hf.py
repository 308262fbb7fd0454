"""Export stage: merge a fine-tune into its base and write a Hugging Face model, verified and in bounded memory.

Reads a finetune.py output folder (the base model comes from its pipeline.json) or any PEFT LoRA adapter
with ``--base_model``, merges every LoRA variant (LoRA, rsLoRA, DoRA, LoRA on embeddings, GPT-2 Conv1D,
trained biases, modules_to_save) into the base tensor by tensor, straight from the safetensors shards,
and writes:

    OUTPUT_DIR/model-0000k-of-0000n.safetensors + model.safetensors.index.json   (--max_shard_size, --dtype)
    OUTPUT_DIR/config.json, generation_config.json
    OUTPUT_DIR/tokenizer files, chat_template.jinja (the training template), template.json
    OUTPUT_DIR/pipeline.json   sources with hashes, verification result, file hashes (written last)

Peak memory is one weight matrix plus the adapter, whatever the model size: every tensor is read from
disk when it is merged and streamed into the output shard as it is produced. Before the folder is
renamed into place, the merged model's logits on a fixed prompt are checked against base + adapter
(the adapter applied unmerged), again layer by layer from disk. A full fine-tune (or any model given
alone with --base_model) is re-sharded and re-typed the same way. Prefix, p-tuning and prompt-tuning
adapters cannot be merged; ``--adapter_only`` exports such an adapter as it is, with its tokenizer
and template.

Examples:
    python export_hf.py --lora_weights runs/lora --output_dir runs/merged
    python export_hf.py --base_model BASE --lora_weights some-peft-adapter --output_dir merged --dtype bf16
    python export_hf.py --lora_weights runs/full --output_dir runs/full-bf16 --dtype bf16 --max_shard_size 500MB
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from utils.args import Group, StageArgs, unfingerprinted
from utils.artifacts import Output, library_versions, sha256_json, write_json
from utils.cli import parse_size, run
from utils.dtypes import dtype_code, torch_dtype, torch_dtype_of
from utils.errors import SuiteError, UsageError
from utils.weights import forward
from utils.weights import shards  # by module: tests replace its ShardWriter to catch work begun too early
from utils.weights.config import config_dtype, read_config, set_config_dtype
from utils.weights.convert import (carry_template, copy_tokenizer, eos_token, floating, log, no_tokenizer_warning,
                                   tokenizer_source)
from utils.weights.export_plan import (ExportPlan, MergeInputs, check_base, hash_inputs, input_problems, plan_export,
                                       settle)
from utils.weights.merge import (adapter_weights_file, load_adapter, load_state, merge_bias, merge_weight,
                                 read_adapter_config)

STAGE = "export_hf"


@dataclass(frozen=True)
class Destination(Group):
    """Where the export is written."""

    output_dir: str | None = unfingerprinted(why="where the output is written, not what it holds")
    overwrite: bool = unfingerprinted(why="only allows replacing a different export")

    def problems(self) -> list[str]:
        return [] if self.output_dir else ["--output_dir is required"]


@dataclass(frozen=True)
class ExportHfArgs(StageArgs):
    STAGE = STAGE

    destination: Destination
    inputs: MergeInputs
    weights: shards.OutputWeights


Args = ExportHfArgs


def main(
    lora_weights: str | None = None,
    output_dir: str | None = None,
    *,
    base_model: str | None = None,
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    max_shard_size: str = "2GB",
    adapter_only: bool = False,
    allow_pickle_weights: bool = False,
    overwrite: bool = False,
) -> None:
    """Merge a fine-tune into its base model and write a Hugging Face model folder.

    Args:
        lora_weights: A finetune.py output folder (its base model is read from its pipeline.json), or any PEFT
            adapter folder (then --base_model is needed). A full fine-tune's folder is re-sharded and re-typed.
        output_dir: Folder to write (staged and renamed when complete; re-running with the same inputs is a no-op).
        base_model: The base model folder (overrides the one recorded by finetune.py, which must match it), or,
            without --lora_weights, a model to re-shard and re-type.
        dtype: Weight precision of the output: fp32, bf16, fp16, or auto (the base model's).
        max_shard_size: Largest safetensors shard (e.g. 200MB, 2GB, 1GiB).
        adapter_only: Export the adapter itself (PEFT format) with its tokenizer and template instead of merging;
            the way to export prefix, p-tuning and prompt-tuning adapters.
        allow_pickle_weights: Accept pytorch_model.bin / adapter_model.bin inputs (read with torch.load(weights_only=True)).
        overwrite: Replace an output_dir that holds a different export.
    """
    args = ExportHfArgs.from_flags(dict(locals()))
    check_flags(args)
    plan = plan_export(args.inputs, args.destination.output_dir)
    out = Output(args.destination.output_dir, STAGE, args.destination.overwrite)  # before any work (hashing included)
    check_base(plan)  # a wrong base is refused before the merge, not after it
    if up_to_date(args, plan, out):
        return
    started = time.time()
    with shards.conversion_setup():
        if args.inputs.adapter_only:
            export_adapter(args, plan, out)
        else:
            export_merged(args, plan, out)
    log(STAGE, f"wrote {args.destination.output_dir} in {time.time() - started:.1f}s")
    print(os.path.abspath(args.destination.output_dir))


def fingerprint(args: ExportHfArgs, inputs: dict) -> str:
    """The output's fingerprint: the input hashes and every flag that changes what is written."""
    return sha256_json({"stage": STAGE, "inputs": inputs, "args": args.fingerprint_values()})


def check_flags(args: ExportHfArgs) -> None:
    """Every problem with the flags themselves (and the input folders they name), reported together."""
    problems = args.problems() + input_problems(args.inputs)
    if problems:
        raise UsageError("\n".join(problems))


def up_to_date(args: ExportHfArgs, plan: ExportPlan, out: Output) -> bool:
    """Start hashing the inputs; whether the destination already holds this export (then nothing is done).

    With no destination yet there is nothing to compare the fingerprint with before the work: the inputs
    are hashed on a background thread while the merge runs, and checked before the output is put in place.
    """
    exists = out.state != "missing"
    hash_inputs(plan, now=exists)
    if not exists:
        return False
    fp = fingerprint(args, settle(plan))
    if not out.up_to_date(fp):
        return False
    log(STAGE, f"{args.destination.output_dir} already holds this export (fingerprint {fp[:12]}); nothing to do")
    print(os.path.abspath(args.destination.output_dir))
    return True


@dataclass
class MergeJob:
    """What export_merged reads and writes: the source model, the adapter merged into it, and every output tensor's
    dtype code and shape, in the order they are written."""
    source: Path
    adapter_dir: Path | None
    config: dict
    dtype: str
    weights: object  # utils.weights.shards.ModelWeights
    adapter: object  # utils.weights.merge's loaded adapter, or None to re-shard
    targets: dict
    replacements: dict
    untie: bool
    names: list
    out_code: dict
    shape: dict


def export_merged(args: ExportHfArgs, plan: ExportPlan, out: Output) -> None:
    """Merge the adapter (if any) into the source tensor by tensor, write the model folder, verify it, and put
    it in place."""
    job = plan_merge(plan, args.weights.dtype, args.inputs.allow_pickle_weights)
    # A function: the inputs may still be hashing in the background (see up_to_date); produce() waits for them
    # only where it needs the value.
    with out.produce(lambda: fingerprint(args, settle(plan))) as st:
        hashes, changed, unchanged_targets = write_tensors(st.dir, job, parse_size(args.weights.max_shard_size))
        check_merge_changed(job, changed, unchanged_targets)
        out_config = write_config(st.dir, job)
        template, tokenizer = copy_companions(st.dir, job, plan)
        verification = verify_export(out_config, job, st.dir, args.inputs.allow_pickle_weights)
        verification.update({"merged_tensors": changed, "lora_modules": len(job.targets),
                             "unchanged_after_rounding": len(unchanged_targets)})
        st.meta.update(merged_meta(args, plan, job, settle(plan), template, tokenizer, verification))
        st.known_hashes.update(hashes)


def plan_merge(plan: ExportPlan, dtype: str, allow_pickle: bool) -> MergeJob:
    """Open the source and the adapter, check that the adapter fits the source, and lay out the output tensors
    (``dtype``: --dtype, auto being the source's)."""
    source, adapter_dir = plan.source, plan.adapter
    config = read_config(source, "--base_model")
    dtype = config_dtype(config) if dtype == "auto" else dtype
    out_dtype = torch_dtype_of(dtype)
    weights = shards.ModelWeights(source, allow_pickle)
    adapter = load_adapter(adapter_dir, allow_pickle) if adapter_dir else None
    targets = dict(adapter.targets) if adapter else {}
    replacements = dict(adapter.replacements) if adapter else {}
    new, untie = check_adapter_fits(adapter_dir, weights, targets, replacements,
                                    bool(config.get("tie_word_embeddings", False)))
    names = weights.names() + new
    out_code = {n: (dtype_code(out_dtype) if floating(code_of(weights, replacements, n)) else code_of(weights, replacements, n))
                for n in names}
    shape = {n: weights.entries[n].shape if n in weights else tuple(replacements[n].shape) for n in names}
    log(STAGE, f"{'merging ' + str(len(targets)) + ' LoRA modules into ' if adapter else 're-sharding '}{source} "
               f"({len(names)} tensors, {weights.total_bytes / 1e9:.2f} GB) -> {dtype}")
    return MergeJob(source, adapter_dir, config, dtype, weights, adapter, targets, replacements, untie,
                    names, out_code, shape)


def check_adapter_fits(adapter_dir, weights, targets: dict, replacements: dict, tied: bool) -> tuple[list, bool]:
    """Refuse an adapter whose modules or tensors the base lacks or shapes differently; (the tensors it adds,
    whether the output head is untied)."""
    missing = [n for n in targets if n not in weights]
    if missing:
        head = [n for n in missing if n.startswith("lm_head")]
        if head and tied:
            raise SuiteError(f"--lora_weights {adapter_dir}: the adapter changes lm_head, which this base ties to its "
                             "input embeddings; merging would change both. Not supported")
        raise SuiteError(f"--lora_weights {adapter_dir}: adapted modules not in the base model: {missing[:3]} "
                         "(trained on another architecture?)")
    new = [n for n in replacements if n not in weights]
    untie = False
    for n in new:
        if n == "lm_head.weight" and tied:
            untie = True  # a saved output head of a tied model: write it and untie
        else:
            raise SuiteError(f"--lora_weights {adapter_dir}: adapter tensor {n} replaces nothing in the base model")
    for n, t in replacements.items():
        if n in weights and tuple(t.shape) != weights.entries[n].shape:
            raise SuiteError(f"--lora_weights {adapter_dir}: {n} has shape {tuple(t.shape)}, the base "
                             f"{weights.entries[n].shape} (resized vocabulary?); not supported")
    return new, untie


def write_tensors(tmp: Path, job: MergeJob, limit: int) -> tuple[dict, int, list]:
    """Stream every output tensor, merged or copied, into the shards; (file hashes, tensors the merge changed,
    adapted weights unchanged after rounding)."""
    from tqdm import tqdm

    weights, targets, replacements = job.weights, job.targets, job.replacements
    changed, unchanged_targets = 0, []
    scratch = shards.Scratch()
    writer = shards.ShardWriter(tmp, [(n, job.out_code[n], job.shape[n]) for n in job.names], limit)
    try:
        for name in tqdm(job.names, desc="export", unit="tensor", file=sys.stderr, disable=None):
            want = torch_dtype(job.out_code[name])
            if name in targets:
                if write_merged_target(name, job, writer, scratch, want):
                    changed += 1
                else:
                    unchanged_targets.append(name)
            elif name.endswith(".bias") and name[: -len("bias")] + "weight" in targets \
                    and "B_bias" in targets[name[: -len("bias")] + "weight"].parts:
                target = targets[name[: -len("bias")] + "weight"]
                writer.write(name, merge_bias(target, weights.get(name)).to(want))
                changed += 1
            elif name in replacements:
                writer.write(name, replacements[name].to(want))
                changed += 1
            else:
                shards.copy_tensor(weights, name, writer, dtype=want)
        hashes = writer.close()
    finally:
        writer.abort()
    scratch.clear()
    shards.COPY_SCRATCH.clear()
    return hashes, changed, unchanged_targets


def write_merged_target(name: str, job: MergeJob, writer, scratch, want) -> bool:
    """Merge the adapter into one adapted weight and write it; whether the merge changed it."""
    import torch

    base_w = job.weights.get(name, scratch=scratch)
    # Whether the merge changed the weight, from a strided sample (a full copy would double
    # the memory traffic; the logit check below is the real test).
    step = max(1, base_w.numel() // 4096)
    sample = base_w.reshape(-1)[::step].to(want, copy=True)
    merged = merge_weight(job.targets[name], base_w, job.adapter.fan_in_fan_out).to(want)
    is_changed = not torch.equal(merged.reshape(-1)[::step], sample)
    writer.write(name, merged)
    scratch.release()
    return is_changed


def check_merge_changed(job: MergeJob, changed: int, unchanged_targets: list) -> None:
    """Refuse a merge that changed nothing; warn about adapted weights lost to rounding."""
    if job.adapter and changed == 0:
        raise SuiteError(f"--lora_weights {job.adapter_dir}: the merge changed no weight in {job.dtype} (adapter too small "
                         "for this precision, or zero); nothing written")
    if unchanged_targets:
        log(STAGE, f"warning: {len(unchanged_targets)} adapted weights are unchanged after rounding to {job.dtype} "
                   f"(sampled; e.g. {unchanged_targets[0]})")


def write_config(tmp: Path, job: MergeJob) -> dict:
    """config.json with the output dtype (and the output head untied if the adapter saved one)."""
    out_config = set_config_dtype(job.config, job.dtype)
    if job.untie:
        out_config["tie_word_embeddings"] = False
    write_json(tmp / "config.json", out_config)
    return out_config


def copy_companions(tmp: Path, job: MergeJob, plan: ExportPlan) -> tuple:
    """generation_config.json, the tokenizer and the template, from the fine-tune if it has them, else the source;
    (the template record, the tokenizer record)."""
    source = job.source
    extra = plan.adapter or plan.source
    for name in ("generation_config.json",):
        for folder in (extra, source):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
                break
    tok = tokenizer_source(extra, source)
    tokenizer_files = copy_tokenizer(tok, tmp)
    if not tokenizer_files:
        no_tokenizer_warning(STAGE, {"--lora_weights": plan.lora, "--base_model": source}
                             if plan.lora != source else {"--lora_weights": source})
    template = carry_template((extra / "template.json"), tmp, eos_token(tok), STAGE)
    return template, {"files": tokenizer_files, "from": str(tok) if tok else None}


def verify_export(out_config: dict, job: MergeJob, tmp: Path, allow_pickle: bool) -> dict:
    """Check the written model's logits (see verify) and say so."""
    adapter = job.adapter
    verification = verify(out_config, job.source, job.weights, adapter, tmp, job.dtype, allow_pickle)
    log(STAGE, f"verified: logits of the {'merged model' if adapter else 'output'} match "
               f"{'base + adapter' if adapter else 'the source'} "
               f"{forward.agreement(verification, verification['method'])}")
    return verification


def merged_meta(args: ExportHfArgs, plan: ExportPlan, job: MergeJob, inputs: dict, template, tokenizer: dict,
                verification: dict) -> dict:
    """What pipeline.json records of a merge: the sources with their hashes and the verification result."""
    adapter, adapter_dir = job.adapter, job.adapter_dir
    method = plan.meta.raw.get("method") if plan.meta else None
    finetune = plan.meta if plan.meta is not None and plan.meta.stage == "finetune" else None
    return {
        "args": args.flags(),
        "kind": "merged" if adapter else "resharded",
        "dtype": job.dtype,
        "base_model": {"path": os.path.abspath(job.source), "fingerprint": inputs["base"]},
        "lora_weights": ({"path": os.path.abspath(adapter_dir), "files": inputs["lora_weights"],
                          "peft_type": adapter.peft_type, "use_dora": adapter.use_dora,
                          "use_rslora": bool(adapter.config.get("use_rslora")),
                          "method": method} if adapter else None),
        "source_finetune": ({"path": os.path.abspath(args.inputs.lora_weights), "fingerprint": finetune.fingerprint}
                            if finetune else None),
        "template": template,
        "tokenizer": tokenizer,
        "verification": verification,
        "versions": library_versions("torch", "safetensors"),
    }


def code_of(weights, replacements, name: str) -> str:
    if name in weights:
        return weights.entries[name].dtype
    return dtype_code(replacements[name].dtype)


def verify(config: dict, source: Path, weights, adapter, out_dir: Path, dtype: str, allow_pickle: bool) -> dict:
    """Logits of the written model vs the source (+ adapter, unmerged) on a fixed prompt.

    Bounded memory: for the architectures ``utils.weights.forward`` covers, both forward passes read each weight
    from disk when its layer runs, so the check never holds more than one weight matrix (loading two
    models, or even importing transformers' model code, would cost more than the whole conversion).
    Other architectures are checked through transformers, loading the models whole.
    """
    ids = forward.probe_ids(config)
    if forward.supported(config):
        ref = forward.logits(config, forward.WeightSource(weights, adapter), ids)
        got = forward.logits(config, forward.WeightSource(shards.ModelWeights(out_dir)), ids)
        method = "layer-by-layer from disk"
    else:
        ref, got = verify_with_transformers(source, adapter.folder if adapter else None, out_dir, ids, allow_pickle)
        method = "transformers (whole models)"
    result = forward.compare(ref, got)
    forward.check_agreement(result, dtype, "output vs " + ("base + adapter" if adapter else "source"))
    return {**result, "prompt_ids": ids, "method": method}


def verify_with_transformers(source: Path, adapter_dir: Path | None, out_dir: Path, ids: list[int], allow_pickle: bool):
    import torch
    from transformers import AutoModelForCausalLM

    x = torch.tensor([ids])
    kw = {"local_files_only": True, "dtype": torch.float32}
    step = f"loading {source} in transformers"
    try:  # a config transformers cannot build (damaged, or an architecture it lacks) is the input's problem
        with torch.no_grad():
            base = AutoModelForCausalLM.from_pretrained(str(source), use_safetensors=not allow_pickle, **kw).eval()
            if adapter_dir is not None:
                from peft import PeftModel

                step = f"applying {adapter_dir} with peft"
                base = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
            ref = base(input_ids=x).logits[0].float()
            del base
            step = "loading the output in transformers"
            got = AutoModelForCausalLM.from_pretrained(str(out_dir), **kw).eval()(input_ids=x).logits[0].float()
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as exc:
        raise SuiteError(f"verification failed while {step} ({type(exc).__name__}: {exc}); nothing was written") \
            from None
    return ref, got


def export_adapter(args: ExportHfArgs, plan: ExportPlan, out: Output) -> None:
    """Copy the adapter (PEFT format, safetensors) with its tokenizer, template and chat template."""
    src = plan.adapter
    config = read_adapter_config(src)
    state = load_state(adapter_weights_file(src, args.inputs.allow_pickle_weights))
    check_adapter_state(src, state)
    inputs = settle(plan)
    with out.produce(fingerprint(args, inputs)) as st:
        write_adapter(st.dir, config, state, plan.base)
        tok = tokenizer_source(src, plan.base)
        files = copy_tokenizer(tok, st.dir)
        template = carry_template(src / "template.json", st.dir, eos_token(tok), STAGE)
        st.meta.update({
            "args": args.flags(), "kind": "adapter",
            "method": plan.meta.raw.get("method") if plan.meta else None, "peft_type": config.get("peft_type"),
            "base_model": {"path": os.path.abspath(plan.base) if plan.base else None, "fingerprint": inputs["base"]},
            "lora_weights": {"path": os.path.abspath(src), "files": inputs.get("lora_weights")},
            "template": template, "tokenizer": {"files": files, "from": str(tok) if tok else None},
            "versions": library_versions("torch", "safetensors", "peft"),
        })


def check_adapter_state(src: Path, state: dict) -> None:
    """Refuse an adapter with nothing in it (empty, all zeros) or with non-finite values."""
    import torch

    if not state or all(float(v.abs().max()) == 0 for v in state.values() if v.numel()):
        raise SuiteError(f"--lora_weights {src}: the adapter is empty or all zeros; nothing to export")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SuiteError(f"--lora_weights {src}: non-finite values in {bad[:3]}")


def write_adapter(folder: Path, config: dict, state: dict, base: Path | None) -> None:
    """adapter_config.json (naming the base it applies to) and adapter_model.safetensors."""
    from safetensors.torch import save_file

    config["base_model_name_or_path"] = os.path.abspath(base) if base else None
    write_json(folder / "adapter_config.json", config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


if __name__ == "__main__":
    run(main)
