"""Meta "consolidated" and llama2.c checkpoints: export a (merged) Llama to them, and import them back.

Export (``--base_model`` is a Hugging Face Llama folder; ``--lora_weights`` merges an adapter first):

    --format meta      OUTPUT_DIR/consolidated.NN.pth (one per --num_shards, Meta's model-parallel split),
                       params.json (dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of /
                       ffn_dim_multiplier reproducing the FFN size, norm_eps; rope_theta only where it is not
                       10000, which Llama 2's loader refuses), tokenizer.model (SentencePiece, where the
                       inputs have one) and the Hugging Face tokenizer files
    --format llama2c   OUTPUT_DIR/model.bin: llama2.c's checkpoint (version 0, fp32, what run.c reads)

Keys are renamed to Meta's (``layers.N.attention.wq.weight`` ...) and the q/k rows permuted back from
Hugging Face's rotate-half order to Meta's interleaved RoPE pairs. The .pth files hold only tensors, so
they load with ``torch.load(weights_only=True)``.

Import (``--base_model`` is such a folder, or a llama2.c ``.bin`` file): writes a Hugging Face Llama
(safetensors shards, config, the tokenizer found beside it or given with ``--tokenizer``). Reading
.pth files needs ``--allow_pickle_weights`` (they are read with weights_only=True). Round trips are
exact: HF -> Meta -> HF and llama2.c -> HF -> llama2.c give back the same tensors.

Examples:
    python export_state_dict.py --base_model BASE --lora_weights runs/lora --output_dir ckpt --num_shards 2
    python export_state_dict.py --base_model ckpt --output_dir hf --allow_pickle_weights
    python export_state_dict.py --base_model stories260K.bin --tokenizer TOKDIR --output_dir hf
    python export_state_dict.py --base_model hf --output_dir c --format llama2c
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from utils.args import Group, StageArgs, unfingerprinted
from utils.artifacts import (Output, library_versions, read_output, sha256_file, sha256_json, tokenizer_fingerprint,
                             write_json)
from utils.cli import parse_size, run
from utils.dtypes import CONFIG_NAMES, dtype_code, name_of, torch_dtype_of
from utils.errors import SuiteError, UsageError
from utils.weights import forward
from utils.weights.config import check_config, config_dtype, read_config
from utils.weights.convert import (check_destination, copy_tokenizer, log, no_tokenizer_warning, sentencepiece_source,
                                   tokenizer_source, weight_hashes)
from utils.weights.export_plan import MergeInputs, check_base, plan_export
from utils.weights.folders import check_model_dir, looks_like_hub_id, missing_folder
from utils.weights.formats import (META_LAYER, META_ROPE_THETA, hf_llama_config, hf_to_meta_name, llama2c_layout,
                                   llama_dims, meta_hidden_dim, meta_params, meta_split_dim, meta_to_hf_name,
                                   read_llama2c_header, rope_tables, to_interleaved, to_rotate_half)
from utils.weights.merge import check_adapter_dir, load_adapter, merge_weight
from utils.weights.shards import Entry, ModelWeights, ShardWriter, conversion_setup, read_entry

STAGE = "export_state_dict"


@dataclass(frozen=True)
class Sources(Group):
    """What is read: the model or checkpoint converted, an adapter merged into it first, a tokenizer to carry."""

    base_model: str = unfingerprinted(why="identified by its content: its files' hashes count")
    lora_weights: str | None = unfingerprinted(why="identified by its content: its files' hashes count")
    tokenizer: str | None = unfingerprinted(why="identified by its content: its files' hashes count")
    allow_pickle_weights: bool = unfingerprinted(why="only allows reading inputs that are otherwise refused")


@dataclass(frozen=True)
class Conversion(Group):
    """What is written: the format, its split into files and its precision."""

    format: Literal["meta", "llama2c"]
    num_shards: int
    dtype: Literal["auto", "fp32", "bf16", "fp16"]
    max_shard_size: str

    def problems(self) -> list[str]:
        problems = []
        if self.num_shards < 1:
            problems.append(f"--num_shards must be >= 1, got {self.num_shards}")
        if self.format == "llama2c" and (self.num_shards != 1 or self.dtype not in ("auto", "fp32")):
            problems.append("--format llama2c writes one fp32 file: --num_shards 1, --dtype fp32")
        try:
            parse_size(self.max_shard_size)
        except SuiteError as exc:
            problems.append(str(exc))
        return problems


@dataclass(frozen=True)
class Destination(Group):
    """Where the result is written."""

    output_dir: str = unfingerprinted(why="where the output is written, not what it holds")
    overwrite: bool = unfingerprinted(why="only allows replacing a different result")


@dataclass(frozen=True)
class ExportStateDictArgs(StageArgs):
    STAGE = STAGE

    sources: Sources
    conversion: Conversion
    destination: Destination


Args = ExportStateDictArgs


def main(
    base_model: str,
    output_dir: str,
    *,
    lora_weights: str | None = None,
    num_shards: int = 1,
    format: Literal["meta", "llama2c"] = "meta",
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    tokenizer: str | None = None,
    max_shard_size: str = "2GB",
    allow_pickle_weights: bool = False,
    overwrite: bool = False,
) -> None:
    """Export a Llama to Meta's consolidated or llama2.c format, or import one of those to Hugging Face.

    Args:
        base_model: A Hugging Face Llama folder (exported), a consolidated folder (params.json +
            consolidated.NN.pth) or a llama2.c checkpoint file (imported to Hugging Face).
        output_dir: Folder to write (staged and renamed when complete; re-running with the same inputs is a no-op).
        lora_weights: Export: a finetune.py output or PEFT LoRA adapter to merge into the base first.
        num_shards: Export to meta: model-parallel degree (consolidated.00.pth ... NN); must divide the heads,
            key/value heads, FFN size and vocabulary.
        format: Export format: meta (consolidated.NN.pth + params.json) or llama2c (one fp32 model.bin).
        dtype: Weight precision written: fp32, bf16, fp16 or auto (the source's; llama2.c is always fp32).
        tokenizer: Import: a folder whose tokenizer files are copied into the output (default: those beside the input).
        max_shard_size: Import: largest safetensors shard written (e.g. 200MB, 2GB).
        allow_pickle_weights: Read consolidated .pth files (torch.load(weights_only=True)); they are not safetensors.
        overwrite: Replace an output_dir that holds a different result.
    """
    args = ExportStateDictArgs.from_flags(dict(locals()))
    src = Path(base_model)
    kind = input_kind(src)
    check_flags(args, kind)
    check_inputs(src, kind, lora_weights, allow_pickle_weights)
    out = Output(output_dir, STAGE, overwrite)  # before any work (hashing the inputs included)
    inputs = input_hashes(args.sources, kind)
    fp = fingerprint(args, {"kind": kind, **inputs})
    if out.up_to_date(fp):
        log(STAGE, f"{output_dir} already holds this conversion (fingerprint {fp[:12]}); nothing to do")
        print(os.path.abspath(output_dir))
        return
    started = time.time()
    meta = {"args": args.flags(), "inputs": inputs}
    with conversion_setup():
        if kind == "hf":
            export(args, out, fp, meta)
        else:
            import_to_hf(args, kind, out, fp, meta)
    log(STAGE, f"wrote {output_dir} in {time.time() - started:.1f}s")
    print(os.path.abspath(output_dir))


def fingerprint(args: ExportStateDictArgs, inputs: dict) -> str:
    """The output's fingerprint: the inputs (their kind and hashes) and every flag that changes what is written."""
    return sha256_json({"stage": STAGE, "inputs": inputs, "args": args.fingerprint_values()})


def input_kind(src: Path) -> str | None:
    """What --base_model is: a llama2.c file, a Meta consolidated folder, a Hugging Face folder (None: neither)."""
    return ("llama2c" if src.is_file() else "meta" if (src / "params.json").is_file() else
            "hf" if (src / "config.json").is_file() else None)


def check_flags(args: ExportStateDictArgs, kind: str | None) -> None:
    """Every problem with the flags (and the files they name), reported together."""
    sources, conversion = args.sources, args.conversion
    base_model, lora_weights, tokenizer = sources.base_model, sources.lora_weights, sources.tokenizer
    problems = []
    if not Path(base_model).exists():
        problems.append(missing_folder(base_model, "--base_model") if looks_like_hub_id(base_model) else
                        f"--base_model {base_model}: no such file or folder")
    problems += args.problems()
    if kind not in ("hf", None) and (lora_weights or conversion.num_shards != 1 or conversion.format != "meta"):
        problems.append("--lora_weights, --num_shards and --format apply to an export from a Hugging Face model; "
                        f"--base_model {base_model} is imported to Hugging Face")
    if kind == "meta" and not sources.allow_pickle_weights:
        problems.append(f"--base_model {base_model}: consolidated .pth files are not safetensors; pass "
                        "--allow_pickle_weights to read them with torch.load(weights_only=True)")
    if tokenizer and not Path(tokenizer).is_dir():
        problems.append(missing_folder(tokenizer, "--tokenizer"))
    if lora_weights and not Path(lora_weights).is_dir():
        problems.append(missing_folder(lora_weights, "--lora_weights"))
    problems += check_destination(args.destination.output_dir, {"--base_model": base_model, "--lora_weights": lora_weights})
    if problems:
        raise UsageError("\n".join(problems))


def check_inputs(src: Path, kind: str | None, lora_weights: str | None, allow_pickle: bool) -> None:
    """Refuse incomplete inputs before any work (exit 1, naming the folder and what is missing)."""
    if kind is None:
        raise SuiteError(f"--base_model {src}: neither a Hugging Face model folder (no config.json) nor a consolidated "
                         "folder (no params.json); nothing to convert")
    if kind == "meta" and not list(src.glob("consolidated.*.pth")):
        raise SuiteError(f"--base_model {src}: params.json but no consolidated.NN.pth files")
    if kind == "hf":
        problems = check_model_dir(str(src), allow_pickle, "--base_model")
        if problems:
            raise SuiteError("\n".join(problems))
        check_config(read_config(src, "--base_model"), src, "--base_model")
    if lora_weights:
        check_adapter_dir(lora_weights, allow_pickle)


def input_hashes(sources: Sources, kind: str) -> dict:
    """sha256 of what is read: the checkpoint or model's weight files, the adapter's files, the tokenizer given."""
    src = Path(sources.base_model)
    inputs = {"base": {src.name: sha256_file(src)} if kind == "llama2c" else weight_hashes(src)}
    if sources.lora_weights:
        inputs["lora"] = {p.name: sha256_file(p) for p in sorted(Path(sources.lora_weights).glob("adapter_*"))}
    if sources.tokenizer:
        inputs["tokenizer"] = tokenizer_fingerprint(sources.tokenizer)
    return inputs


# --------------------------------------------------------------------------------------------------
# Hugging Face -> Meta / llama2.c


class MergedSource:
    """The base's tensors by Hugging Face name, with the adapter merged in, read one at a time."""

    def __init__(self, inputs: MergeInputs):
        self.config = read_config(inputs.base_model, "--base_model")
        self.weights = ModelWeights(inputs.base_model, inputs.allow_pickle_weights)
        self.adapter = None
        if inputs.lora_weights:
            plan = plan_export(inputs, None)  # the same checks as export_hf: adapter kind, and the base it was trained on
            check_base(plan)
            self.adapter = load_adapter(plan.adapter, inputs.allow_pickle_weights)
            unknown = [n for n in list(self.adapter.targets) + list(self.adapter.replacements) if n not in self.weights]
            if unknown:
                raise SuiteError(f"--lora_weights {inputs.lora_weights}: adapts tensors the base does not have: "
                                 f"{unknown[:3]}")

    def get(self, name: str):
        if self.adapter and name in self.adapter.targets:
            return merge_weight(self.adapter.targets[name], self.weights.get(name), self.adapter.fan_in_fan_out)
        if self.adapter and name in self.adapter.replacements:
            return self.adapter.replacements[name].float()
        return self.weights.get(name)


def meta_tensor(src: MergedSource, dims: dict, meta_name: str):
    """One Meta-format tensor (full, not split): renamed, q/k rows interleaved."""
    hf = meta_to_hf_name(meta_name)
    if hf == "lm_head.weight" and hf not in src.weights:
        hf = "model.embed_tokens.weight"  # tied: Meta's format always has its own output matrix
    tensor = src.get(hf)
    if meta_name.endswith("attention.wq.weight"):
        tensor = to_interleaved(tensor, dims["n_heads"])
    elif meta_name.endswith("attention.wk.weight"):
        tensor = to_interleaved(tensor, dims["n_kv_heads"])
    return tensor


def meta_names(dims: dict) -> list[str]:
    names = ["tok_embeddings.weight"]
    for i in range(dims["n_layers"]):
        names += [f"layers.{i}.{m}" for m in META_LAYER.values()]
    return names + ["norm.weight", "output.weight"]


@dataclass
class ExportJob:
    """An export from Hugging Face: the merged source, its Llama dimensions, the dtype and files written."""

    src: MergedSource
    dims: dict
    format: str
    dtype: str
    num_shards: int


def export(args: ExportStateDictArgs, out: Output, fp: str, meta: dict) -> None:
    """Write the (merged) model in Meta's or llama2.c's format, with its tokenizer, verified by reading it back."""
    job = plan_conversion(args)
    with out.produce(fp, **meta) as st:
        if job.format == "meta":
            files = write_meta_shards(st.dir, job)
            write_json(st.dir / "params.json", meta_params(job.dims))
        else:
            write_llama2c(st.dir / "model.bin", job.src, job.dims)
            files = ["model.bin"]
        tok_files = copy_export_tokenizer(st.dir, args.sources, job.format)
        verification = verify_export(st.dir, job.format, job.src, job.dims)
        log(STAGE, f"verified: logits read back from the {job.format} {'files' if job.format == 'meta' else 'file'} "
                   f"match the source's {'merged with the adapter ' if job.src.adapter else ''}"
                   f"{forward.agreement(verification)}")
        st.meta.update({"direction": "export", "format": job.format, "dtype": job.dtype, "files_written": files,
                        "params": meta_params(job.dims), "hf_config": job.src.config, "tokenizer": tok_files,
                        "verification": verification, "versions": library_versions("torch")})


def plan_conversion(args: ExportStateDictArgs) -> ExportJob:
    """Open the source (merging the adapter), check that the format can hold it, and say what is written."""
    sources, conversion = args.sources, args.conversion
    src = MergedSource(MergeInputs(lora_weights=sources.lora_weights, base_model=sources.base_model,
                                   allow_pickle_weights=sources.allow_pickle_weights))
    dims = llama_dims(src.config, f"--base_model {sources.base_model}")
    extra = [n for n in src.weights.entries if n != "lm_head.weight" and not _is_known(n, hf_to_meta_name)]
    if extra:
        raise SuiteError(f"--base_model {sources.base_model}: tensors with no place in Meta's format: {extra[:3]}")
    fmt, n = conversion.format, conversion.num_shards
    dtype = "fp32" if fmt == "llama2c" else (config_dtype(src.config) if conversion.dtype == "auto" else conversion.dtype)
    if fmt == "meta":
        bad = [k for k in ("n_heads", "n_kv_heads", "hidden", "vocab_size", "dim") if dims[k] % n]
        if bad:
            raise UsageError(f"--num_shards {n} must divide {', '.join(f'{k} ({dims[k]})' for k in bad)}")
    what = f"{n} shard{'s' * (n > 1)}, {dtype}" if fmt == "meta" else "one fp32 model.bin"
    log(STAGE, f"exporting {sources.base_model}{' + ' + sources.lora_weights if sources.lora_weights else ''} to "
               f"{fmt} ({what})")
    return ExportJob(src, dims, fmt, dtype, n)


def write_meta_shards(folder: Path, job: ExportJob) -> list[str]:
    """consolidated.NN.pth, split along Meta's model-parallel dimensions, each checked by reading it back."""
    import torch

    want, n = torch_dtype_of(job.dtype), job.num_shards
    files = []
    for i in range(n):
        # One shard in memory at a time: Meta's .pth shards are whole pickled dicts.
        shard = {}
        for name in meta_names(job.dims):
            tensor = meta_tensor(job.src, job.dims, name).to(want)
            dim = meta_split_dim(name)
            shard[name] = (tensor if dim is None else tensor.chunk(n, dim=dim)[i]).clone().contiguous()
        path = folder / f"consolidated.{i:02d}.pth"
        torch.save(shard, path)
        back = torch.load(path, map_location="cpu", weights_only=True)
        if back.keys() != shard.keys() or not all(torch.equal(back[k], shard[k]) for k in shard):
            raise SuiteError(f"{path} does not read back as written")
        files.append(path.name)
        del shard, back
    return files


def copy_export_tokenizer(folder: Path, sources: Sources, fmt: str) -> list[str]:
    """The tokenizer files of the adapter or the base; for Meta's format also its SentencePiece model."""
    lora_weights, base_model = sources.lora_weights, sources.base_model
    tok_files = copy_tokenizer(tokenizer_source(lora_weights, base_model), folder)
    if not tok_files:
        no_tokenizer_warning(STAGE, {"--lora_weights": lora_weights, "--base_model": base_model})
    if fmt != "meta":
        return tok_files
    # Meta's folders hold the SentencePiece model beside the shards (its code reads nothing else). A
    # fine-tune's folder often carries only the fast tokenizer, so the base's is looked for too.
    spm = sentencepiece_source(lora_weights, base_model)
    if spm is not None and "tokenizer.model" not in tok_files:
        shutil.copyfile(spm, folder / "tokenizer.model")
        tok_files.append("tokenizer.model")
    elif spm is None and tok_files:
        log(STAGE, f"note: no tokenizer.model (SentencePiece) in {base_model}"
                   f"{' or ' + lora_weights if lora_weights else ''}, which Meta's own code reads "
                   f"from beside the shards; the Hugging Face tokenizer files are copied ({', '.join(tok_files)})")
    return tok_files


def _is_known(name: str, fn) -> bool:
    try:
        fn(name)
        return True
    except SuiteError:
        return False


def write_llama2c(path: Path, src: MergedSource, dims: dict) -> None:
    """Stream the tensors into llama2.c's version-0 layout, one at a time."""
    import torch

    tied = dims["tied"] or ("lm_head.weight" in src.weights and torch.equal(
        src.get("lm_head.weight"), src.get("model.embed_tokens.weight")))
    dims = {**dims, "tied": tied}
    vocab = dims["vocab_size"] if tied else -dims["vocab_size"]
    cos, sin = rope_tables(dims)
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dims["dim"], dims["hidden"], dims["n_layers"], dims["n_heads"], dims["n_kv_heads"], vocab,
                            dims["max_seq_len"]))
        for name, shape in llama2c_layout(dims):
            t = cos if name == "rope.cos" else sin if name == "rope.sin" else meta_tensor(src, dims, name)
            if tuple(t.shape) != shape:
                raise SuiteError(f"tensor {name} has shape {tuple(t.shape)}, llama2.c expects {shape}")
            f.write(memoryview(t.float().contiguous().reshape(-1).view(torch.uint8).numpy()))


def verify_export(folder: Path, fmt: str, src: MergedSource, dims: dict) -> dict:
    """Logits of the written checkpoint (read back through the import path) vs the source (+ adapter unmerged)."""
    reader = MetaReader(folder) if fmt == "meta" else Llama2cReader(next(folder.glob("*.bin")))
    config = {**hf_llama_config(reader.dims, "fp32"), "bos_token_id": src.config.get("bos_token_id")}
    ids = forward.probe_ids(config)
    ref = forward.logits(src.config, forward.WeightSource(src.weights, src.adapter), ids)
    got = forward.logits(config, forward.WeightSource(reader.weights()), ids)
    result = forward.compare(ref, got)
    dtype = reader.dtype
    forward.check_agreement(result, dtype, f"{fmt} checkpoint vs source")
    return {**result, "prompt_ids": ids}


# --------------------------------------------------------------------------------------------------
# Meta / llama2.c -> Hugging Face


def meta_to_rotate_half(meta_name: str, tensor, dims: dict):
    """A Meta-layout tensor with its q/k rows put back in Hugging Face's rotate-half order."""
    if meta_name.endswith("attention.wq.weight"):
        return to_rotate_half(tensor, dims["n_heads"])
    if meta_name.endswith("attention.wk.weight"):
        return to_rotate_half(tensor, dims["n_kv_heads"])
    return tensor


class MetaReader:
    """A consolidated folder as Hugging Face tensors: shards joined along Meta's split, q/k back to rotate-half."""

    def __init__(self, folder: Path):
        import torch

        self.folder = Path(folder)
        paths = sorted(self.folder.glob("consolidated.*.pth"))
        if not paths:
            raise SuiteError(f"--base_model {folder}: no consolidated.NN.pth files")
        try:
            params = json.loads((self.folder / "params.json").read_text(encoding="utf-8"))
            self.shards = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in paths]
        except Exception as exc:
            raise SuiteError(f"--base_model {folder}: cannot read ({type(exc).__name__}: {exc})") from None
        first = self.shards[0]
        if not isinstance(first, dict) or "tok_embeddings.weight" not in first:
            raise SuiteError(f"--base_model {folder}: {paths[0].name} is not a Meta Llama checkpoint")
        lacking = [k for k in ("dim", "n_layers", "n_heads") if not isinstance(params.get(k), int)]
        if lacking:
            raise SuiteError(f"--base_model {folder}: params.json lacks {', '.join(lacking)}")
        if "layers.0.feed_forward.w1.weight" not in first:
            raise SuiteError(f"--base_model {folder}: {paths[0].name} has no layers.0 weights (not a Llama checkpoint)")
        n = len(paths)
        dim = params["dim"]
        w1 = sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in self.shards)
        if "multiple_of" in params and meta_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier")) != w1:
            raise SuiteError(f"--base_model {folder}: params.json's FFN size does not match the weights ({w1})")
        emb = first["tok_embeddings.weight"]
        self.embed_dim = 0 if n > 1 and emb.shape[1] == dim else 1  # Llama 3 splits the vocabulary instead
        vocab = emb.shape[0] * (n if self.embed_dim == 0 else 1)
        heads = params["n_heads"]
        self.dims = {"dim": dim, "n_layers": params["n_layers"], "n_heads": heads,
                     "n_kv_heads": params.get("n_kv_heads") or heads, "vocab_size": vocab, "hidden": w1,
                     "norm_eps": params.get("norm_eps", 1e-5),
                     "rope_theta": float(params.get("rope_theta", META_ROPE_THETA)),  # absent in Llama 1/2 folders
                     "max_seq_len": params.get("max_seq_len", 2048), "tied": False}
        self.dtype = name_of(emb.dtype)

    def tensor(self, meta_name: str):
        import torch

        parts = [s[meta_name] for s in self.shards]
        dim = meta_split_dim(meta_name)
        if meta_name == "tok_embeddings.weight":
            dim = self.embed_dim
        t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        return meta_to_rotate_half(meta_name, t, self.dims)

    def hf_items(self) -> list[tuple[str, str]]:
        return [(meta_to_hf_name(m), m) for m in meta_names(self.dims)]

    def weights(self):
        """A lazy ModelWeights view by Hugging Face names (the verification forward reads it)."""
        entries = {}
        for hf, m in self.hf_items():
            proto = self.shards[0][m]
            shape = self._shape(m, proto)
            entries[hf] = Entry(hf, dtype_code(proto.dtype), shape, self.folder, pickled=lambda m=m: self.tensor(m))
        return ModelWeights.from_entries(self.folder, entries)

    def _shape(self, meta_name: str, proto):
        dim = self.embed_dim if meta_name == "tok_embeddings.weight" else meta_split_dim(meta_name)
        shape = list(proto.shape)
        if dim is not None:
            shape[dim] *= len(self.shards)
        return tuple(shape)


class Llama2cReader:
    """A llama2.c version-0 checkpoint as Hugging Face tensors (q/k rows back to rotate-half)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.dims = read_llama2c_header(self.path)
        self.dtype = "fp32"
        self.offsets, offset = {}, 28
        for name, shape in llama2c_layout(self.dims):
            n = 1
            for s in shape:
                n *= s
            self.offsets[name] = (offset, shape)
            offset += 4 * n

    def tensor(self, meta_name: str):
        if meta_name == "output.weight" and self.dims["tied"]:
            meta_name = "tok_embeddings.weight"
        return meta_to_rotate_half(meta_name, self.tensor_raw(meta_name), self.dims)

    def hf_items(self) -> list[tuple[str, str]]:
        names = meta_names(self.dims)
        if self.dims["tied"]:
            names.remove("output.weight")
        return [(meta_to_hf_name(m), m) for m in names]

    def weights(self):
        entries = {hf: Entry(hf, "F32", self.offsets[m][1], self.path, pickled=lambda m=m: self.tensor(m))
                   for hf, m in self.hf_items()}
        return ModelWeights.from_entries(self.path.parent, entries)

    def check_rope(self) -> bool:
        """Whether the file's RoPE tables are the standard ones for its shape (theta 10000)."""
        import torch

        cos, sin = rope_tables(self.dims)
        got = [self.tensor_raw(n) for n in ("rope.cos", "rope.sin")]
        return bool(torch.allclose(got[0], cos, atol=1e-5) and torch.allclose(got[1], sin, atol=1e-5))

    def tensor_raw(self, name: str):
        start, shape = self.offsets[name]
        n = 1
        for s in shape:
            n *= s
        return read_entry(Entry(name, "F32", shape, self.path, start, start + 4 * n))


def import_to_hf(args: ExportStateDictArgs, kind: str, out: Output, fp: str, meta: dict) -> None:
    """Write a Hugging Face Llama from a Meta or llama2.c checkpoint: shards, config, tokenizer; checked to run."""
    src = Path(args.sources.base_model)
    reader = open_checkpoint(src, kind)
    dtype = reader.dtype if args.conversion.dtype == "auto" else args.conversion.dtype
    dims, items = tied_items(reader, kind)
    folder = src if src.is_dir() else src.parent
    config = imported_config(folder, kind, dims, dtype)
    view = reader.weights()
    layout = [(hf, dtype_code(torch_dtype_of(dtype)), view.entries[hf].shape) for hf, _ in items]
    log(STAGE, f"importing {kind} checkpoint {src} ({len(items)} tensors) -> Hugging Face Llama ({dtype})")
    with out.produce(fp, **meta) as st:
        st.known_hashes.update(write_imported(st.dir, reader, items, layout, dtype,
                                              parse_size(args.conversion.max_shard_size)))
        write_json(st.dir / "config.json", config)
        tok_files = copy_import_tokenizer(st.dir, args.sources.tokenizer, folder)
        check_imported(st.dir, config)
        st.meta.update({"direction": "import", "format": kind, "dtype": dtype, "tokenizer": tok_files,
                        "tied": dims["tied"], "versions": library_versions("torch", "safetensors")})


def open_checkpoint(src: Path, kind: str):
    """A reader of the Meta folder or llama2.c file (refusing a llama2.c file whose RoPE is not theta 10000's)."""
    reader = MetaReader(src) if kind == "meta" else Llama2cReader(src)
    if kind == "llama2c" and not reader.check_rope():
        raise SuiteError(f"--base_model {src}: its RoPE tables are not theta 10000's; cannot tell the model's rope theta")
    return reader


def tied_items(reader, kind: str) -> tuple[dict, list[tuple[str, str]]]:
    """The checkpoint's dimensions and (Hugging Face, Meta) names of the tensors written: a Meta output matrix
    equal to the embeddings is not written (the model is tied)."""
    import torch

    items = reader.hf_items()
    dims = dict(reader.dims)
    if kind == "meta":  # Meta always stores the output matrix; equal to the embeddings means tied
        if torch.equal(reader.tensor("output.weight"), reader.tensor("tok_embeddings.weight")):
            dims["tied"] = True
            items = [(h, m) for h, m in items if m != "output.weight"]
    return dims, items


def imported_config(folder: Path, kind: str, dims: dict, dtype: str) -> dict:
    """config.json: the exact config a Meta folder of ours was exported from, else one built from the dimensions."""
    recorded = read_output(folder) if kind == "meta" else None
    if recorded and recorded.stage == STAGE and recorded.raw.get("hf_config"):
        config = {**recorded.raw["hf_config"], "dtype": CONFIG_NAMES[dtype]}  # the exact config this was exported from
        config.pop("torch_dtype", None)
        return config
    return hf_llama_config(dims, dtype)


def write_imported(folder: Path, reader, items: list, layout: list, dtype: str, limit: int) -> dict:
    """Stream the tensors into safetensors shards; their hashes."""
    want = torch_dtype_of(dtype)
    writer = ShardWriter(folder, layout, limit)
    try:
        for hf, m in items:
            writer.write(hf, reader.tensor(m).to(want).contiguous())
        return writer.close()
    finally:
        writer.abort()


def copy_import_tokenizer(folder: Path, tokenizer: str | None, beside: Path) -> list[str]:
    """The tokenizer files of --tokenizer, else those beside the checkpoint (a warning if there are none)."""
    tok = Path(tokenizer) if tokenizer else tokenizer_source(beside)
    tok_files = copy_tokenizer(tok, folder)
    if not tok_files:
        no_tokenizer_warning(STAGE, {"--tokenizer": tokenizer} if tokenizer else {"--base_model": beside},
                             " (give --tokenizer DIR: a folder with the model's tokenizer files)")
    return tok_files


def check_imported(folder: Path, config: dict) -> None:
    """The written model runs: finite logits on the probe prompt (read layer by layer from disk)."""
    import torch

    logits = forward.logits(config, forward.WeightSource(ModelWeights(folder)), forward.probe_ids(config))
    if not torch.isfinite(logits).all():
        raise SuiteError("the imported model gives non-finite logits; nothing written")


if __name__ == "__main__":
    run(main)
