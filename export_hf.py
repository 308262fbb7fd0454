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
from pathlib import Path
from typing import Literal

from utils.cli import SuiteError, UsageError, run

STAGE = "export_hf"


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
    args = dict(locals())
    plan = resolve(args)
    from utils.artifacts import check_output_dir, claim_output_dir

    claim_output_dir(output_dir, STAGE, overwrite)  # before any work (hashing the inputs included)
    check_base(plan)  # a wrong base is refused before the merge, not after it
    from utils.convert import Deferred, log, sweep_stale

    sweep_stale(output_dir)
    # With no destination yet there is nothing to compare the fingerprint with before the work: the inputs
    # are hashed on a background thread while the merge runs, and checked before the output is put in place.
    exists = Path(output_dir).exists()
    plan["deferred"] = Deferred(plan["fingerprints_fn"], now=exists)
    if exists:
        fingerprint = settle(args, plan)
        if check_output_dir(output_dir, STAGE, fingerprint, overwrite):
            log(STAGE, f"{output_dir} already holds this export (fingerprint {fingerprint[:12]}); nothing to do")
            print(os.path.abspath(output_dir))
            return
    started = time.time()
    from utils.shards import conversion_setup

    with conversion_setup():
        if adapter_only:
            export_adapter(args, plan)
        else:
            export_merged(args, plan)
    log(STAGE, f"wrote {output_dir} in {time.time() - started:.1f}s")
    print(os.path.abspath(output_dir))


def resolve(a: dict) -> dict:
    """Validate the flags and work out what is exported: {mode, base, adapter, source, meta, fingerprints}."""
    from utils.artifacts import read_meta
    from utils.convert import check_destination
    from utils.shards import parse_size

    problems = []
    if not a["output_dir"]:
        problems.append("--output_dir is required")
    if not a["lora_weights"] and not a["base_model"]:
        problems.append("give --lora_weights (a finetune.py output or PEFT adapter) and/or --base_model")
    try:
        parse_size(a["max_shard_size"])
    except SuiteError as exc:
        problems.append(str(exc))
    from utils.model import missing_folder

    for flag in ("lora_weights", "base_model"):
        if a[flag] and not Path(a[flag]).is_dir():
            problems.append(missing_folder(a[flag], f"--{flag}"))
    if problems:
        raise UsageError("\n".join(problems))
    lora = Path(a["lora_weights"]) if a["lora_weights"] else None
    meta = read_meta(lora) if lora else None
    if meta is not None and meta.get("stage") == "finetune" and not meta.get("complete"):
        raise SuiteError(f"--lora_weights {lora}: the fine-tune did not finish (pipeline.json is not complete)")
    is_adapter = lora is not None and (lora / "adapter_config.json").is_file()
    if lora is not None and not is_adapter and not (lora / "config.json").is_file():
        raise SuiteError(f"--lora_weights {lora}: neither a PEFT adapter (adapter_config.json) nor a model (config.json)")
    mode = "merge" if is_adapter else "reshard"
    if is_adapter:
        from utils.merge import check_adapter_dir

        check_adapter_dir(lora, a["allow_pickle_weights"])
    if a["adapter_only"] and not is_adapter:
        raise UsageError(f"--adapter_only: --lora_weights {lora} is not an adapter folder")
    base = a["base_model"]
    recorded = (meta or {}).get("base_model", {}) if is_adapter else {}
    if is_adapter and base is None:
        base = recorded.get("path")
        if not base:
            raise UsageError(f"--lora_weights {lora} has no finetune.py pipeline.json naming its base; give --base_model")
        if not Path(base).is_dir():
            raise SuiteError(f"--lora_weights {lora} was trained on {base}, which no longer exists; give --base_model")
    source = Path(base) if mode == "reshard" and lora is None else (lora if mode == "reshard" else Path(base))
    if mode == "reshard" and lora is not None and a["base_model"]:
        raise UsageError(f"--lora_weights {lora} is a full model; --base_model is not used with it")
    problems = check_destination(a["output_dir"], {"--lora_weights": a["lora_weights"], "--base_model": str(source)})
    if problems:
        raise UsageError("\n".join(problems))
    from utils.convert import check_config, read_config
    from utils.model import check_model_dir

    flag = "--base_model" if source != lora else "--lora_weights"
    problems = check_model_dir(str(source), a["allow_pickle_weights"], flag)
    if problems:
        raise SuiteError("\n".join(problems))
    check_config(read_config(source, flag), source, flag)
    recorded_fp = recorded.get("fingerprint") if is_adapter and not a["adapter_only"] else None
    if recorded_fp:  # the cheap part now (config hash, weight file names and sizes); the weights' hashes in check_base
        from utils.artifacts import sha256_file

        sizes = {name: entry[0] for name, entry in (recorded_fp.get("weights") or {}).items()}
        if (recorded_fp.get("config") and sha256_file(source / "config.json") != recorded_fp["config"]) or \
                (sizes and sizes != {p.name: p.stat().st_size for p in sorted(source.glob("*.safetensors"))}):
            raise SuiteError(wrong_base(base, lora, recorded))
    known: dict = {}  # the base's fingerprint once check_base has computed it

    def base_fingerprint_now() -> dict:
        from finetune import base_fingerprint
        from utils.artifacts import sha256_file

        if "base" not in known:
            base_fp = base_fingerprint(str(source))
            if not base_fp["weights"]:  # pickle weights (opt-in): hash those instead
                base_fp["weights"] = {p.name: [p.stat().st_size, sha256_file(p)]
                                      for p in sorted(source.glob("pytorch_model*"))}
            known["base"] = base_fp
        return known["base"]

    def fingerprints() -> dict:
        from utils.artifacts import sha256_file, tokenizer_fingerprint

        out = {"base": base_fingerprint_now()}
        if lora is not None:
            out["lora_weights"] = {p.name: sha256_file(p) for p in sorted(lora.iterdir())
                                   if p.is_file() and (p.name.startswith(("adapter_", "model")) or p.suffix == ".json")
                                   and p.name != "pipeline.json"}
            out["tokenizer"] = tokenizer_fingerprint(lora)
        return out

    return {"mode": mode, "base": Path(base) if base else None, "adapter": lora if is_adapter else None,
            "source": source, "meta": meta, "fingerprints_fn": fingerprints, "recorded_base": recorded_fp,
            "recorded": recorded, "lora": lora, "base_fingerprint_fn": base_fingerprint_now}


def check_base(plan: dict) -> None:
    """Refuse a base that is not the one the fine-tune recorded, before any merge work: its weight files are
    hashed now (not in the background during the merge), since only their content tells two models with the same
    config apart. The result is reused for the stage's fingerprint."""
    if plan["recorded_base"] and plan["recorded_base"] != plan["base_fingerprint_fn"]():
        raise SuiteError(wrong_base(plan["base"], plan["lora"], plan["recorded"]))


def wrong_base(base, lora, recorded) -> str:
    return (f"--base_model {base} is not the model {lora} was trained on (recorded: {recorded.get('path')}; "
            "its config or weights differ); merging into another base gives a wrong model")


def settle(a: dict, plan: dict) -> str:
    """The input fingerprints (waiting for them if they were hashed in the background) and the stage fingerprint;
    refuses a base that is not the one the fine-tune recorded."""
    from utils.artifacts import sha256_json

    fps = plan["fingerprints"] = plan["deferred"].result()
    if plan["recorded_base"] and plan["recorded_base"] != fps["base"]:
        raise SuiteError(wrong_base(plan["base"], plan["lora"], plan["recorded"]))
    return sha256_json({"stage": STAGE, "inputs": fps,
                        "args": {k: a[k] for k in ("dtype", "max_shard_size", "adapter_only")}})


def export_merged(a: dict, plan: dict) -> None:
    import torch

    from utils import forward
    from utils.artifacts import finish_meta, library_versions, staged_dir, write_json
    from utils.convert import (DTYPES, config_dtype, copy_tokenizer, floating, log, read_config, set_config_dtype,
                               tokenizer_source, carry_template, eos_token, no_tokenizer_warning)
    from utils.merge import load_adapter, merge_bias, merge_weight
    from utils.shards import COPY_SCRATCH, ModelWeights, Scratch, ShardWriter, copy_tensor, parse_size, torch_dtype

    source, adapter_dir = plan["source"], plan["adapter"]
    config = read_config(source, "--base_model")
    dtype = config_dtype(config) if a["dtype"] == "auto" else a["dtype"]
    out_dtype = getattr(torch, DTYPES[dtype])
    weights = ModelWeights(source, a["allow_pickle_weights"])
    adapter = load_adapter(adapter_dir, a["allow_pickle_weights"]) if adapter_dir else None
    targets = dict(adapter.targets) if adapter else {}
    replacements = dict(adapter.replacements) if adapter else {}
    tied = bool(config.get("tie_word_embeddings", False))
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

    names = weights.names() + new
    out_code = {n: (dtype_code_of(out_dtype) if floating(code_of(weights, replacements, n)) else code_of(weights, replacements, n))
                for n in names}
    shape = {n: weights.entries[n].shape if n in weights else tuple(replacements[n].shape) for n in names}
    limit = parse_size(a["max_shard_size"])
    n_lora = len(targets)
    log(STAGE, f"{'merging ' + str(n_lora) + ' LoRA modules into ' if adapter else 're-sharding '}{source} "
               f"({len(names)} tensors, {weights.total_bytes / 1e9:.2f} GB) -> {dtype}")
    from tqdm import tqdm

    changed, unchanged_targets = 0, []
    scratch = Scratch()
    with staged_dir(a["output_dir"]) as tmp:
        writer = ShardWriter(tmp, [(n, out_code[n], shape[n]) for n in names], limit)
        try:
            for name in tqdm(names, desc="export", unit="tensor", file=sys.stderr, disable=None):
                want = torch_dtype(out_code[name])
                if name in targets:
                    base_w = weights.get(name, scratch=scratch)
                    # Whether the merge changed the weight, from a strided sample (a full copy would double
                    # the memory traffic; the logit check below is the real test).
                    step = max(1, base_w.numel() // 4096)
                    sample = base_w.reshape(-1)[::step].to(want, copy=True)
                    merged = merge_weight(targets[name], base_w, adapter.fan_in_fan_out).to(want)
                    if torch.equal(merged.reshape(-1)[::step], sample):
                        unchanged_targets.append(name)
                    else:
                        changed += 1
                    writer.write(name, merged)
                    scratch.release()
                    del base_w, merged
                elif name.endswith(".bias") and name[: -len("bias")] + "weight" in targets \
                        and "B_bias" in targets[name[: -len("bias")] + "weight"].parts:
                    t = targets[name[: -len("bias")] + "weight"]
                    writer.write(name, merge_bias(t, weights.get(name)).to(want))
                    changed += 1
                elif name in replacements:
                    writer.write(name, replacements[name].to(want))
                    changed += 1
                else:
                    copy_tensor(weights, name, writer, dtype=want)
            hashes = writer.close()
        finally:
            writer.abort()
        scratch.clear()
        COPY_SCRATCH.clear()
        if adapter and changed == 0:
            raise SuiteError(f"--lora_weights {adapter_dir}: the merge changed no weight in {dtype} (adapter too small "
                             "for this precision, or zero); nothing written")
        if unchanged_targets:
            log(STAGE, f"warning: {len(unchanged_targets)} adapted weights are unchanged after rounding to {dtype} "
                       f"(sampled; e.g. {unchanged_targets[0]})")
        out_config = set_config_dtype(config, dtype)
        if untie:
            out_config["tie_word_embeddings"] = False
        write_json(tmp / "config.json", out_config)
        extra = plan["adapter"] or plan["source"]
        for name in ("generation_config.json",):
            for folder in (extra, source):
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, tmp / name)
                    break
        tok = tokenizer_source(extra, source)
        tokenizer_files = copy_tokenizer(tok, tmp)
        if not tokenizer_files:
            no_tokenizer_warning(STAGE, {"--lora_weights": plan["lora"], "--base_model": source}
                                 if plan["lora"] != source else {"--lora_weights": source})
        template = carry_template((extra / "template.json"), tmp, eos_token(tok), STAGE)

        verification = verify(out_config, source, weights, adapter, tmp, dtype, a["allow_pickle_weights"])
        verification.update({"merged_tensors": changed, "lora_modules": n_lora,
                             "unchanged_after_rounding": len(unchanged_targets)})
        log(STAGE, f"verified: logits of the {'merged model' if adapter else 'output'} match "
                   f"{'base + adapter' if adapter else 'the source'} "
                   f"{forward.agreement(verification, verification['method'])}")
        meta = plan["meta"] or {}
        fingerprint = settle(a, plan)
        finish_meta(tmp, {
            "stage": STAGE,
            "fingerprint": fingerprint,
            "args": a,
            "kind": "merged" if adapter else "resharded",
            "dtype": dtype,
            "base_model": {"path": os.path.abspath(source), "fingerprint": plan["fingerprints"]["base"]},
            "lora_weights": ({"path": os.path.abspath(adapter_dir), "files": plan["fingerprints"]["lora_weights"],
                              "peft_type": adapter.peft_type, "use_dora": adapter.use_dora,
                              "use_rslora": bool(adapter.config.get("use_rslora")),
                              "method": meta.get("method")} if adapter else None),
            "source_finetune": ({"path": os.path.abspath(a["lora_weights"]), "fingerprint": meta.get("fingerprint")}
                                if meta.get("stage") == "finetune" else None),
            "template": template,
            "tokenizer": {"files": tokenizer_files, "from": str(tok) if tok else None},
            "verification": verification,
            "versions": library_versions("torch", "safetensors"),
        }, known_hashes=hashes)


def code_of(weights, replacements, name: str) -> str:
    if name in weights:
        return weights.entries[name].dtype
    return dtype_code_of(replacements[name].dtype)


def dtype_code_of(dtype) -> str:
    from utils.shards import dtype_code

    return dtype_code(dtype)


def verify(config: dict, source: Path, weights, adapter, out_dir: Path, dtype: str, allow_pickle: bool) -> dict:
    """Logits of the written model vs the source (+ adapter, unmerged) on a fixed prompt.

    Bounded memory: for the architectures ``utils.forward`` covers, both forward passes read each weight
    from disk when its layer runs, so the check never holds more than one weight matrix (loading two
    models, or even importing transformers' model code, would cost more than the whole conversion).
    Other architectures are checked through transformers, loading the models whole.
    """
    from utils import forward
    from utils.shards import ModelWeights

    ids = forward.probe_ids(config)
    if forward.supported(config):
        ref = forward.logits(config, forward.Source(weights, adapter), ids)
        got = forward.logits(config, forward.Source(ModelWeights(out_dir)), ids)
        method = "layer-by-layer from disk"
    else:
        ref, got = verify_with_transformers(source, adapter.folder if adapter else None, out_dir, ids, allow_pickle)
        method = "transformers (whole models)"
    result = forward.compare(ref, got)
    forward.check(result, dtype, "output vs " + ("base + adapter" if adapter else "source"))
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


def export_adapter(a: dict, plan: dict) -> None:
    """Copy the adapter (PEFT format, safetensors) with its tokenizer, template and chat template."""
    import torch

    from utils.artifacts import finish_meta, library_versions, staged_dir
    from utils.convert import carry_template, copy_tokenizer, eos_token, tokenizer_source
    from utils.merge import adapter_weights_file, load_state, read_adapter_config

    src = plan["adapter"]
    config = read_adapter_config(src)
    state = load_state(adapter_weights_file(src, a["allow_pickle_weights"]))
    if not state or all(float(v.abs().max()) == 0 for v in state.values() if v.numel()):
        raise SuiteError(f"--lora_weights {src}: the adapter is empty or all zeros; nothing to export")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SuiteError(f"--lora_weights {src}: non-finite values in {bad[:3]}")
    fingerprint = settle(a, plan)
    with staged_dir(a["output_dir"]) as tmp:
        from safetensors.torch import save_file

        from utils.artifacts import write_json

        config["base_model_name_or_path"] = os.path.abspath(plan["base"]) if plan["base"] else None
        write_json(tmp / "adapter_config.json", config)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        tok = tokenizer_source(src, plan["base"])
        files = copy_tokenizer(tok, tmp)
        template = carry_template(src / "template.json", tmp, eos_token(tok), STAGE)
        finish_meta(tmp, {
            "stage": STAGE, "fingerprint": fingerprint, "args": a, "kind": "adapter",
            "method": (plan["meta"] or {}).get("method"), "peft_type": config.get("peft_type"),
            "base_model": {"path": os.path.abspath(plan["base"]) if plan["base"] else None,
                           "fingerprint": plan["fingerprints"]["base"]},
            "lora_weights": {"path": os.path.abspath(src), "files": plan["fingerprints"].get("lora_weights")},
            "template": template, "tokenizer": {"files": files, "from": str(tok) if tok else None},
            "versions": library_versions("torch", "safetensors", "peft"),
        })


if __name__ == "__main__":
    run(main)
