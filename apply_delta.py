"""Delta weights: ``make`` (target - base -> delta) and ``apply`` (base + delta -> target), shard by shard.

FastChat's and LLMZoo's flag names (``--base_model_path --target_model_path --delta_path``, also written
``--base-model-path`` ...). Unlike their scripts, which load two whole models, every tensor is processed in
row chunks read straight from the safetensors shards and streamed into the output shards, so memory stays
at a few chunks whatever the model size.

A delta folder is a Hugging Face model folder (the target's config and tokenizer, safetensors shards of
target - base in fp32) with a pipeline.json recording the sha256 of every base and target tensor, so
``apply`` checks it was given the right base before writing and that what it rebuilt is the target, bit
for bit. Vocabulary growth (a target with added tokens such as ``<pad>``): rows of an embedding or
output head beyond the base's vocabulary hold the target's own values (as FastChat and LLMZoo do: their
base rows are zero-extended). Where fp32 cannot hold target - base exactly enough for base + delta to
give the target back (rare: very different magnitudes), that tensor's delta is stored in fp64, so
``apply(make(base, target))`` is always the target exactly.

Examples:
    python apply_delta.py make --base_model_path llama-7b --target_model_path vicuna-7b --delta_path vicuna-delta
    python apply_delta.py apply --base_model_path llama-7b --delta_path vicuna-delta --target_model_path vicuna-7b
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

from utils.errors import SuiteError, UsageError
from utils.cli import run

STAGES = {"make": "make_delta", "apply": "apply_delta"}


def main(
    command: Literal["apply", "make"],
    *,
    base_model_path: str,
    target_model_path: str,
    delta_path: str,
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    max_shard_size: str = "2GB",
    allow_pickle_weights: bool = False,
    overwrite: bool = False,
) -> None:
    """Make or apply delta weights, tensor by tensor in bounded memory.

    Args:
        command: ``make`` writes delta_path from base and target; ``apply`` writes target_model_path from base and delta.
        base_model_path: The base model folder (e.g. the original LLaMA in Hugging Face format).
        target_model_path: make: the fine-tuned model to publish as a delta. apply: where to write the rebuilt model.
        delta_path: make: where to write the delta. apply: the delta folder (ours, or FastChat's / LLMZoo's).
        dtype: apply: precision of the rebuilt model (auto: the target's, as recorded in the delta's config).
            make: ignored (deltas are fp32, for exactness).
        max_shard_size: Largest safetensors shard written (e.g. 200MB, 2GB).
        allow_pickle_weights: Accept pytorch_model.bin inputs (read with torch.load(weights_only=True)).
        overwrite: Replace an output folder that holds a different result.
    """
    args = dict(locals())
    from utils.artifacts import sweep_stale
    from utils.weights.convert import check_destination, log
    from utils.weights.folders import check_model_dir
    from utils.cli import parse_size

    stage = STAGES[command]
    inputs = {"--base_model_path": base_model_path}
    inputs["--target_model_path" if command == "make" else "--delta_path"] = \
        target_model_path if command == "make" else delta_path
    output = delta_path if command == "make" else target_model_path
    out_flag = "--delta_path" if command == "make" else "--target_model_path"
    from utils.weights.folders import missing_folder

    problems, bad_inputs = [], []  # a path that is not there is a bad argument (2); an incomplete folder bad input (1)
    for flag, path in inputs.items():
        if not Path(path).is_dir():
            problems.append(missing_folder(path, flag))
    try:
        parse_size(max_shard_size)
    except SuiteError as exc:
        problems.append(str(exc))
    problems += [p.replace("--output_dir", out_flag) for p in check_destination(output, inputs)]
    if problems:
        raise UsageError("\n".join(problems))
    for flag, path in inputs.items():
        bad_inputs += check_model_dir(path, allow_pickle_weights, flag)
    if bad_inputs:
        raise SuiteError("\n".join(bad_inputs))
    from utils.weights.config import check_config, read_config

    # The config written with the output is the target's (make) or the delta's (apply); the base's is not read.
    config_flag = "--target_model_path" if command == "make" else "--delta_path"
    check_config(read_config(inputs[config_flag], config_flag), inputs[config_flag], config_flag)
    from utils.artifacts import claim_output_dir

    claim_output_dir(output, stage, overwrite, flag=out_flag)  # before any work (hashing the inputs included)

    from utils.artifacts import check_output_dir, sha256_json
    from utils.weights.convert import Deferred, quick_hashes, weight_hashes

    def fingerprint_of(hashes: dict) -> str:
        return sha256_json({"stage": stage, "inputs": hashes, "args": {
            "dtype": dtype if command == "apply" else None, "max_shard_size": max_shard_size}})

    sweep_stale(output)
    # Without a destination there is nothing to compare with: the inputs are hashed on a background thread
    # during the work (hashlib releases the GIL) and recorded at the end.
    exists = Path(output).exists()
    from utils.artifacts import read_meta

    delta_meta = read_meta(delta_path) if command == "apply" else None
    if delta_meta and delta_meta.get("stage") == "make_delta" and delta_meta.get("complete"):
        # A delta made here: every rebuilt tensor is checked against the target's recorded hashes (and the
        # base on its first tensor), which proves more about the inputs than hashing their files would. So the
        # inputs are identified by their files' sizes, times and headers, plus the delta's own fingerprint.
        def identify():
            return {"--base_model_path": quick_hashes(base_model_path),
                    "--delta_path": {"fingerprint": delta_meta["fingerprint"], "files": quick_hashes(delta_path)}}
    else:
        def identify():
            return {flag: weight_hashes(path) for flag, path in inputs.items()}
    hashes = Deferred(identify, now=exists)
    if exists:
        done = check_output_dir(output, stage, fingerprint_of(hashes.result()), overwrite, flag=out_flag)
        if done:
            log(stage, f"{output} already holds this result (fingerprint {fingerprint_of(hashes.result())[:12]}); "
                       "nothing to do")
            print(os.path.abspath(output))
            return
    args["fingerprint_of"] = fingerprint_of
    from utils.weights.shards import conversion_setup

    started = time.time()
    with conversion_setup():
        if command == "make":
            make(args, hashes)
        else:
            apply(args, hashes)
    log(stage, f"wrote {output} in {time.time() - started:.1f}s")
    print(os.path.abspath(output))


def _plan_pairs(base, other, other_flag: str) -> dict[str, str]:
    """name -> relation ("same" shape, "grown": more rows than the base, "new": not in the base)."""
    kinds = {}
    missing = [n for n in base.entries if n not in other.entries]
    if missing:
        raise SuiteError(f"{other_flag}: lacks base tensors {missing[:3]} (a different architecture, or tied weights "
                         "stored differently?)")
    for name, e in other.entries.items():
        if name not in base.entries:
            kinds[name] = "new"
            continue
        b = base.entries[name]
        if b.shape == e.shape:
            kinds[name] = "same"
        elif len(b.shape) == len(e.shape) and b.shape[1:] == e.shape[1:] and e.shape[0] > b.shape[0]:
            kinds[name] = "grown"
        else:
            raise SuiteError(f"{other_flag}: tensor {name} has shape {e.shape}, the base {b.shape}; only added rows "
                             "(a grown vocabulary) can be expressed as a delta")
    return kinds


def _bytes(t):
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _tensor_hash(h, t) -> None:
    h.update(memoryview(_bytes(t)))


def _plain(a: dict) -> dict:
    return {k: v for k, v in a.items() if k != "fingerprint_of"}


def _progress(names: list[str], desc: str):
    from tqdm import tqdm

    return tqdm(names, desc=desc, unit="tensor", file=sys.stderr, disable=None)


def _open_pair(a: dict, other_flag: str):
    """The base and the other input (target or delta) as ModelWeights, and how each tensor relates to the base."""
    from utils.weights.shards import ModelWeights

    base = ModelWeights(a["base_model_path"], a["allow_pickle_weights"], "--base_model_path")
    other = ModelWeights(a[other_flag.lstrip("-")], a["allow_pickle_weights"], other_flag)
    return base, other, _plan_pairs(base, other, other_flag)


def _require_floating(weights, names: list[str], flag: str, why: str) -> None:
    from utils.weights.convert import floating

    nonfloat = [n for n in names if not floating(weights.entries[n].dtype)]
    if nonfloat:
        raise SuiteError(f"{flag}: non-floating tensors {nonfloat[:3]} {why}")


def _base_span(kind: str, n_base: int | None, r0: int, r1: int) -> tuple[int, int]:
    """The base rows under rows r0:r1 of the target: all of them, or for a grown tensor those within the base's."""
    return (r0, min(r1, n_base)) if kind == "grown" else (r0, r1)


def _grown_rows(base, other, kinds: dict[str, str]) -> dict[str, list[int]]:
    return {n: [base.entries[n].shape[0], other.entries[n].shape[0]] for n, k in kinds.items() if k == "grown"}


def _write_shards(folder: Path, plan: list, max_shard_size: str, write_tensors) -> dict[str, str]:
    """Stream every planned tensor (``write_tensors(writer)``) into safetensors shards; the files' sha256."""
    from utils.weights.shards import ShardWriter
    from utils.cli import parse_size

    writer = ShardWriter(folder, plan, parse_size(max_shard_size))
    try:
        write_tensors(writer)
        return writer.close()
    finally:
        writer.abort()


def _write_model_files(folder: Path, config: dict, source: str, source_flag: str, stage: str) -> list[str]:
    """config.json, and the source's generation config and tokenizer; the tokenizer files copied."""
    from utils.artifacts import write_json
    from utils.weights.convert import copy_tokenizer, no_tokenizer_warning

    write_json(folder / "config.json", config)
    if (Path(source) / "generation_config.json").is_file():
        shutil.copyfile(Path(source) / "generation_config.json", folder / "generation_config.json")
    tokenizer = copy_tokenizer(Path(source), folder)
    if not tokenizer:
        no_tokenizer_warning(stage, {source_flag: source})
    return tokenizer


def _finish(folder: Path, a: dict, stage: str, deferred, files: dict[str, str], record) -> None:
    """Write pipeline.json last: the fingerprint of the inputs' hashes (waited for here) and ``record(hashes)``."""
    from utils.artifacts import finish_meta, library_versions

    hashes = deferred.result()
    finish_meta(folder, {
        "stage": stage, "fingerprint": a["fingerprint_of"](hashes), "args": _plain(a), **record(hashes),
        "versions": library_versions("torch", "safetensors"),
    }, known_hashes=files)


def _exact_delta(b, t):
    """fp32 delta d with fl(b + d) == t (in the target's dtype), else an fp64 one."""
    import torch

    d = t.float() - b.float()
    for _ in range(3):
        wrong = (b.float() + d).to(t.dtype) != t
        if not wrong.any():
            return d
        d = torch.where(wrong, d + (t.float() - (b.float() + d)), d)
    d64 = t.double() - b.double()
    if not torch.equal((b.double() + d64).to(t.dtype), t):
        raise SuiteError("a tensor's target - base cannot be represented exactly even in fp64")
    return d64


def make(a: dict, deferred) -> None:
    from utils.artifacts import staged_dir
    from utils.weights.config import config_dtype, read_config

    base, target, kinds = _open_pair(a, "--target_model_path")
    names = target.names()
    config = read_config(a["target_model_path"], "--target_model_path")
    _require_floating(target, names, "--target_model_path", "cannot be stored as a delta")
    wide = _fp64_tensors(base, target, names, kinds)
    plan = [(n, "F64" if n in wide else "F32", target.entries[n].shape) for n in names]
    base_hashes, target_hashes = {}, {}
    with staged_dir(a["delta_path"]) as tmp:
        files = _write_shards(tmp, plan, a["max_shard_size"], lambda writer: _write_deltas(
            base, target, names, kinds, wide, writer, base_hashes, target_hashes))
        tokenizer = _write_model_files(tmp, config, a["target_model_path"], "--target_model_path", "make_delta")
        _finish(tmp, a, "make_delta", deferred, files, lambda hashes: {
            "base_model": {"path": os.path.abspath(a["base_model_path"]), "files": hashes["--base_model_path"],
                           "tensors": base_hashes},
            "target_model": {"path": os.path.abspath(a["target_model_path"]), "files": hashes["--target_model_path"],
                             "tensors": target_hashes, "dtypes": {n: target.entries[n].dtype for n in names},
                             "dtype": config_dtype(config)},
            "grown_rows": _grown_rows(base, target, kinds), "new_tensors": [n for n, k in kinds.items() if k == "new"],
            "fp64_tensors": sorted(wide), "tokenizer": tokenizer,
        })


def _fp64_tensors(base, target, names: list[str], kinds: dict[str, str]) -> set[str]:
    """First pass, a chunk at a time: which tensors need an fp64 delta (the plan needs every dtype up front)."""
    import torch

    from utils.weights.convert import log
    from utils.weights.shards import row_chunks

    wide = set()
    for name in _progress(names, "check"):
        if kinds[name] == "new":
            continue
        be = base.entries[name]
        for r0, r1 in row_chunks(be):
            rows = (r0, r1) if be.shape else None
            if _exact_delta(base.get(name, rows), target.get(name, rows)).dtype == torch.float64:
                wide.add(name)
                break
    if wide:
        log("make_delta", f"{len(wide)} tensors need an fp64 delta to stay exact (e.g. {sorted(wide)[0]})")
    return wide


def _write_deltas(base, target, names, kinds, wide, writer, base_hashes: dict, target_hashes: dict) -> None:
    """Write every tensor's delta, recording the sha256 of each target tensor and of each base one used."""
    import torch

    for name in _progress(names, "make"):
        out_dtype = torch.float64 if name in wide else torch.float32
        target_hashes[name], base_hash = _write_delta_tensor(base, target, name, kinds[name], out_dtype, writer)
        if base_hash is not None:
            base_hashes[name] = base_hash


def _write_delta_tensor(base, target, name: str, kind: str, out_dtype, writer) -> tuple[str, str | None]:
    """Stream one tensor's target - base into ``writer`` a chunk at a time; the sha256 of its target and base
    values (None for a tensor the base lacks)."""
    from utils.weights.shards import row_chunks

    te = target.entries[name]
    ht = hashlib.sha256()
    hb = hashlib.sha256() if kind != "new" else None
    n_base = base.entries[name].shape[0] if kind == "grown" else None
    for r0, r1 in row_chunks(te):
        rows = (r0, r1) if te.shape else None
        t = target.get(name, rows)
        _tensor_hash(ht, t)
        if kind == "new":
            writer.write(name, t.to(out_dtype))
            continue
        d = t.to(out_dtype)  # rows beyond the base's: the target's own values
        lo, hi = _base_span(kind, n_base, r0, r1)
        if hi > lo or rows is None:
            b = base.get(name, (lo, hi) if rows is not None else None)
            _tensor_hash(hb, b)
            part = _exact_delta(b, t[: hi - lo] if rows is not None else t).to(out_dtype)
            if rows is None:
                d = part
            else:
                d[: hi - lo] = part
        writer.write(name, d)
    return ht.hexdigest(), hb.hexdigest() if hb is not None else None


def apply(a: dict, deferred) -> None:
    import torch

    from utils.artifacts import read_meta, staged_dir
    from utils.weights.convert import log
    from utils.weights.config import read_config, set_config_dtype
    from utils.dtypes import dtype_code

    base, delta, kinds = _open_pair(a, "--delta_path")
    meta = read_meta(a["delta_path"]) or {}
    ours = meta.get("stage") == "make_delta" and meta.get("complete")
    if not ours:
        log("apply_delta", f"note: {a['delta_path']} was not made by this suite: no recorded hashes, so the base and the "
                           "result cannot be checked tensor by tensor")
    config = read_config(a["delta_path"], "--delta_path")
    recorded = meta.get("target_model", {}) if ours else {}
    out_dtypes = _output_dtypes(a["dtype"], recorded, config, delta)
    names = delta.names()
    _require_floating(delta, names, "--delta_path", "are not a delta")
    plan = [(n, dtype_code(getattr(torch, out_dtypes[n])), delta.entries[n].shape) for n in names]
    check = _RebuildCheck(a["base_model_path"], meta, ours, recorded)
    with staged_dir(a["target_model_path"]) as tmp:
        files = _write_shards(tmp, plan, a["max_shard_size"], lambda writer: _write_rebuilt(
            base, delta, names, kinds, out_dtypes, writer, check))
        check.check()
        check.raise_if_mismatched(a["dtype"])
        out_config = config if a["dtype"] == "auto" else set_config_dtype(config, a["dtype"])
        tokenizer = _write_model_files(tmp, out_config, a["delta_path"], "--delta_path", "apply_delta")
        verified = bool(ours and check.target_tensors and a["dtype"] == "auto")
        if verified:
            log("apply_delta", f"verified: all {len(names)} tensors equal the recorded target's, bit for bit")
        _finish(tmp, a, "apply_delta", deferred, files, lambda hashes: {
            "base_model": {"path": os.path.abspath(a["base_model_path"]), "files": hashes["--base_model_path"]},
            "delta": {"path": os.path.abspath(a["delta_path"]), "files": hashes["--delta_path"],
                      "made_by_suite": bool(ours)},
            "tensors": check.out_hashes, "verified_against_target": verified, "tokenizer": tokenizer,
            "grown_rows": _grown_rows(base, delta, kinds),
        })


def _output_dtypes(dtype: str, recorded: dict, config: dict, delta) -> dict[str, str]:
    """Each rebuilt tensor's dtype: --dtype, else the target's as the delta records it, else its config's."""
    from utils.dtypes import CONFIG_NAMES
    from utils.weights.config import config_dtype

    if dtype != "auto":
        return {n: CONFIG_NAMES[dtype] for n in delta.entries}
    if recorded.get("dtypes"):
        from utils.dtypes import torch_dtype

        return {n: str(torch_dtype(c)).replace("torch.", "") for n, c in recorded["dtypes"].items()}
    return {n: CONFIG_NAMES[config_dtype(config)] for n in delta.entries}


class _RebuildCheck:
    """For a delta made here: the base is checked against its recorded tensor hashes, every rebuilt tensor
    against the target's. Tensors' hashes are computed on the hashing queue and checked in batches."""

    def __init__(self, base_path: str, meta: dict, ours: bool, recorded: dict):
        self.base_path, self.meta, self.ours = base_path, meta, ours
        self.base_tensors = meta.get("base_model", {}).get("tensors", {})
        self.target_tensors = recorded.get("tensors", {})
        self.out_hashes, self.mismatched, self.pending = {}, [], []
        self.base_checked = False

    def add(self, name: str, kind: str, hb, ho) -> None:
        self.pending.append((name, hb if not self.base_checked else None, ho))
        if not self.base_checked and kind != "new":
            # The base is checked on the first tensor, so a wrong one shows at once; after that the check
            # of every rebuilt tensor against the recorded target catches any other difference.
            self.check()
            self.base_checked = True

    def check(self) -> None:
        from utils.weights.shards import HASHES

        HASHES.drain()
        for name, hb, ho in self.pending:
            if self.ours and hb is not None and name in self.base_tensors and hb.hexdigest() != self.base_tensors[name]:
                raise SuiteError(f"--base_model_path {self.base_path}: tensor {name} differs from the base the "
                                 f"delta was made from ({self.meta['base_model'].get('path')}); nothing written")
            self.out_hashes[name] = ho.hexdigest()
            if self.ours and name in self.target_tensors and self.out_hashes[name] != self.target_tensors[name]:
                self.mismatched.append(name)
        self.pending.clear()

    def raise_if_mismatched(self, dtype: str) -> None:
        if self.mismatched:
            why = (" (--dtype differs from the target's)" if dtype != "auto" else
                   f"; is --base_model_path the base the delta was made from ({self.meta['base_model'].get('path')})?")
            raise SuiteError(f"the rebuilt model differs from the recorded target in {len(self.mismatched)} tensors "
                             f"(e.g. {self.mismatched[0]}){why}; nothing written")


def _write_rebuilt(base, delta, names, kinds, out_dtypes, writer, check: _RebuildCheck) -> None:
    """Write base + delta for every tensor, queueing each for ``check``."""
    import torch

    from utils.weights.shards import Scratch

    scratch = Scratch(), Scratch()  # the delta's, the base's
    for name in _progress(names, "apply"):
        want = getattr(torch, out_dtypes[name])
        hb, ho = _rebuild_tensor(base, delta, name, kinds[name], want, writer, scratch, not check.base_checked)
        check.add(name, kinds[name], hb, ho)


def _rebuild_tensor(base, delta, name: str, kind: str, want, writer, scratch, hash_base: bool):
    """Stream one tensor's base + delta into ``writer`` a chunk at a time; the sha256 objects (fed through the
    hashing queue) of the base rows used (if ``hash_base``) and of the result."""
    import torch

    from utils.weights.shards import HASHES, row_chunks

    delta_scratch, base_scratch = scratch
    de = delta.entries[name]
    ho, hb = hashlib.sha256(), hashlib.sha256()
    n_base = base.entries[name].shape[0] if kind == "grown" else None
    for r0, r1 in row_chunks(de):
        rows = (r0, r1) if de.shape else None
        d = delta.get(name, rows, scratch=delta_scratch)
        work = torch.float64 if d.dtype == torch.float64 else torch.float32
        out = d.to(work)
        if kind != "new":
            lo, hi = _base_span(kind, n_base, r0, r1)
            if hi > lo or rows is None:
                b = base.get(name, (lo, hi) if rows is not None else None, scratch=base_scratch)
                if hash_base:
                    HASHES.update(hb, _bytes(b))
                if rows is None:
                    out = b.to(work) + out
                else:
                    out[: hi - lo] += b.to(work)
        out = out.to(want)
        HASHES.update(ho, _bytes(out))
        writer.write(name, out)
        delta_scratch.release()
        base_scratch.release()
    return hb, ho


if __name__ == "__main__":
    run(main)
