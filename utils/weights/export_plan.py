"""What an export reads, checked before any work: the fine-tune or adapter (``--lora_weights``), the base it
merges into (``--base_model``, or the one finetune.py recorded, which must match it), and the input
fingerprints. Shared by export_hf.py and export_state_dict.py, which merge the same inputs the same way.
"""

from __future__ import annotations

from pathlib import Path

from utils.errors import SuiteError, UsageError


def plan_export(a: dict) -> dict:
    """Validate the flags and work out what is exported: {mode, base, adapter, source, meta, fingerprints}."""
    check_flags(a)
    lora, meta, is_adapter = check_lora(a)
    base, recorded = find_base(a, lora, meta, is_adapter)
    source = find_source(a, lora, base, is_adapter)
    check_source(source, lora, a["allow_pickle_weights"])
    recorded_fp = recorded.get("fingerprint") if is_adapter and not a["adapter_only"] else None
    if recorded_fp:
        check_base_cheaply(source, base, lora, recorded, recorded_fp)
    base_fingerprint_now, fingerprints = fingerprinters(source, lora)
    return {"mode": "merge" if is_adapter else "reshard", "base": Path(base) if base else None,
            "adapter": lora if is_adapter else None,
            "source": source, "meta": meta, "fingerprints_fn": fingerprints, "recorded_base": recorded_fp,
            "recorded": recorded, "lora": lora, "base_fingerprint_fn": base_fingerprint_now}


def check_flags(a: dict) -> None:
    """Every problem with the flags themselves, reported together."""
    from utils.weights.folders import missing_folder
    from utils.cli import parse_size

    problems = []
    if not a["output_dir"]:
        problems.append("--output_dir is required")
    if not a["lora_weights"] and not a["base_model"]:
        problems.append("give --lora_weights (a finetune.py output or PEFT adapter) and/or --base_model")
    try:
        parse_size(a["max_shard_size"])
    except SuiteError as exc:
        problems.append(str(exc))
    for flag in ("lora_weights", "base_model"):
        if a[flag] and not Path(a[flag]).is_dir():
            problems.append(missing_folder(a[flag], f"--{flag}"))
    if problems:
        raise UsageError("\n".join(problems))


def check_lora(a: dict) -> tuple[Path | None, dict | None, bool]:
    """--lora_weights: a finished fine-tune's adapter or full model; (folder, its pipeline.json, is an adapter)."""
    from utils.artifacts import read_meta

    lora = Path(a["lora_weights"]) if a["lora_weights"] else None
    meta = read_meta(lora) if lora else None
    if meta is not None and meta.get("stage") == "finetune" and not meta.get("complete"):
        raise SuiteError(f"--lora_weights {lora}: the fine-tune did not finish (pipeline.json is not complete)")
    is_adapter = lora is not None and (lora / "adapter_config.json").is_file()
    if lora is not None and not is_adapter and not (lora / "config.json").is_file():
        raise SuiteError(f"--lora_weights {lora}: neither a PEFT adapter (adapter_config.json) nor a model (config.json)")
    if is_adapter:
        from utils.weights.merge import check_adapter_dir

        check_adapter_dir(lora, a["allow_pickle_weights"])
    if a["adapter_only"] and not is_adapter:
        raise UsageError(f"--adapter_only: --lora_weights {lora} is not an adapter folder")
    return lora, meta, is_adapter


def find_base(a: dict, lora: Path | None, meta: dict | None, is_adapter: bool) -> tuple[str | None, dict]:
    """The base an adapter merges into (--base_model, else the one its fine-tune recorded) and that record."""
    base = a["base_model"]
    recorded = (meta or {}).get("base_model", {}) if is_adapter else {}
    if is_adapter and base is None:
        base = recorded.get("path")
        if not base:
            raise UsageError(f"--lora_weights {lora} has no finetune.py pipeline.json naming its base; give --base_model")
        if not Path(base).is_dir():
            raise SuiteError(f"--lora_weights {lora} was trained on {base}, which no longer exists; give --base_model")
    return base, recorded


def find_source(a: dict, lora: Path | None, base: str | None, is_adapter: bool) -> Path:
    """The model whose weights are read: a full fine-tune itself, else the base; refuses an output_dir among them."""
    from utils.weights.convert import check_destination

    source = lora if lora is not None and not is_adapter else Path(base)
    if not is_adapter and lora is not None and a["base_model"]:
        raise UsageError(f"--lora_weights {lora} is a full model; --base_model is not used with it")
    problems = check_destination(a["output_dir"], {"--lora_weights": a["lora_weights"], "--base_model": str(source)})
    if problems:
        raise UsageError("\n".join(problems))
    return source


def check_source(source: Path, lora: Path | None, allow_pickle: bool) -> None:
    """The source is a readable model folder with a config this suite can convert."""
    from utils.weights.config import check_config, read_config
    from utils.weights.folders import check_model_dir

    flag = "--base_model" if source != lora else "--lora_weights"
    problems = check_model_dir(str(source), allow_pickle, flag)
    if problems:
        raise SuiteError("\n".join(problems))
    check_config(read_config(source, flag), source, flag)


def check_base_cheaply(source: Path, base, lora, recorded: dict, recorded_fp: dict) -> None:
    """The cheap part of the base check now (config hash, weight file names and sizes); the weights' hashes
    in check_base."""
    from utils.artifacts import sha256_file

    sizes = {name: entry[0] for name, entry in (recorded_fp.get("weights") or {}).items()}
    if (recorded_fp.get("config") and sha256_file(source / "config.json") != recorded_fp["config"]) or \
            (sizes and sizes != {p.name: p.stat().st_size for p in sorted(source.glob("*.safetensors"))}):
        raise SuiteError(wrong_base(base, lora, recorded))


def fingerprinters(source: Path, lora: Path | None):
    """(the base's fingerprint, all the inputs' fingerprints) as functions, run later; the base is hashed once."""
    known: dict = {}  # the base's fingerprint once check_base has computed it

    def base_fingerprint_now() -> dict:
        from utils.artifacts import base_fingerprint
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

    return base_fingerprint_now, fingerprints


def check_base(plan: dict) -> None:
    """Refuse a base that is not the one the fine-tune recorded, before any merge work: its weight files are
    hashed now (not in the background during the merge), since only their content tells two models with the same
    config apart. The result is reused for the stage's fingerprint."""
    if plan["recorded_base"] and plan["recorded_base"] != plan["base_fingerprint_fn"]():
        raise SuiteError(wrong_base(plan["base"], plan["lora"], plan["recorded"]))


def wrong_base(base, lora, recorded) -> str:
    return (f"--base_model {base} is not the model {lora} was trained on (recorded: {recorded.get('path')}; "
            "its config or weights differ); merging into another base gives a wrong model")


def settle(a: dict, plan: dict, stage: str) -> str:
    """The input fingerprints (waiting for them if they were hashed in the background) and the stage fingerprint;
    refuses a base that is not the one the fine-tune recorded."""
    from utils.artifacts import sha256_json

    fps = plan["fingerprints"] = plan["deferred"].result()
    if plan["recorded_base"] and plan["recorded_base"] != fps["base"]:
        raise SuiteError(wrong_base(plan["base"], plan["lora"], plan["recorded"]))
    return sha256_json({"stage": stage, "inputs": fps,
                        "args": {k: a[k] for k in ("dtype", "max_shard_size", "adapter_only")}})
