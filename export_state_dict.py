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
from pathlib import Path
from typing import Literal

from utils.errors import SuiteError, UsageError
from utils.cli import run

STAGE = "export_state_dict"


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
    args = dict(locals())
    from utils.artifacts import check_output_dir, sha256_file, sha256_json
    from utils.artifacts import sweep_stale
    from utils.weights.convert import check_destination, log, weight_hashes
    from utils.weights.folders import looks_like_hub_id, missing_folder

    src = Path(base_model)
    kind = ("llama2c" if src.is_file() else "meta" if (src / "params.json").is_file() else
            "hf" if (src / "config.json").is_file() else None)
    problems = []
    if not src.exists():
        problems.append(missing_folder(base_model, "--base_model") if looks_like_hub_id(base_model) else
                        f"--base_model {base_model}: no such file or folder")
    if num_shards < 1:
        problems.append(f"--num_shards must be >= 1, got {num_shards}")
    if kind not in ("hf", None) and (lora_weights or num_shards != 1 or format != "meta"):
        problems.append("--lora_weights, --num_shards and --format apply to an export from a Hugging Face model; "
                        f"--base_model {base_model} is imported to Hugging Face")
    if format == "llama2c" and (num_shards != 1 or dtype not in ("auto", "fp32")):
        problems.append("--format llama2c writes one fp32 file: --num_shards 1, --dtype fp32")
    if kind == "meta" and not allow_pickle_weights:
        problems.append(f"--base_model {base_model}: consolidated .pth files are not safetensors; pass "
                        "--allow_pickle_weights to read them with torch.load(weights_only=True)")
    try:
        from utils.cli import parse_size

        parse_size(max_shard_size)
    except SuiteError as exc:
        problems.append(str(exc))
    if tokenizer and not Path(tokenizer).is_dir():
        problems.append(missing_folder(tokenizer, "--tokenizer"))
    if lora_weights and not Path(lora_weights).is_dir():
        problems.append(missing_folder(lora_weights, "--lora_weights"))
    problems += check_destination(output_dir, {"--base_model": base_model, "--lora_weights": lora_weights})
    if problems:
        raise UsageError("\n".join(problems))
    check_inputs(src, kind, lora_weights, allow_pickle_weights)
    from utils.artifacts import claim_output_dir

    claim_output_dir(output_dir, STAGE, overwrite)  # before any work (hashing the inputs included)

    inputs = {"base": {src.name: sha256_file(src)} if kind == "llama2c" else weight_hashes(src)}
    if lora_weights:
        inputs["lora"] = {p.name: sha256_file(p) for p in sorted(Path(lora_weights).glob("adapter_*"))}
    if tokenizer:
        from utils.artifacts import tokenizer_fingerprint

        inputs["tokenizer"] = tokenizer_fingerprint(tokenizer)
    fingerprint = sha256_json({"stage": STAGE, "inputs": inputs, "kind": kind,
                               "args": {k: args[k] for k in ("num_shards", "format", "dtype", "max_shard_size")}})
    sweep_stale(output_dir)
    if check_output_dir(output_dir, STAGE, fingerprint, overwrite):
        log(STAGE, f"{output_dir} already holds this conversion (fingerprint {fingerprint[:12]}); nothing to do")
        print(os.path.abspath(output_dir))
        return
    from utils.weights.shards import conversion_setup

    started = time.time()
    meta = {"stage": STAGE, "fingerprint": fingerprint, "args": args, "inputs": inputs}
    with conversion_setup():
        if kind == "hf":
            export(args, meta)
        else:
            import_to_hf(args, kind, meta)
    log(STAGE, f"wrote {output_dir} in {time.time() - started:.1f}s")
    print(os.path.abspath(output_dir))


def check_inputs(src: Path, kind: str | None, lora_weights: str | None, allow_pickle: bool) -> None:
    """Refuse incomplete inputs before any work (exit 1, naming the folder and what is missing)."""
    from utils.weights.folders import check_model_dir

    if kind is None:
        raise SuiteError(f"--base_model {src}: neither a Hugging Face model folder (no config.json) nor a consolidated "
                         "folder (no params.json); nothing to convert")
    if kind == "meta" and not list(src.glob("consolidated.*.pth")):
        raise SuiteError(f"--base_model {src}: params.json but no consolidated.NN.pth files")
    if kind == "hf":
        problems = check_model_dir(str(src), allow_pickle, "--base_model")
        if problems:
            raise SuiteError("\n".join(problems))
        from utils.weights.config import check_config, read_config

        check_config(read_config(src, "--base_model"), src, "--base_model")
    if lora_weights:
        from utils.weights.merge import check_adapter_dir

        check_adapter_dir(lora_weights, allow_pickle)


# --------------------------------------------------------------------------------------------------
# Hugging Face -> Meta / llama2.c


class MergedSource:
    """The base's tensors by Hugging Face name, with the adapter merged in, read one at a time."""

    def __init__(self, base: str, lora: str | None, allow_pickle: bool):
        from utils.weights.config import read_config
        from utils.weights.merge import load_adapter
        from utils.weights.shards import ModelWeights

        self.config = read_config(base, "--base_model")
        self.weights = ModelWeights(base, allow_pickle)
        self.adapter = None
        if lora:
            from utils.weights.export_plan import plan_export, settle

            check = {"lora_weights": lora, "base_model": base, "output_dir": "/nonexistent-check-only",
                     "max_shard_size": "2GB", "adapter_only": False, "allow_pickle_weights": allow_pickle,
                     "overwrite": False, "dtype": "auto"}
            plan = plan_export(check)  # the same checks as export_hf: adapter kind, and the base it was trained on
            from utils.weights.convert import Deferred

            plan["deferred"] = Deferred(plan["fingerprints_fn"], now=True)
            settle(check, plan, STAGE)
            self.adapter = load_adapter(plan["adapter"], allow_pickle)
            unknown = [n for n in list(self.adapter.targets) + list(self.adapter.replacements) if n not in self.weights]
            if unknown:
                raise SuiteError(f"--lora_weights {lora}: adapts tensors the base does not have: {unknown[:3]}")

    def get(self, name: str):
        from utils.weights.merge import merge_weight

        if self.adapter and name in self.adapter.targets:
            return merge_weight(self.adapter.targets[name], self.weights.get(name), self.adapter.fan_in_fan_out)
        if self.adapter and name in self.adapter.replacements:
            return self.adapter.replacements[name].float()
        return self.weights.get(name)


def meta_tensor(src: MergedSource, d: dict, meta_name: str):
    """One Meta-format tensor (full, not split): renamed, q/k rows interleaved."""
    from utils.weights.formats import meta_to_hf_name, to_interleaved

    hf = meta_to_hf_name(meta_name)
    if hf == "lm_head.weight" and hf not in src.weights:
        hf = "model.embed_tokens.weight"  # tied: Meta's format always has its own output matrix
    t = src.get(hf)
    if meta_name.endswith("attention.wq.weight"):
        t = to_interleaved(t, d["n_heads"])
    elif meta_name.endswith("attention.wk.weight"):
        t = to_interleaved(t, d["n_kv_heads"])
    return t


def meta_names(d: dict) -> list[str]:
    from utils.weights.formats import META_LAYER

    names = ["tok_embeddings.weight"]
    for i in range(d["n_layers"]):
        names += [f"layers.{i}.{m}" for m in META_LAYER.values()]
    return names + ["norm.weight", "output.weight"]


def export(a: dict, meta: dict) -> None:
    import torch

    from utils.weights import forward
    from utils.artifacts import finish_meta, library_versions, staged_dir, write_json
    from utils.dtypes import CONFIG_NAMES
    from utils.weights.config import config_dtype
    from utils.weights.convert import (copy_tokenizer, log, no_tokenizer_warning, sentencepiece_source, tokenizer_source)
    from utils.weights.formats import hf_to_meta_name, llama_dims, meta_params, meta_split_dim

    src = MergedSource(a["base_model"], a["lora_weights"], a["allow_pickle_weights"])
    d = llama_dims(src.config, f"--base_model {a['base_model']}")
    extra = [n for n in src.weights.entries if n != "lm_head.weight" and not _is_known(n, hf_to_meta_name)]
    if extra:
        raise SuiteError(f"--base_model {a['base_model']}: tensors with no place in Meta's format: {extra[:3]}")
    dtype = "fp32" if a["format"] == "llama2c" else (config_dtype(src.config) if a["dtype"] == "auto" else a["dtype"])
    want = getattr(torch, CONFIG_NAMES[dtype])
    n = a["num_shards"]
    if a["format"] == "meta":
        bad = [k for k in ("n_heads", "n_kv_heads", "hidden", "vocab_size", "dim") if d[k] % n]
        if bad:
            raise UsageError(f"--num_shards {n} must divide {', '.join(f'{k} ({d[k]})' for k in bad)}")
    what = f"{n} shard{'s' * (n > 1)}, {dtype}" if a["format"] == "meta" else "one fp32 model.bin"
    log(STAGE, f"exporting {a['base_model']}{' + ' + a['lora_weights'] if a['lora_weights'] else ''} to "
               f"{a['format']} ({what})")
    with staged_dir(a["output_dir"]) as tmp:
        if a["format"] == "meta":
            files = []
            for i in range(n):
                # One shard in memory at a time: Meta's .pth shards are whole pickled dicts.
                shard = {}
                for name in meta_names(d):
                    t = meta_tensor(src, d, name).to(want)
                    dim = meta_split_dim(name)
                    shard[name] = (t if dim is None else t.chunk(n, dim=dim)[i]).clone().contiguous()
                path = tmp / f"consolidated.{i:02d}.pth"
                torch.save(shard, path)
                back = torch.load(path, map_location="cpu", weights_only=True)
                if back.keys() != shard.keys() or not all(torch.equal(back[k], shard[k]) for k in shard):
                    raise SuiteError(f"{path} does not read back as written")
                files.append(path.name)
                del shard, back
            write_json(tmp / "params.json", meta_params(d))
        else:
            write_llama2c(tmp / "model.bin", src, d)
            files = ["model.bin"]
        tok = tokenizer_source(a["lora_weights"], a["base_model"])
        tok_files = copy_tokenizer(tok, tmp)
        if not tok_files:
            no_tokenizer_warning(STAGE, {"--lora_weights": a["lora_weights"], "--base_model": a["base_model"]})
        if a["format"] == "meta":
            # Meta's folders hold the SentencePiece model beside the shards (its code reads nothing else). A
            # fine-tune's folder often carries only the fast tokenizer, so the base's is looked for too.
            spm = sentencepiece_source(a["lora_weights"], a["base_model"])
            if spm is not None and "tokenizer.model" not in tok_files:
                shutil.copyfile(spm, tmp / "tokenizer.model")
                tok_files.append("tokenizer.model")
            elif spm is None and tok_files:
                log(STAGE, f"note: no tokenizer.model (SentencePiece) in {a['base_model']}"
                           f"{' or ' + a['lora_weights'] if a['lora_weights'] else ''}, which Meta's own code reads "
                           f"from beside the shards; the Hugging Face tokenizer files are copied ({', '.join(tok_files)})")
        verification = verify_export(tmp, a["format"], src, d)
        log(STAGE, f"verified: logits read back from the {a['format']} {'files' if a['format'] == 'meta' else 'file'} "
                   f"match the source's {'merged with the adapter ' if src.adapter else ''}"
                   f"{forward.agreement(verification)}")
        finish_meta(tmp, {**meta, "direction": "export", "format": a["format"], "dtype": dtype, "files_written": files,
                          "params": meta_params(d), "hf_config": src.config, "tokenizer": tok_files,
                          "verification": verification, "versions": library_versions("torch")})


def _is_known(name: str, fn) -> bool:
    try:
        fn(name)
        return True
    except SuiteError:
        return False


def write_llama2c(path: Path, src: MergedSource, d: dict) -> None:
    """Stream the tensors into llama2.c's version-0 layout, one at a time."""
    import torch

    from utils.weights.formats import llama2c_layout, rope_tables

    tied = d["tied"] or ("lm_head.weight" in src.weights and torch.equal(
        src.get("lm_head.weight"), src.get("model.embed_tokens.weight")))
    d = {**d, "tied": tied}
    vocab = d["vocab_size"] if tied else -d["vocab_size"]
    cos, sin = rope_tables(d)
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", d["dim"], d["hidden"], d["n_layers"], d["n_heads"], d["n_kv_heads"], vocab,
                            d["max_seq_len"]))
        for name, shape in llama2c_layout(d):
            t = cos if name == "rope.cos" else sin if name == "rope.sin" else meta_tensor(src, d, name)
            if tuple(t.shape) != shape:
                raise SuiteError(f"tensor {name} has shape {tuple(t.shape)}, llama2.c expects {shape}")
            f.write(memoryview(t.float().contiguous().reshape(-1).view(torch.uint8).numpy()))


def verify_export(folder: Path, fmt: str, src: MergedSource, d: dict) -> dict:
    """Logits of the written checkpoint (read back through the import path) vs the source (+ adapter unmerged)."""
    from utils.weights import forward
    from utils.weights.formats import hf_llama_config

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


def meta_to_rotate_half(meta_name: str, t, dims: dict):
    """A Meta-layout tensor with its q/k rows put back in Hugging Face's rotate-half order."""
    from utils.weights.formats import to_rotate_half

    if meta_name.endswith("attention.wq.weight"):
        return to_rotate_half(t, dims["n_heads"])
    if meta_name.endswith("attention.wk.weight"):
        return to_rotate_half(t, dims["n_kv_heads"])
    return t


class MetaReader:
    """A consolidated folder as Hugging Face tensors: shards joined along Meta's split, q/k back to rotate-half."""

    def __init__(self, folder: Path):
        import torch

        from utils.weights.formats import META_ROPE_THETA, meta_hidden_dim

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
        self.dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[emb.dtype]

    def tensor(self, meta_name: str):
        import torch

        from utils.weights.formats import meta_split_dim

        parts = [s[meta_name] for s in self.shards]
        dim = meta_split_dim(meta_name)
        if meta_name == "tok_embeddings.weight":
            dim = self.embed_dim
        t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        return meta_to_rotate_half(meta_name, t, self.dims)

    def hf_items(self) -> list[tuple[str, str]]:
        from utils.weights.formats import meta_to_hf_name

        return [(meta_to_hf_name(m), m) for m in meta_names(self.dims)]

    def weights(self):
        """A lazy ModelWeights view by Hugging Face names (the verification forward reads it)."""
        from utils.weights.shards import Entry, ModelWeights
        from utils.dtypes import dtype_code

        entries = {}
        for hf, m in self.hf_items():
            proto = self.shards[0][m]
            shape = self._shape(m, proto)
            entries[hf] = Entry(hf, dtype_code(proto.dtype), shape, self.folder, pickled=lambda m=m: self.tensor(m))
        return ModelWeights.from_entries(self.folder, entries)

    def _shape(self, m, proto):
        from utils.weights.formats import meta_split_dim

        dim = self.embed_dim if m == "tok_embeddings.weight" else meta_split_dim(m)
        shape = list(proto.shape)
        if dim is not None:
            shape[dim] *= len(self.shards)
        return tuple(shape)


class Llama2cReader:
    """A llama2.c version-0 checkpoint as Hugging Face tensors (q/k rows back to rotate-half)."""

    def __init__(self, path: Path):
        from utils.weights.formats import llama2c_layout, read_llama2c_header

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
        from utils.weights.formats import meta_to_hf_name

        names = meta_names(self.dims)
        if self.dims["tied"]:
            names.remove("output.weight")
        return [(meta_to_hf_name(m), m) for m in names]

    def weights(self):
        from utils.weights.shards import Entry, ModelWeights

        entries = {hf: Entry(hf, "F32", self.offsets[m][1], self.path, pickled=lambda m=m: self.tensor(m))
                   for hf, m in self.hf_items()}
        return ModelWeights.from_entries(self.path.parent, entries)

    def check_rope(self) -> bool:
        """Whether the file's RoPE tables are the standard ones for its shape (theta 10000)."""
        import torch

        from utils.weights.formats import rope_tables

        cos, sin = rope_tables(self.dims)
        got = [self.tensor_raw(n) for n in ("rope.cos", "rope.sin")]
        return bool(torch.allclose(got[0], cos, atol=1e-5) and torch.allclose(got[1], sin, atol=1e-5))

    def tensor_raw(self, name: str):
        from utils.weights.shards import Entry, read_entry

        start, shape = self.offsets[name]
        n = 1
        for s in shape:
            n *= s
        return read_entry(Entry(name, "F32", shape, self.path, start, start + 4 * n))


def import_to_hf(a: dict, kind: str, meta: dict) -> None:
    import torch

    from utils.artifacts import finish_meta, library_versions, read_meta, staged_dir, write_json
    from utils.dtypes import CONFIG_NAMES
    from utils.weights.convert import copy_tokenizer, log, no_tokenizer_warning, tokenizer_source
    from utils.weights.formats import hf_llama_config
    from utils.weights.shards import ShardWriter
    from utils.dtypes import dtype_code
    from utils.cli import parse_size

    src = Path(a["base_model"])
    reader = MetaReader(src) if kind == "meta" else Llama2cReader(src)
    if kind == "llama2c" and not reader.check_rope():
        raise SuiteError(f"--base_model {src}: its RoPE tables are not theta 10000's; cannot tell the model's rope theta")
    dtype = reader.dtype if a["dtype"] == "auto" else a["dtype"]
    want = getattr(torch, CONFIG_NAMES[dtype])
    items = reader.hf_items()
    view = reader.weights()
    d = dict(reader.dims)
    if kind == "meta":  # Meta always stores the output matrix; equal to the embeddings means tied
        if torch.equal(reader.tensor("output.weight"), reader.tensor("tok_embeddings.weight")):
            d["tied"] = True
            items = [(h, m) for h, m in items if m != "output.weight"]
    folder = src if src.is_dir() else src.parent
    recorded = read_meta(folder) if kind == "meta" else None
    config = hf_llama_config(d, dtype)
    if recorded and recorded.get("stage") == STAGE and recorded.get("hf_config"):
        config = {**recorded["hf_config"], "dtype": CONFIG_NAMES[dtype]}  # the exact config this was exported from
        config.pop("torch_dtype", None)
    plan = [(h, dtype_code(want), view.entries[h].shape) for h, _ in items]
    log(STAGE, f"importing {kind} checkpoint {src} ({len(items)} tensors) -> Hugging Face Llama ({dtype})")
    with staged_dir(a["output_dir"]) as tmp:
        writer = ShardWriter(tmp, plan, parse_size(a["max_shard_size"]))
        try:
            for hf, m in items:
                writer.write(hf, reader.tensor(m).to(want).contiguous())
            files = writer.close()
        finally:
            writer.abort()
        write_json(tmp / "config.json", config)
        tok = Path(a["tokenizer"]) if a["tokenizer"] else tokenizer_source(folder)
        tok_files = copy_tokenizer(tok, tmp)
        if not tok_files:
            no_tokenizer_warning(STAGE, {"--tokenizer": a["tokenizer"]} if a["tokenizer"] else {"--base_model": folder},
                                 " (give --tokenizer DIR: a folder with the model's tokenizer files)")
        from utils.weights import forward
        from utils.weights.shards import ModelWeights

        logits = forward.logits(config, forward.WeightSource(ModelWeights(tmp)), forward.probe_ids(config))
        if not torch.isfinite(logits).all():
            raise SuiteError("the imported model gives non-finite logits; nothing written")
        finish_meta(tmp, {**meta, "direction": "import", "format": kind, "dtype": dtype, "tokenizer": tok_files,
                          "tied": d["tied"], "versions": library_versions("torch", "safetensors")},
                    known_hashes=files)


if __name__ == "__main__":
    run(main)
