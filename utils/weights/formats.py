"""Meta's "consolidated" checkpoint layout and llama2.c's binary format: key maps, the q/k RoPE row
permutation, model-parallel split dimensions, params.json, and the llama2.c header and tensor order."""

from __future__ import annotations

import struct
from pathlib import Path

from utils.dtypes import CONFIG_NAMES
from utils.errors import SuiteError
from utils.weights.config import rope_params

# llama2.c's per-layer tensors, in file order.
LLAMA2C_LAYER_ORDER = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                       "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                       "feed_forward.w3.weight")


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


def to_interleaved(weight, n_heads: int):
    """Hugging Face's rotate-half row order of a q/k projection -> Meta's interleaved pairs, per head."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def to_rotate_half(weight, n_heads: int):
    """The inverse of ``to_interleaved`` (what Hugging Face's Llama conversion applies)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


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


def meta_params(dims: dict) -> dict:
    """params.json as Meta writes it. ``rope_theta`` only where it is not Llama 2's 10000, as in Llama 3's
    folders: Llama 2's loader passes every key to ``ModelArgs(**params)``, which has no rope_theta field and
    refuses one."""
    params = {"dim": dims["dim"], "n_layers": dims["n_layers"], "n_heads": dims["n_heads"], "n_kv_heads": dims["n_kv_heads"],
              "vocab_size": dims["vocab_size"], **ffn_params(dims["dim"], dims["hidden"]), "norm_eps": dims["norm_eps"]}
    if float(dims["rope_theta"]) != META_ROPE_THETA:
        params["rope_theta"] = dims["rope_theta"]
    return params


def hf_llama_config(dims: dict, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["dim"],
            "intermediate_size": dims["hidden"], "num_hidden_layers": dims["n_layers"],
            "num_attention_heads": dims["n_heads"], "num_key_value_heads": dims["n_kv_heads"],
            "head_dim": dims["dim"] // dims["n_heads"], "vocab_size": dims["vocab_size"], "rms_norm_eps": dims["norm_eps"],
            "rope_parameters": {"rope_theta": dims["rope_theta"], "rope_type": "default"},
            "max_position_embeddings": dims["max_seq_len"], "tie_word_embeddings": dims["tied"], "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
            "initializer_range": 0.02, "use_cache": True, "dtype": CONFIG_NAMES[dtype]}


def llama2c_layout(dims: dict) -> list[tuple[str, tuple]]:
    """(Meta-format name, shape) in llama2.c file order (``rope.cos``/``rope.sin`` for the tables)."""
    dim, hd = dims["dim"], dims["dim"] // dims["n_heads"]
    kv = dims["n_kv_heads"] * hd
    shapes = {"attention_norm.weight": (dim,), "attention.wq.weight": (dim, dim), "attention.wk.weight": (kv, dim),
              "attention.wv.weight": (kv, dim), "attention.wo.weight": (dim, dim), "ffn_norm.weight": (dim,),
              "feed_forward.w1.weight": (dims["hidden"], dim), "feed_forward.w2.weight": (dim, dims["hidden"]),
              "feed_forward.w3.weight": (dims["hidden"], dim)}
    out = [("tok_embeddings.weight", (dims["vocab_size"], dim))]
    for kind in LLAMA2C_LAYER_ORDER:
        out += [(f"layers.{i}.{kind}", shapes[kind]) for i in range(dims["n_layers"])]
    out += [("norm.weight", (dim,)), ("rope.cos", (dims["max_seq_len"], hd // 2)), ("rope.sin", (dims["max_seq_len"], hd // 2))]
    if not dims["tied"]:
        out.append(("output.weight", (dims["vocab_size"], dim)))
    return out


def rope_tables(dims: dict):
    """llama2.c's cos/sin tables, computed as its export does (fp32)."""
    import torch

    hd = dims["dim"] // dims["n_heads"]
    freqs = 1.0 / (dims["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    t = torch.arange(dims["max_seq_len"], device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.cos(freqs), torch.sin(freqs)


def read_llama2c_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(28)
    if len(raw) < 28:
        raise SuiteError(f"{path}: too short for a llama2.c checkpoint")
    dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("<7i", raw)
    if min(dim, hidden, layers, heads, kv, seq) <= 0 or vocab == 0 or dim % heads or heads % kv:
        raise SuiteError(f"{path}: not a llama2.c (version 0) checkpoint: header {dim, hidden, layers, heads, kv, vocab, seq}")
    dims = {"dim": dim, "hidden": hidden, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv,
         "vocab_size": abs(vocab), "max_seq_len": seq, "tied": vocab > 0, "norm_eps": 1e-5, "rope_theta": 10000.0}
    expected = 28 + 4 * sum(_numel(s) for _, s in llama2c_layout(dims))
    if size != expected:
        raise SuiteError(f"{path}: {size} bytes, but a llama2.c checkpoint with header {dim, hidden, layers, heads, kv, vocab, seq} "
                         f"has {expected}: not a llama2.c (version 0) file, or truncated")
    return dims


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
