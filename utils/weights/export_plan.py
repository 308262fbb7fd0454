"""What an export reads, checked before any work: the fine-tune or adapter (``--lora_weights``), the base it
merges into (``--base_model``, or the one finetune.py recorded, which must match it), and the input
fingerprints. Shared by export_hf.py and export_state_dict.py, which merge the same inputs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils.args import Group, unfingerprinted
from utils.artifacts import (OutputInfo, base_fingerprint, read_output, sha256_file, tokenizer_fingerprint)
from utils.errors import SuiteError, UsageError
from utils.weights.config import check_config, read_config
from utils.weights.convert import Deferred, check_destination
from utils.weights.folders import check_model_dir, missing_folder
from utils.weights.merge import check_adapter_dir


@dataclass(frozen=True)
class MergeInputs(Group):
    """What is merged: the fine-tune or adapter, the base it merges into, and how they may be read."""

    lora_weights: str | None = unfingerprinted(why="identified by its content: its files' hashes count")
    base_model: str | None = unfingerprinted(why="identified by its content: its files' hashes count")
    adapter_only: bool = False
    allow_pickle_weights: bool = unfingerprinted(False, why="only allows reading inputs that are otherwise refused")

    def problems(self) -> list[str]:
        if not self.lora_weights and not self.base_model:
            return ["give --lora_weights (a finetune.py output or PEFT adapter) and/or --base_model"]
        return []


@dataclass
class ExportPlan:
    """What an export reads, worked out by ``plan_export`` before any work.

    ``lora``: --lora_weights as a folder; ``adapter``: the same when it is an adapter (merged), else None;
    ``source``: the model whose weights are read (a full fine-tune itself, else the base); ``meta``: the
    fine-tune's pipeline.json; ``recorded``: the base it records, ``recorded_base`` that base's fingerprint
    where it is checked. The input hashes run later (``hash_inputs``), the base's once.
    """

    base: Path | None
    lora: Path | None
    adapter: Path | None
    source: Path
    meta: OutputInfo | None
    recorded: dict
    recorded_base: dict | None
    base_fingerprint: Callable[[], dict]
    input_fingerprints: Callable[[], dict]
    hashing: Deferred | None = None


def input_problems(inputs: MergeInputs) -> list[str]:
    """The input folders that do not exist (reported with the other flag problems)."""
    return [missing_folder(path, flag) for flag, path in
            (("--lora_weights", inputs.lora_weights), ("--base_model", inputs.base_model))
            if path and not Path(path).is_dir()]


def plan_export(inputs: MergeInputs, output_dir: str | None) -> ExportPlan:
    """Work out what is exported from flags already checked alone; ``output_dir``: the destination, refused
    if it is (or holds) an input (None where the caller has checked it)."""
    lora, meta, is_adapter = check_lora(inputs)
    base, recorded = find_base(inputs.base_model, lora, meta, is_adapter)
    source = find_source(lora, base, is_adapter, inputs.base_model)
    if output_dir is not None:
        check_output_dir_apart(output_dir, inputs.lora_weights, source)
    check_source(source, lora, inputs.allow_pickle_weights)
    recorded_fp = recorded.get("fingerprint") if is_adapter and not inputs.adapter_only else None
    if recorded_fp:
        check_base_cheaply(source, base, lora, recorded, recorded_fp)
    base_fingerprint_now, fingerprints = fingerprinters(source, lora)
    return ExportPlan(base=Path(base) if base else None, lora=lora, adapter=lora if is_adapter else None,
                      source=source, meta=meta, recorded=recorded, recorded_base=recorded_fp,
                      base_fingerprint=base_fingerprint_now, input_fingerprints=fingerprints)


def check_lora(inputs: MergeInputs) -> tuple[Path | None, OutputInfo | None, bool]:
    """--lora_weights: a finished fine-tune's adapter or full model; (folder, its pipeline.json, is an adapter)."""
    lora = Path(inputs.lora_weights) if inputs.lora_weights else None
    meta = read_output(lora) if lora else None
    if meta is not None and meta.stage == "finetune" and not meta.complete:
        raise SuiteError(f"--lora_weights {lora}: the fine-tune did not finish (pipeline.json is not complete)")
    is_adapter = lora is not None and (lora / "adapter_config.json").is_file()
    if lora is not None and not is_adapter and not (lora / "config.json").is_file():
        raise SuiteError(f"--lora_weights {lora}: neither a PEFT adapter (adapter_config.json) nor a model (config.json)")
    if is_adapter:
        check_adapter_dir(lora, inputs.allow_pickle_weights)
    if inputs.adapter_only and not is_adapter:
        raise UsageError(f"--adapter_only: --lora_weights {lora} is not an adapter folder")
    return lora, meta, is_adapter


def find_base(base: str | None, lora: Path | None, meta: OutputInfo | None, is_adapter: bool
              ) -> tuple[str | None, dict]:
    """The base an adapter merges into (``base``: --base_model, else the one its fine-tune recorded) and that
    record."""
    recorded = meta.base_model if is_adapter and meta is not None else {}
    if is_adapter and base is None:
        base = recorded.get("path")
        if not base:
            raise UsageError(f"--lora_weights {lora} has no finetune.py pipeline.json naming its base; give --base_model")
        if not Path(base).is_dir():
            raise SuiteError(f"--lora_weights {lora} was trained on {base}, which no longer exists; give --base_model")
    return base, recorded


def find_source(lora: Path | None, base: str | None, is_adapter: bool, base_flag: str | None) -> Path:
    """The model whose weights are read: a full fine-tune itself, else the base (``base_flag``: --base_model
    as given, which a full fine-tune does not take)."""
    if not is_adapter and lora is not None and base_flag:
        raise UsageError(f"--lora_weights {lora} is a full model; --base_model is not used with it")
    return lora if lora is not None and not is_adapter else Path(base)


def check_output_dir_apart(output_dir: str, lora_weights: str | None, source: Path) -> None:
    """Refuse a destination that is (or holds) an input: writing it would destroy the input."""
    problems = check_destination(output_dir, {"--lora_weights": lora_weights, "--base_model": str(source)})
    if problems:
        raise UsageError("\n".join(problems))


def check_source(source: Path, lora: Path | None, allow_pickle: bool) -> None:
    """The source is a readable model folder with a config this suite can convert."""
    flag = "--base_model" if source != lora else "--lora_weights"
    problems = check_model_dir(str(source), allow_pickle, flag)
    if problems:
        raise SuiteError("\n".join(problems))
    check_config(read_config(source, flag), source, flag)


def check_base_cheaply(source: Path, base, lora, recorded: dict, recorded_fp: dict) -> None:
    """The cheap part of the base check now (config hash, weight file names and sizes); the weights' hashes
    in check_base."""
    sizes = {name: entry[0] for name, entry in (recorded_fp.get("weights") or {}).items()}
    if (recorded_fp.get("config") and sha256_file(source / "config.json") != recorded_fp["config"]) or \
            (sizes and sizes != {p.name: p.stat().st_size for p in sorted(source.glob("*.safetensors"))}):
        raise SuiteError(wrong_base(base, lora, recorded))


def fingerprinters(source: Path, lora: Path | None):
    """(the base's fingerprint, all the inputs' fingerprints) as functions, run later; the base is hashed once."""
    known: dict = {}  # the base's fingerprint once check_base has computed it

    def base_fingerprint_now() -> dict:
        if "base" not in known:
            base_fp = base_fingerprint(str(source))
            if not base_fp["weights"]:  # pickle weights (opt-in): hash those instead
                base_fp["weights"] = {p.name: [p.stat().st_size, sha256_file(p)]
                                      for p in sorted(source.glob("pytorch_model*"))}
            known["base"] = base_fp
        return known["base"]

    def fingerprints() -> dict:
        out = {"base": base_fingerprint_now()}
        if lora is not None:
            out["lora_weights"] = {p.name: sha256_file(p) for p in sorted(lora.iterdir())
                                   if p.is_file() and (p.name.startswith(("adapter_", "model")) or p.suffix == ".json")
                                   and p.name != "pipeline.json"}
            out["tokenizer"] = tokenizer_fingerprint(lora)
        return out

    return base_fingerprint_now, fingerprints


def check_base(plan: ExportPlan) -> None:
    """Refuse a base that is not the one the fine-tune recorded, before any merge work: its weight files are
    hashed now (not in the background during the merge), since only their content tells two models with the same
    config apart. The result is reused for the stage's fingerprint."""
    if plan.recorded_base and plan.recorded_base != plan.base_fingerprint():
        raise SuiteError(wrong_base(plan.base, plan.lora, plan.recorded))


def wrong_base(base, lora, recorded) -> str:
    return (f"--base_model {base} is not the model {lora} was trained on (recorded: {recorded.get('path')}; "
            "its config or weights differ); merging into another base gives a wrong model")


def hash_inputs(plan: ExportPlan, now: bool) -> None:
    """Start hashing the inputs: ``now``, or on a background thread while the work runs (see ``Deferred``)."""
    plan.hashing = Deferred(plan.input_fingerprints, now=now)


def settle(plan: ExportPlan) -> dict:
    """The input fingerprints (waiting for them if they were hashed in the background); refuses a base that is
    not the one the fine-tune recorded."""
    fps = plan.hashing.result()
    if plan.recorded_base and plan.recorded_base != fps["base"]:
        raise SuiteError(wrong_base(plan.base, plan.lora, plan.recorded))
    return fps
