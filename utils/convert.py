"""What the conversion stages (export_hf.py, export_state_dict.py, apply_delta.py) share: destination
rules, input fingerprints, carrying config / tokenizer / template along, and the Meta "consolidated"
and llama2.c formats (key maps, RoPE row permutation, model-parallel splits, params.json). Reading and
writing shards is utils/shards.py, the merge math utils/merge.py, the verification forward utils/forward.py.

Destination rules, for every stage: output goes to a hidden sibling folder renamed into place when
complete (utils.artifacts.staged_dir); an existing destination needs --overwrite, and one that holds
this exact output already makes the stage a no-op; a destination equal to (or containing) a source is
refused, since replacing it would destroy the input; staging folders left by a killed run are removed
on the next start.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from utils.cli import SuiteError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def log(stage: str, message: str) -> None:
    print(f"{stage}: {message}", file=sys.stderr)


def check_destination(output_dir: str, sources: dict[str, str | None]) -> list[str]:
    """Problems with the destination relative to the inputs (flag -> path)."""
    problems = []
    out = Path(output_dir).resolve()
    for flag, src in sources.items():
        if not src:
            continue
        s = Path(src).resolve()
        if out == s or out in s.parents:
            problems.append(f"--output_dir {output_dir} is {'the same folder as' if out == s else 'a folder holding'} "
                            f"{flag} {src}; choose another destination (the input would be destroyed)")
    return problems


def sweep_stale(output_dir: str | Path) -> None:
    """Remove staging folders (``.NAME.tmp-PID-xxxxxx``) whose process is gone (a killed earlier run)."""
    out = Path(output_dir).absolute()
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


class Deferred:
    """A value computed now, or on a background thread while the conversion runs (input hashing: hashlib
    releases the GIL, so it overlaps the work on another core). ``result()`` waits for it."""

    def __init__(self, fn, now: bool):
        if now:
            self._value, self._future = fn(), None
        else:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
            self._future = self._pool.submit(fn)

    def result(self):
        if self._future is not None:
            self._value, self._future = self._future.result(), None
            self._pool.shutdown()
        return self._value


def read_folder_json(folder: str | Path, name: str, flag: str, missing: str = "") -> dict:
    """``folder/name`` parsed, or a SuiteError naming the flag (``missing`` says what its absence means)."""
    path = Path(folder) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"{flag} {folder}: no {name}{missing}") from None
    except ValueError as exc:
        raise SuiteError(f"{flag} {path}: not valid JSON ({exc})") from None


def read_config(folder: str | Path, flag: str) -> dict:
    return read_folder_json(folder, "config.json", flag)


# The config keys the conversions read, by model type (the layer-by-layer forward, Meta's params.json): a
# config without one would otherwise fail deep inside the work with a KeyError.
CONFIG_KEYS = {
    **{t: ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
       for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gpt2": ("n_embd", "n_layer", "n_head", "vocab_size"),
}


def check_config(config: dict, folder: str | Path, flag: str) -> dict:
    """Refuse a config.json that lacks what the conversion reads (its model_type, and the shape keys of the
    architectures converted here); returns the config."""
    if not isinstance(config, dict) or not config.get("model_type"):
        raise SuiteError(f"{flag} {folder}: config.json has no model_type (not a transformers model config)")
    missing = [k for k in CONFIG_KEYS.get(config["model_type"], ()) if not isinstance(config.get(k), int)]
    if missing:
        raise SuiteError(f"{flag} {folder}: config.json lacks {', '.join(missing)} (needed for a "
                         f"{config['model_type']} model; damaged or hand-edited?)")
    return config


def config_dtype(config: dict) -> str:
    """The suite's name (fp32/bf16/fp16) for the dtype a config declares (fp32 if none)."""
    return CONFIG_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), "fp32")


def set_config_dtype(config: dict, dtype: str) -> dict:
    config = dict(config)
    config["dtype"] = DTYPES[dtype]
    if "torch_dtype" in config:
        config["torch_dtype"] = DTYPES[dtype]
    return config


def weight_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every weight file (and index) of a model folder, and its config."""
    from utils.artifacts import sha256_file

    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".pth") or p.name.endswith(".index.json") or p.name == "config.json"))
    return {n: sha256_file(folder / n) for n in names}


def quick_hashes(folder: str | Path) -> dict:
    """Identity of a model folder's files without reading their data: size, modification time and the sha256
    of the safetensors header (every tensor's name, dtype, shape and offsets) for weight files; the sha256 of
    small files. For inputs whose content is verified otherwise (a delta's recorded tensor hashes)."""
    import struct

    from utils.artifacts import sha256_file

    folder = Path(folder)
    out = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        st = p.stat()
        if p.suffix == ".safetensors":
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = f.read(min(n, 100 << 20))
            import hashlib

            out[p.name] = [st.st_size, st.st_mtime_ns, hashlib.sha256(header).hexdigest()]
        elif st.st_size < 1 << 24:
            out[p.name] = sha256_file(p)
        else:
            out[p.name] = [st.st_size, st.st_mtime_ns]
    return out


def tokenizer_source(*folders: str | Path | None) -> Path | None:
    """The first folder holding tokenizer files."""
    from utils.artifacts import TOKENIZER_FILES

    for f in folders:
        if f and any((Path(f) / n).is_file() for n in TOKENIZER_FILES):
            return Path(f)
    return None


def sentencepiece_source(*folders: str | Path | None) -> Path | None:
    """The first folder's ``tokenizer.model`` (a SentencePiece model, what Meta's code reads), if any has one."""
    for f in folders:
        if f and (Path(f) / "tokenizer.model").is_file():
            return Path(f) / "tokenizer.model"
    return None


def no_tokenizer_warning(stage: str, folders: dict[str, str | Path | None], fix: str = "") -> None:
    """Say that an output has no tokenizer, where none was found, and what that means."""
    where = " nor ".join(f"{flag} {path}" for flag, path in folders.items() if path)
    log(stage, f"warning: no tokenizer files in {where}; the output has none, so generate.py and finetune.py "
               f"cannot use it until they are copied in{fix}")


def copy_tokenizer(src: Path | None, dst: Path) -> list[str]:
    from utils.artifacts import TOKENIZER_FILES

    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def carry_template(template_file: Path | None, dst: Path, eos: str, stage: str) -> dict | None:
    """Copy ``template.json`` and install it as the tokenizer's chat template (checked by rendering)."""
    if template_file is None or not template_file.is_file():
        return None
    from utils.chat_template import check, to_jinja
    from utils.templates import template_from_dict

    data = json.loads(template_file.read_text(encoding="utf-8"))
    shutil.copyfile(template_file, dst / "template.json")
    name = data.pop("name", "template")
    info = {"name": name, "file": "template.json", "chat_template": False}
    if "chat_template" in data and "prompt_input" not in data and "user_format" not in data:
        jinja = data["chat_template"]
    else:
        try:
            template = template_from_dict(data, name, str(template_file))
        except SuiteError as exc:
            log(stage, f"warning: template.json cannot be read ({exc}); the tokenizer's chat template is unchanged")
            return info
        jinja = to_jinja(template)
        problem = check(template, jinja, eos) if jinja else "no Jinja form for this template kind"
        if problem:
            log(stage, f"warning: the training template is carried as template.json only: {problem}")
            return info
    (dst / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    config = dst / "tokenizer_config.json"
    if config.is_file():  # a chat_template key there would compete with the .jinja file
        tc = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" in tc:
            tc["chat_template"] = jinja
            config.write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    info["chat_template"] = True
    return info


def eos_token(tokenizer_dir: Path | None) -> str:
    if tokenizer_dir is None:
        return "</s>"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((tokenizer_dir / name).read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return "</s>"


def floating(code: str) -> bool:
    return code in ("F64", "F32", "F16", "BF16")


# --------------------------------------------------------------------------------------------------
# Meta "consolidated" and llama2.c formats

META_GLOBAL = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "output.weight"}
META_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
# Meta's model-parallel split of each weight (fairscale layers): dimension split, or None (replicated).
# ParallelEmbedding splits the embedding dimension; column-parallel layers their output rows,
# row-parallel layers (wo, w2) their input columns.
META_SPLIT = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None, "attention.wq.weight": 0,
              "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
              "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1, "feed_forward.w3.weight": 0,
              "attention_norm.weight": None, "ffn_norm.weight": None}


def hf_to_meta_name(name: str) -> str:
    if name in META_GLOBAL:
        return META_GLOBAL[name]
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        rest = ".".join(parts[3:])
        if rest in META_LAYER:
            return f"layers.{parts[2]}.{META_LAYER[rest]}"
    raise SuiteError(f"tensor {name} has no place in Meta's Llama format")


def meta_to_hf_name(name: str) -> str:
    inverse = {v: k for k, v in META_GLOBAL.items()}
    if name in inverse:
        return inverse[name]
    parts = name.split(".")
    rest = ".".join(parts[2:])
    layer_inv = {v: k for k, v in META_LAYER.items()}
    if parts[0] == "layers" and rest in layer_inv:
        return f"model.layers.{parts[1]}.{layer_inv[rest]}"
    raise SuiteError(f"tensor {name} is not part of Meta's Llama format")


def meta_split_dim(meta_name: str) -> int | None:
    key = meta_name if meta_name in META_SPLIT else ".".join(meta_name.split(".")[2:])
    return META_SPLIT[key]


def to_interleaved(w, n_heads: int):
    """Hugging Face's rotate-half row order of a q/k projection -> Meta's interleaved pairs, per head."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def to_rotate_half(w, n_heads: int):
    """The inverse of ``to_interleaved`` (what Hugging Face's Llama conversion applies)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def ffn_params(dim: int, hidden: int) -> dict:
    """``multiple_of`` / ``ffn_dim_multiplier`` with which Meta's formula gives ``hidden``:
    h = int(2 * 4 * dim / 3); h = int(ffn_dim_multiplier * h); round h up to a multiple_of."""
    base = int(2 * (4 * dim) / 3)
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if -(-base // m) * m == hidden:
            return {"multiple_of": m, "ffn_dim_multiplier": None}
    for mult in (hidden / base, (hidden + 0.5) / base):
        if int(mult * base) == hidden:
            return {"multiple_of": 1, "ffn_dim_multiplier": mult}
    raise SuiteError(f"intermediate_size {hidden} cannot be expressed with Meta's ffn formula for dim {dim}")


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    h = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def llama_dims(config: dict, flag: str = "--base_model") -> dict:
    """The Llama shape numbers of a Hugging Face config; refuses what Meta's format cannot hold. ``flag``
    names the input in the messages (the flag and its folder)."""
    from utils.forward import rope_params

    mt = config.get("model_type")
    if mt not in ("llama", "mistral"):
        raise SuiteError(f"{flag}: Meta's consolidated and llama2.c formats hold Llama-architecture models; this is "
                         f"model_type {mt!r}")
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    hd = config.get("head_dim") or dim // heads
    if hd * heads != dim:
        raise SuiteError(f"{flag}: head_dim {hd} x {heads} heads != hidden_size {dim}; Meta's format cannot hold it")
    rope = rope_params(config)
    if rope.get("rope_type", "default") != "default":
        raise SuiteError(f"{flag}: rope scaling {rope.get('rope_type')!r} has no place in params.json")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise SuiteError(f"{flag}: biases have no place in Meta's format")
    return {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads") or heads, "vocab_size": config["vocab_size"],
            "hidden": config["intermediate_size"], "norm_eps": config.get("rms_norm_eps", 1e-6),
            "rope_theta": float(rope["rope_theta"]), "max_seq_len": config.get("max_position_embeddings", 2048),
            "tied": bool(config.get("tie_word_embeddings", False))}


# The RoPE base Llama 1 and 2 use, and what every reader of params.json assumes when it has no rope_theta.
META_ROPE_THETA = 10000.0


def meta_params(d: dict) -> dict:
    """params.json as Meta writes it. ``rope_theta`` only where it is not Llama 2's 10000, as in Llama 3's
    folders: Llama 2's loader passes every key to ``ModelArgs(**params)``, which has no rope_theta field and
    refuses one."""
    params = {"dim": d["dim"], "n_layers": d["n_layers"], "n_heads": d["n_heads"], "n_kv_heads": d["n_kv_heads"],
              "vocab_size": d["vocab_size"], **ffn_params(d["dim"], d["hidden"]), "norm_eps": d["norm_eps"]}
    if float(d["rope_theta"]) != META_ROPE_THETA:
        params["rope_theta"] = d["rope_theta"]
    return params


def hf_llama_config(d: dict, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d["dim"],
            "intermediate_size": d["hidden"], "num_hidden_layers": d["n_layers"],
            "num_attention_heads": d["n_heads"], "num_key_value_heads": d["n_kv_heads"],
            "head_dim": d["dim"] // d["n_heads"], "vocab_size": d["vocab_size"], "rms_norm_eps": d["norm_eps"],
            "rope_parameters": {"rope_theta": d["rope_theta"], "rope_type": "default"},
            "max_position_embeddings": d["max_seq_len"], "tie_word_embeddings": d["tied"], "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
            "initializer_range": 0.02, "use_cache": True, "dtype": DTYPES[dtype]}


# llama2.c's legacy (version 0) checkpoint: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
# vocab_size, seq_len; a negative vocab_size means the classifier is stored separately), then fp32
# tensors: embeddings, then each kind of layer weight for all layers in turn, the final norm, the RoPE
# cos and sin tables (seq_len x head_dim/2), and the classifier if not shared. q/k rows are interleaved.
LLAMA2C_LAYER_ORDER = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                       "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                       "feed_forward.w3.weight")


def llama2c_layout(d: dict) -> list[tuple[str, tuple]]:
    """(Meta-format name, shape) in llama2.c file order (``rope.cos``/``rope.sin`` for the tables)."""
    dim, hd = d["dim"], d["dim"] // d["n_heads"]
    kv = d["n_kv_heads"] * hd
    shapes = {"attention_norm.weight": (dim,), "attention.wq.weight": (dim, dim), "attention.wk.weight": (kv, dim),
              "attention.wv.weight": (kv, dim), "attention.wo.weight": (dim, dim), "ffn_norm.weight": (dim,),
              "feed_forward.w1.weight": (d["hidden"], dim), "feed_forward.w2.weight": (dim, d["hidden"]),
              "feed_forward.w3.weight": (d["hidden"], dim)}
    out = [("tok_embeddings.weight", (d["vocab_size"], dim))]
    for kind in LLAMA2C_LAYER_ORDER:
        out += [(f"layers.{i}.{kind}", shapes[kind]) for i in range(d["n_layers"])]
    out += [("norm.weight", (dim,)), ("rope.cos", (d["max_seq_len"], hd // 2)), ("rope.sin", (d["max_seq_len"], hd // 2))]
    if not d["tied"]:
        out.append(("output.weight", (d["vocab_size"], dim)))
    return out


def rope_tables(d: dict):
    """llama2.c's cos/sin tables, computed as its export does (fp32)."""
    import torch

    hd = d["dim"] // d["n_heads"]
    freqs = 1.0 / (d["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    t = torch.arange(d["max_seq_len"], device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.cos(freqs), torch.sin(freqs)


def read_llama2c_header(path: Path) -> dict:
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(28)
    if len(raw) < 28:
        raise SuiteError(f"{path}: too short for a llama2.c checkpoint")
    dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("<7i", raw)
    if min(dim, hidden, layers, heads, kv, seq) <= 0 or vocab == 0 or dim % heads or heads % kv:
        raise SuiteError(f"{path}: not a llama2.c (version 0) checkpoint: header {dim, hidden, layers, heads, kv, vocab, seq}")
    d = {"dim": dim, "hidden": hidden, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv,
         "vocab_size": abs(vocab), "max_seq_len": seq, "tied": vocab > 0, "norm_eps": 1e-5, "rope_theta": 10000.0}
    expected = 28 + 4 * sum(_numel(s) for _, s in llama2c_layout(d))
    if size != expected:
        raise SuiteError(f"{path}: {size} bytes, but a llama2.c checkpoint with header {dim, hidden, layers, heads, kv, vocab, seq} "
                         f"has {expected}: not a llama2.c (version 0) file, or truncated")
    return d


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
