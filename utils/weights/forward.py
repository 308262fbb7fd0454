"""A layer-by-layer forward pass that reads each weight from disk when it is needed: logits of a model
folder (or of base + adapter, the adapter applied unmerged, as peft runs it) in bounded memory.

This is how conversions verify their output without holding a model: the peak is one weight matrix
plus a short prompt's activations, instead of a whole model (and importing transformers' model code
alone costs more memory than converting). It covers the Llama family (llama, mistral, qwen2, qwen3:
RMSNorm, rotary positions incl. linear and Llama-3.1 scaling, grouped-query attention, SwiGLU) and GPT-2; the tests check it against
transformers' own forward for each. Other architectures are verified through transformers instead
(``SUPPORTED`` says which use this path).
"""

from __future__ import annotations

import math

from utils.errors import SuiteError
from utils.weights.config import rope_params
from utils.weights.shards import Scratch, row_chunks
from utils.weights.merge import lora_forward_extra, merge_weight

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = LLAMA_LIKE + ("gpt2",)


def supported(config: dict) -> bool:
    if config.get("model_type") not in SUPPORTED:
        return False
    if config.get("model_type") in LLAMA_LIKE:
        rope = rope_params(config)
        return (rope.get("rope_type", "default") in ("default", "linear", "llama3")
                and not config.get("partial_rotary_factor") and not rope.get("partial_rotary_factor"))
    return True


class WeightSource:
    """Weights by name from a ``ModelWeights``, with an optional adapter applied unmerged."""

    def __init__(self, weights, adapter=None):

        self.w, self.adapter = weights, adapter
        self.replace = adapter.replacements if adapter else {}
        self.scratch = Scratch(1)  # weight matrices are used once, right after they are read

    def has(self, name: str) -> bool:
        return name in self.replace or name in self.w

    def get(self, name: str, rows=None, transient: bool = False):
        if name in self.replace:
            t = self.replace[name]
            return (t if rows is None else t[rows[0]:rows[1]]).float()
        if name not in self.w:
            raise SuiteError(f"{self.w.folder}: weight {name} is missing")
        return self.w.get(name, rows, scratch=self.scratch if transient else None).float()

    def target(self, weight_name: str):
        return self.adapter.targets.get(weight_name) if self.adapter else None

    def linear(self, module: str, inputs, conv1d: bool = False):
        """inputs @ W.T + b for ``module`` (Conv1D stores W as [in, out]); the adapter's branch added if adapted."""
        w = self.get(module + ".weight", transient=True)
        w_oi = w.T if conv1d else w
        out = inputs @ w_oi.T
        if self.has(module + ".bias"):
            out = out + self.get(module + ".bias")
        target = self.target(module + ".weight")
        if target is not None:

            out = lora_forward_extra(target, inputs, w_oi, out)
        return out

    def embed(self, name: str, ids: list[int]):
        import torch

        rows = torch.stack([self.get(name, (i, i + 1))[0] for i in ids])
        target = self.target(name)
        if target is None:
            return rows
        if "m" in target.parts:  # DoRA on an embedding needs the norm over the whole vocabulary

            return merge_weight(target, self.get(name), False)[ids]
        ea = target.parts["EA"].T[ids]  # [T, r]
        return rows + (ea @ target.parts["EB"].T) * target.scaling

    def head(self, name: str, hidden):
        """hidden @ W_head.T, reading the (possibly vocabulary-sized) head in row chunks."""
        import torch


        if self.target(name) is not None or name in self.replace:
            return self.linear(name[: -len(".weight")], hidden)
        entry = self.w.entries[name]
        return torch.cat([hidden @ self.get(name, rows, transient=True).T for rows in row_chunks(entry, limit=4 << 20)],
                         dim=-1)


def _rms(hidden, weight, eps):
    return hidden * (hidden.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * weight


def _rope(hidden, cos, sin):
    half = hidden.shape[-1] // 2
    rotated = __import__("torch").cat([-hidden[..., half:], hidden[..., :half]], dim=-1)
    return hidden * cos + rotated * sin


def _attention(query, key, value, scale):
    """query [H, T, d], key/value [Hkv, T, d] -> [T, H*d], causal."""
    import torch

    groups = query.shape[0] // key.shape[0]
    key, value = key.repeat_interleave(groups, 0), value.repeat_interleave(groups, 0)
    scores = (query @ key.transpose(1, 2)) * scale
    T = query.shape[1]
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ value
    return out.transpose(0, 1).reshape(T, -1)


def llama_logits(config: dict, src: WeightSource, ids: list[int]):
    import torch

    hidden = config["hidden_size"]
    n_heads, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or hidden // n_heads
    eps = config.get("rms_norm_eps", 1e-6)
    rope = rope_params(config)
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    pos = torch.arange(len(ids)).float()
    if rope.get("rope_type") == "linear":
        pos = pos / rope["factor"]
    elif rope.get("rope_type") == "llama3":  # Llama 3.1: long wavelengths scaled, a smooth band in between
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    qk_norm = config.get("model_type") == "qwen3"
    h = src.embed("model.embed_tokens.weight", ids)
    T = len(ids)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms(h, src.get(p + "input_layernorm.weight"), eps)
        q = src.linear(p + "self_attn.q_proj", x).view(T, n_heads, hd).transpose(0, 1)
        k = src.linear(p + "self_attn.k_proj", x).view(T, n_kv, hd).transpose(0, 1)
        v = src.linear(p + "self_attn.v_proj", x).view(T, n_kv, hd).transpose(0, 1)
        if qk_norm:
            q = _rms(q, src.get(p + "self_attn.q_norm.weight"), eps)
            k = _rms(k, src.get(p + "self_attn.k_norm.weight"), eps)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        h = h + src.linear(p + "self_attn.o_proj", _attention(q, k, v, hd ** -0.5))
        x = _rms(h, src.get(p + "post_attention_layernorm.weight"), eps)
        gate = src.linear(p + "mlp.gate_proj", x)
        h = h + src.linear(p + "mlp.down_proj", torch.nn.functional.silu(gate) * src.linear(p + "mlp.up_proj", x))
    h = _rms(h, src.get("model.norm.weight"), eps)
    head = "lm_head.weight" if src.has("lm_head.weight") else "model.embed_tokens.weight"
    return src.head(head, h)


def gpt2_logits(config: dict, src: WeightSource, ids: list[int]):
    import torch.nn.functional as F

    n_heads, hidden = config["n_head"], config["n_embd"]
    hd = hidden // n_heads
    eps = config.get("layer_norm_epsilon", 1e-5)
    act = config.get("activation_function", "gelu_new")
    acts = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu,
            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}
    if act not in acts:
        raise SuiteError(f"gpt2 activation {act!r} is not supported by the bounded verification")
    pre = "transformer." if src.has("transformer.wte.weight") else ""
    T = len(ids)

    def ln(states, name):
        return F.layer_norm(states, (hidden,), src.get(name + ".weight"), src.get(name + ".bias"), eps)

    h = src.embed(pre + "wte.weight", ids) + src.get(pre + "wpe.weight", (0, T))
    for i in range(config["n_layer"]):
        p = f"{pre}h.{i}."
        x = ln(h, p + "ln_1")
        q, k, v = src.linear(p + "attn.c_attn", x, conv1d=True).split(hidden, dim=-1)
        q, k, v = (t.view(T, n_heads, hd).transpose(0, 1) for t in (q, k, v))
        scale = hd ** -0.5 if config.get("scale_attn_weights", True) else 1.0
        if config.get("scale_attn_by_inverse_layer_idx"):
            scale /= i + 1
        h = h + src.linear(p + "attn.c_proj", _attention(q, k, v, scale), conv1d=True)
        x = ln(h, p + "ln_2")
        h = h + src.linear(p + "mlp.c_proj", acts[act](src.linear(p + "mlp.c_fc", x, conv1d=True)), conv1d=True)
    h = ln(h, pre + "ln_f")
    head = "lm_head.weight" if src.has("lm_head.weight") else pre + "wte.weight"
    return src.head(head, h)


def logits(config: dict, src: WeightSource, ids: list[int]):
    import torch

    with torch.no_grad():
        if config.get("model_type") == "gpt2":
            return gpt2_logits(config, src, ids)
        return llama_logits(config, src, ids)


def probe_ids(config: dict, length: int = 12) -> list[int]:
    """The fixed verification prompt: BOS (if any) then a fixed spread of token ids."""
    vocab = config.get("vocab_size") or 2
    bos = config.get("bos_token_id")
    ids = [(i * 7919 + 11) % vocab for i in range(length)]
    if isinstance(bos, int) and 0 <= bos < vocab:
        ids[0] = bos
    return ids


def compare(reference, candidate) -> dict:
    """Largest logit difference, relative to the logits' scale."""
    scale = max(float(reference.abs().max()), 1.0)
    err = float((reference - candidate).abs().max())
    return {"max_abs_diff": err, "scale": scale, "rel_diff": err / scale}


TOLERANCE = {"fp32": 1e-5, "bf16": 5e-2, "fp16": 1e-2}


def agreement(result: dict, how: str | None = None) -> str:
    """How closely the logits agreed, for the stages' "verified:" line (identical logits are said so, rather
    than "within 0 of their scale"); ``how`` names the method."""
    if result["max_abs_diff"] == 0:
        return f"exactly (identical logits{'; ' + how if how else ''})"
    notes = [f"tolerance {result['tolerance']}"] if "tolerance" in result else []
    return f"within {result['rel_diff']:.2g} of their scale ({'; '.join(notes + ([how] if how else []))})"


def check_agreement(result: dict, dtype: str, what: str) -> None:
    tol = TOLERANCE[dtype]
    result["tolerance"] = tol
    if not math.isfinite(result["rel_diff"]) or result["rel_diff"] > tol:
        raise SuiteError(f"verification failed: {what}: logits differ by {result['max_abs_diff']:.3g} "
                         f"({result['rel_diff']:.3g} of their scale {result['scale']:.3g}; tolerance {tol} for {dtype}); "
                         "nothing was written")
