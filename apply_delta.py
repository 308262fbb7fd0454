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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from utils.args import Group, StageArgs, unfingerprinted
from utils.artifacts import Output, OutputInfo, Staging, library_versions, read_output, sha256_json, write_json
from utils.cli import parse_size, run
from utils.dtypes import CONFIG_NAMES, dtype_code, torch_dtype
from utils.errors import SuiteError, UsageError
from utils.weights.config import check_config, config_dtype, read_config, set_config_dtype
from utils.weights.convert import (Deferred, check_destination, copy_tokenizer, floating, log, no_tokenizer_warning,
                                   quick_hashes, weight_hashes)
from utils.weights.folders import check_model_dir, missing_folder
from utils.weights.shards import HASHES, ModelWeights, OutputWeights, Scratch, ShardWriter, conversion_setup, row_chunks

STAGES = {"make": "make_delta", "apply": "apply_delta"}

# -- flags -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Folders(Group):
    """The command and its folders: ``make`` reads the base and the target and writes the delta; ``apply`` reads
    the base and the delta and writes the target. An input counts by its files' hashes (the fingerprint's
    ``inputs``), not by where it lies."""

    command: Literal["apply", "make"]
    base_model_path: str = unfingerprinted(why="an input: it counts by its files' hashes, not its path")
    target_model_path: str = unfingerprinted(why="make: an input, counted by its hashes; apply: the destination")
    delta_path: str = unfingerprinted(why="make: the destination; apply: an input, counted by its hashes")

    @property
    def other_flag(self) -> str:
        """The input besides the base: the target (make) or the delta (apply); its config and tokenizer are
        the output's."""
        return "--target_model_path" if self.command == "make" else "--delta_path"

    @property
    def other(self) -> str:
        return getattr(self, self.other_flag[2:])

    @property
    def output_flag(self) -> str:
        return "--delta_path" if self.command == "make" else "--target_model_path"

    @property
    def output(self) -> str:
        return getattr(self, self.output_flag[2:])

    def inputs(self) -> dict[str, str]:
        """flag -> path of each input folder."""
        return {"--base_model_path": self.base_model_path, self.other_flag: self.other}


@dataclass(frozen=True)
class Permissions(Group):
    """What may be read or replaced."""

    allow_pickle_weights: bool = unfingerprinted(
        False, why="only allows pickle inputs that are otherwise refused; their files' hashes count")
    overwrite: bool = unfingerprinted(False, why="only allows replacing a different output")


@dataclass(frozen=True)
class ApplyDeltaArgs(StageArgs):
    """apply_delta.py's flags. ``make`` and ``apply`` take the same ones; the command says which folders are
    read and which is written."""

    folders: Folders
    writing: OutputWeights
    permissions: Permissions

    @property
    def stage(self) -> str:
        return STAGES[self.folders.command]

    def fingerprint_values(self) -> dict:
        values = super().fingerprint_values()
        if self.folders.command == "make":
            # make ignores --dtype (a delta is fp32, for exactness): any value writes the same delta.
            values["writing"] = {**values["writing"], "dtype": None}
        return values


Args = ApplyDeltaArgs


def fingerprint(args: ApplyDeltaArgs, inputs: dict) -> str:
    """The output's fingerprint: the stage, every flag value that counts, and ``inputs`` (what identifies each
    input folder, by flag: ``identify_inputs``)."""
    return sha256_json({"stage": args.stage, "inputs": inputs, "args": args.fingerprint_values()})


# -- the command -----------------------------------------------------------------------------------


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
    args = ApplyDeltaArgs.from_flags(dict(locals()))
    folders = args.folders
    check_request(args)
    # The claim comes before any work (hashing the inputs included).
    out = Output(folders.output, args.stage, args.permissions.overwrite, flag=folders.output_flag)
    made = suite_delta(folders)
    # Without a destination there is nothing to compare with: the inputs are hashed on a background thread
    # during the work (hashlib releases the GIL) and recorded at the end.
    compare = out.state != "missing"
    hashes = Deferred(lambda: identify_inputs(folders, made), now=compare)
    if compare and out.up_to_date(fingerprint(args, hashes.result())):
        log(args.stage, f"{folders.output} already holds this result (fingerprint "
                        f"{fingerprint(args, hashes.result())[:12]}); nothing to do")
        print(os.path.abspath(folders.output))
        return
    started = time.time()
    with conversion_setup():
        if folders.command == "make":
            make(args, out, hashes)
        else:
            apply(args, out, hashes, made)
    log(args.stage, f"wrote {folders.output} in {time.time() - started:.1f}s")
    print(os.path.abspath(folders.output))


def check_request(args: ApplyDeltaArgs) -> None:
    """Refuse a bad request before anything is read: bad arguments first (exit 2: an input folder that is not
    there, a bad shard size, a destination that would destroy an input), then incomplete input folders (exit 1),
    then the config the output takes (the target's for make, the delta's for apply; the base's is not read)."""
    folders = args.folders
    problems = [missing_folder(path, flag) for flag, path in folders.inputs().items() if not Path(path).is_dir()]
    problems += args.problems()
    problems += [p.replace("--output_dir", folders.output_flag)
                 for p in check_destination(folders.output, folders.inputs())]
    if problems:
        raise UsageError("\n".join(problems))
    bad_inputs = [p for flag, path in folders.inputs().items()
                  for p in check_model_dir(path, args.permissions.allow_pickle_weights, flag)]
    if bad_inputs:
        raise SuiteError("\n".join(bad_inputs))
    check_config(read_config(folders.other, folders.other_flag), folders.other, folders.other_flag)


def suite_delta(folders: Folders) -> OutputInfo | None:
    """apply: the delta's record if it is a finished delta made here (it records every tensor's hash), else None."""
    if folders.command != "apply":
        return None
    info = read_output(folders.delta_path)
    return info if info is not None and info.stage == STAGES["make"] and info.complete else None


def identify_inputs(folders: Folders, made: OutputInfo | None) -> dict:
    """What identifies each input folder (by flag) in the fingerprint: the sha256 of its weight files, or for a
    delta made here (``made``) a quick identity of the files."""
    if made is None:
        return {flag: weight_hashes(path) for flag, path in folders.inputs().items()}
    # Every tensor rebuilt from a delta made here is checked against the target's recorded hashes (and the base
    # on its first tensor), which proves more about the inputs than hashing their files would. So the inputs
    # are identified by their files' sizes, times and headers, plus the delta's own fingerprint.
    return {"--base_model_path": quick_hashes(folders.base_model_path),
            "--delta_path": {"fingerprint": made.fingerprint, "files": quick_hashes(folders.delta_path)}}


def _record(st: Staging, args: ApplyDeltaArgs, hashes: Deferred, files: dict[str, str],
            record: Callable[[dict], dict]) -> None:
    """What pipeline.json records besides the stage's arguments and fingerprint: ``record(input hashes)``, the
    libraries' versions; the shards' sha256."""
    inputs = hashes.result()
    st.meta.update(**record(inputs),
                   versions=library_versions("torch", "safetensors"))
    st.known_hashes.update(files)


# -- shared by make and apply ----------------------------------------------------------------------


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


def _bytes(tensor):
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _tensor_hash(digest, tensor) -> None:
    digest.update(memoryview(_bytes(tensor)))


def _progress(names: list[str], desc: str):
    from tqdm import tqdm

    return tqdm(names, desc=desc, unit="tensor", file=sys.stderr, disable=None)


def _open_pair(args: ApplyDeltaArgs):
    """The base and the other input (target or delta) as ModelWeights, and how each tensor relates to the base."""
    folders, allow_pickle = args.folders, args.permissions.allow_pickle_weights
    base = ModelWeights(folders.base_model_path, allow_pickle, "--base_model_path")
    other = ModelWeights(folders.other, allow_pickle, folders.other_flag)
    return base, other, _plan_pairs(base, other, folders.other_flag)


def _require_floating(weights, names: list[str], flag: str, why: str) -> None:
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
    writer = ShardWriter(folder, plan, parse_size(max_shard_size))
    try:
        write_tensors(writer)
        return writer.close()
    finally:
        writer.abort()


def _write_model_files(folder: Path, config: dict, source: str, source_flag: str, stage: str) -> list[str]:
    """config.json, and the source's generation config and tokenizer; the tokenizer files copied."""
    write_json(folder / "config.json", config)
    if (Path(source) / "generation_config.json").is_file():
        shutil.copyfile(Path(source) / "generation_config.json", folder / "generation_config.json")
    tokenizer = copy_tokenizer(Path(source), folder)
    if not tokenizer:
        no_tokenizer_warning(stage, {source_flag: source})
    return tokenizer


# -- make ------------------------------------------------------------------------------------------


def _exact_delta(base, target):
    """fp32 delta d with fl(base + d) == target (in the target's dtype), else an fp64 one."""
    import torch

    d = target.float() - base.float()
    for _ in range(3):
        wrong = (base.float() + d).to(target.dtype) != target
        if not wrong.any():
            return d
        d = torch.where(wrong, d + (target.float() - (base.float() + d)), d)
    d64 = target.double() - base.double()
    if not torch.equal((base.double() + d64).to(target.dtype), target):
        raise SuiteError("a tensor's target - base cannot be represented exactly even in fp64")
    return d64


def make(args: ApplyDeltaArgs, out: Output, hashes: Deferred) -> None:
    """Write the delta (target - base, in fp32, or fp64 where fp32 is not exact) with the target's config and
    tokenizer, recording the sha256 of every base and target tensor."""
    folders = args.folders
    base, target, kinds = _open_pair(args)
    names = target.names()
    config = read_config(folders.target_model_path, "--target_model_path")
    _require_floating(target, names, "--target_model_path", "cannot be stored as a delta")
    wide = _fp64_tensors(base, target, names, kinds)
    plan = [(n, "F64" if n in wide else "F32", target.entries[n].shape) for n in names]
    base_hashes, target_hashes = {}, {}
    # The inputs may still be hashing in the background: produce() asks for the fingerprint when it needs it.
    with out.produce(lambda: fingerprint(args, hashes.result()), args=args.flags()) as st:
        files = _write_shards(st.dir, plan, args.writing.max_shard_size, lambda writer: _write_deltas(
            base, target, names, kinds, wide, writer, base_hashes, target_hashes))
        tokenizer = _write_model_files(st.dir, config, folders.target_model_path, "--target_model_path", "make_delta")
        _record(st, args, hashes, files, lambda inputs: {
            "base_model": {"path": os.path.abspath(folders.base_model_path), "files": inputs["--base_model_path"],
                           "tensors": base_hashes},
            "target_model": {"path": os.path.abspath(folders.target_model_path),
                             "files": inputs["--target_model_path"], "tensors": target_hashes,
                             "dtypes": {n: target.entries[n].dtype for n in names}, "dtype": config_dtype(config)},
            "grown_rows": _grown_rows(base, target, kinds), "new_tensors": [n for n, k in kinds.items() if k == "new"],
            "fp64_tensors": sorted(wide), "tokenizer": tokenizer,
        })


def _fp64_tensors(base, target, names: list[str], kinds: dict[str, str]) -> set[str]:
    """First pass, a chunk at a time: which tensors need an fp64 delta (the plan needs every dtype up front)."""
    import torch

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


# -- apply -----------------------------------------------------------------------------------------


def apply(args: ApplyDeltaArgs, out: Output, hashes: Deferred, made: OutputInfo | None) -> None:
    """Write the rebuilt model (base + delta) with the delta's config and tokenizer. A delta made here
    (``made``) is checked tensor by tensor: the base against the one it was made from, the result against
    the target."""
    folders, dtype = args.folders, args.writing.dtype
    base, delta, kinds = _open_pair(args)
    if made is None:
        log("apply_delta", f"note: {folders.delta_path} was not made by this suite: no recorded hashes, so the base "
                           "and the result cannot be checked tensor by tensor")
    config = read_config(folders.delta_path, "--delta_path")
    recorded = made.raw.get("target_model", {}) if made is not None else {}
    out_dtypes = _output_dtypes(dtype, recorded, config, delta)
    names = delta.names()
    _require_floating(delta, names, "--delta_path", "are not a delta")
    plan = [(n, out_dtypes[n], delta.entries[n].shape) for n in names]
    check = _RebuildCheck(folders.base_model_path, made)
    # The inputs may still be hashing in the background: produce() asks for the fingerprint when it needs it.
    with out.produce(lambda: fingerprint(args, hashes.result()), args=args.flags()) as st:
        files = _write_shards(st.dir, plan, args.writing.max_shard_size, lambda writer: _write_rebuilt(
            base, delta, names, kinds, out_dtypes, writer, check))
        check.check()
        check.raise_if_mismatched(dtype)
        out_config = config if dtype == "auto" else set_config_dtype(config, dtype)
        tokenizer = _write_model_files(st.dir, out_config, folders.delta_path, "--delta_path", "apply_delta")
        verified = bool(made is not None and check.target_tensors and dtype == "auto")
        if verified:
            log("apply_delta", f"verified: all {len(names)} tensors equal the recorded target's, bit for bit")
        _record(st, args, hashes, files, lambda inputs: {
            "base_model": {"path": os.path.abspath(folders.base_model_path), "files": inputs["--base_model_path"]},
            "delta": {"path": os.path.abspath(folders.delta_path), "files": inputs["--delta_path"],
                      "made_by_suite": made is not None},
            "tensors": check.out_hashes, "verified_against_target": verified, "tokenizer": tokenizer,
            "grown_rows": _grown_rows(base, delta, kinds),
        })


def _output_dtypes(dtype: str, recorded: dict, config: dict, delta) -> dict[str, str]:
    """Each rebuilt tensor's safetensors dtype: --dtype, else the target's as the delta records it, else its
    config's."""
    if dtype != "auto":
        return dict.fromkeys(delta.entries, dtype_code(CONFIG_NAMES[dtype]))
    if recorded.get("dtypes"):
        return dict(recorded["dtypes"])
    return dict.fromkeys(delta.entries, dtype_code(CONFIG_NAMES[config_dtype(config)]))


class _RebuildCheck:
    """For a delta made here (``made``): the base is checked against its recorded tensor hashes, every rebuilt
    tensor against the target's. Tensors' hashes are computed on the hashing queue and checked in batches. For
    another delta nothing is recorded, so nothing is checked; the result's hashes are still collected."""

    def __init__(self, base_path: str, made: OutputInfo | None):
        self.base_path = base_path
        self.made_from = made.base_model.get("path") if made is not None else None
        self.base_tensors = made.base_model.get("tensors", {}) if made is not None else {}
        self.target_tensors = made.raw.get("target_model", {}).get("tensors", {}) if made is not None else {}
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
        HASHES.drain()
        for name, hb, ho in self.pending:
            if hb is not None and name in self.base_tensors and hb.hexdigest() != self.base_tensors[name]:
                raise SuiteError(f"--base_model_path {self.base_path}: tensor {name} differs from the base the "
                                 f"delta was made from ({self.made_from}); nothing written")
            self.out_hashes[name] = ho.hexdigest()
            if name in self.target_tensors and self.out_hashes[name] != self.target_tensors[name]:
                self.mismatched.append(name)
        self.pending.clear()

    def raise_if_mismatched(self, dtype: str) -> None:
        if self.mismatched:
            why = (" (--dtype differs from the target's)" if dtype != "auto" else
                   f"; is --base_model_path the base the delta was made from ({self.made_from})?")
            raise SuiteError(f"the rebuilt model differs from the recorded target in {len(self.mismatched)} tensors "
                             f"(e.g. {self.mismatched[0]}){why}; nothing written")


def _write_rebuilt(base, delta, names, kinds, out_dtypes, writer, check: _RebuildCheck) -> None:
    """Write base + delta for every tensor, queueing each for ``check``."""
    scratch = Scratch(), Scratch()  # the delta's, the base's
    for name in _progress(names, "apply"):
        want = torch_dtype(out_dtypes[name])
        hb, ho = _rebuild_tensor(base, delta, name, kinds[name], want, writer, scratch, not check.base_checked)
        check.add(name, kinds[name], hb, ho)


def _rebuild_tensor(base, delta, name: str, kind: str, want, writer, scratch, hash_base: bool):
    """Stream one tensor's base + delta into ``writer`` a chunk at a time; the sha256 objects (fed through the
    hashing queue) of the base rows used (if ``hash_base``) and of the result."""
    import torch

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
