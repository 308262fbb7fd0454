"""GGUF files that llama.cpp loads (``quantize.py --method gguf --gguf_type f16|q8_0``), written with the ``gguf``
package (the one llama.cpp's own ``convert_hf_to_gguf.py`` uses), from a Llama-architecture model in memory.

What goes in, as llama.cpp's converter does it for ``LlamaForCausalLM`` / ``MistralForCausalLM``:

* metadata: ``general.architecture`` "llama", ``llama.context_length`` / ``embedding_length`` / ``block_count`` /
  ``feed_forward_length`` / ``attention.head_count`` / ``attention.head_count_kv`` / ``attention.key_length`` /
  ``attention.value_length`` / ``rope.dimension_count`` / ``rope.freq_base`` /
  ``attention.layer_norm_rms_epsilon`` / ``vocab_size`` (plus ``rope.scaling.*`` for linear RoPE scaling),
  ``general.file_type`` (1 = mostly F16, 7 = mostly Q8_0) and ``general.quantization_version``;
* the vocabulary as llama.cpp's SentencePiece tokenizer ("llama") reads it: every piece, its score and its type
  (normal / unknown / control / user-defined / unused / byte), the bos / eos / unk / pad ids, whether BOS / EOS
  are added and whether a space is prepended, and the tokenizer's chat template when it has one. From
  ``tokenizer.model`` when the folder has one (the SentencePiece model itself: exact scores and types); otherwise
  from a SentencePiece-style ``tokenizer.json`` (BPE with a Metaspace pre-tokenizer, as transformers converts
  SentencePiece models — stories260K's folder has only this), whose scores are SentencePiece's own convention
  rebuilt: a normal piece scores ``-k``, k its rank among the normal pieces in id order, which is what
  SentencePiece stores for a BPE model, and which orders llama.cpp's score-driven merges as the file's merge
  list does (checked: the merges must come in vocabulary order). A GPT-2-style byte-level BPE (Llama 3) or a
  WordPiece / Unigram ``tokenizer.json`` is refused as not supported yet;
* the tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_norm`` / ``attn_q`` / ``attn_k`` / ``attn_v``
  / ``attn_output`` / ``ffn_norm`` / ``ffn_gate`` / ``ffn_up`` / ``ffn_down``, ``output_norm``, ``output`` — left
  out when the embeddings are tied, llama.cpp then reuses ``token_embd``), with the rows of q and k (weights and
  biases) permuted from Hugging Face's rotate-half RoPE layout back to the interleaved one llama.cpp's "llama"
  RoPE rotates (pairs (2i, 2i+1) of each head): the inverse of what transformers' ``convert_llama_weights_to_hf``
  applies. Norms and biases are F32; every 2-D weight is F16 (``f16``), or Q8_0 (``q8_0``: blocks of 32 weights
  along a row, one fp16 scale each) when its row length is a multiple of 32, and F16 otherwise (stories260K's
  ``ffn_down``, 172 inputs) — each fallback is listed in the report with its reason.

The file is written tensor by tensor (one converted tensor in memory at a time) to ``<out>.tmp`` and renamed,
so an interrupted run never leaves a truncated ``.gguf`` behind. ``read_back_state_dict`` is the way back: the
file's tensors dequantized and permuted back into the model's own names and layout, so a perplexity measured on
it is the file's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from utils.weights.formats import to_interleaved, to_rotate_half

GGUF_TYPES = ("f16", "q8_0")
#: The Hugging Face classes whose layout this writer knows (llama.cpp converts both as "llama").
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ARCH = "llama"
#: SentencePiece's piece types (sentencepiece_model.proto) have the same numbers as GGUF's token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {NORMAL: "normal", UNKNOWN: "unknown", CONTROL: "control", USER_DEFINED: "user-defined",
              UNUSED: "unused", BYTE: "byte"}
#: Scores llama.cpp's converter gives tokens added on top of the SentencePiece model, and padding rows.
ADDED_SCORE = -1000.0
PAD_SCORE = -10000.0
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class GGUFError(ValueError):
    """A GGUF file that cannot be written as asked: named by flag, layer or file."""


@dataclass
class Vocab:
    """A vocabulary as GGUF stores it for llama.cpp's SentencePiece tokenizer."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    source: str  # the file it came from
    add_space_prefix: bool
    padded: int = 0  # [PAD{i}] rows appended to reach the model's vocabulary size
    added: list[str] = field(default_factory=list)  # tokens beyond the base vocabulary (tokenizer's added tokens)


def _require_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise GGUFError(f"--method gguf needs the gguf package ({exc}); pip install -r requirements.txt") from None
    return gguf


# ---------------------------------------------------------------------------------------------------------------
# RoPE layout


def _rows(permute, t: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"{rows} q / k rows cannot be split into {n_head} heads of (real, imaginary) halves")
    matrix = t.reshape(rows, -1).contiguous()  # a bias is one column
    return permute(matrix, n_head).reshape(t.shape)


def _to_interleaved(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """q / k rows (weight [heads * head_dim, in] or bias [heads * head_dim]) from Hugging Face's rotate-half
    layout, where a head's rotated pair is (i, i + head_dim / 2), to the interleaved one llama.cpp's "llama" RoPE
    uses, (2i, 2i + 1) — Meta's, so ``utils.weights.formats``' permutation. ``n_head``: this projection's heads
    (the key / value heads for k)."""
    return _rows(to_interleaved, t, n_head)


def _to_rotate_half(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``_to_interleaved``."""
    return _rows(to_rotate_half, t, n_head)


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary


def sentencepiece_vocab(model_file: str | Path) -> Vocab:
    """Pieces, scores and types of a SentencePiece ``tokenizer.model``, read from its protobuf (the processor API
    cannot tell a user-defined piece from a normal one).

    Raises:
        GGUFError: the file does not parse, or protobuf is missing.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:
        raise GGUFError(f"{model_file}: reading a SentencePiece model needs sentencepiece and protobuf ({exc})") \
            from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise GGUFError(f"{model_file}: not a SentencePiece model ({type(exc).__name__}: {exc})") from None
    if not proto.pieces:
        raise GGUFError(f"{model_file}: a SentencePiece model without pieces")
    return Vocab(tokens=[p.piece for p in proto.pieces], scores=[float(p.score) for p in proto.pieces],
                 types=[int(p.type) for p in proto.pieces], source=str(model_file),
                 add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix))


def _metaspace(tok: dict) -> dict | None:
    """The Metaspace pre-tokenizer of a tokenizer.json (alone or inside a Sequence), if any."""
    pre = tok.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if (step or {}).get("type") == "Metaspace":
            return step
    return None


def _space_prefix(tok: dict, path: Path) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends "▁" to the text, or GGUFError when it is not one."""
    meta = _metaspace(tok)
    if meta is not None:
        if "prepend_scheme" in meta:
            return meta["prepend_scheme"] != "never"
        return bool(meta.get("add_prefix_space", True))
    # transformers' older Llama conversion: no pre-tokenizer, the normalizer prepends and replaces the spaces.
    norm = tok.get("normalizer") or {}
    steps = norm.get("normalizers", [norm])
    replaces = any(s.get("type") == "Replace" and s.get("content") == "▁" for s in steps if s)
    if replaces:
        return any(s.get("type") == "Prepend" for s in steps if s)
    pre = tok.get("pre_tokenizer") or {}
    kind = "byte-level (GPT-2 / Llama 3 style)" if "ByteLevel" in json.dumps(pre) else "non-SentencePiece"
    raise GGUFError(f"{path}: a {kind} BPE vocabulary is not supported yet; --method gguf writes "
                    "SentencePiece-style vocabularies (a tokenizer.model, or a tokenizer.json with a Metaspace "
                    "pre-tokenizer)")


def tokenizer_json_vocab(path: str | Path, unk_token: str | None = None) -> Vocab:
    """The SentencePiece vocabulary behind a SentencePiece-style BPE ``tokenizer.json``: pieces in id order;
    types byte (``<0xNN>`` pieces), unknown (the unk token), control (special added tokens), user-defined (other
    added tokens) or normal; scores as SentencePiece stores them for a BPE model (normal piece of rank k in id
    order: -k; others 0).

    Args:
        path: the tokenizer.json.
        unk_token: the tokenizer's unk token, when the file's BPE model names none (with byte fallback,
            transformers leaves ``model.unk_token`` null and keeps ``<unk>`` only as a special added token).

    Raises:
        GGUFError: not a BPE model, not SentencePiece-style, ids with gaps, or merges out of vocabulary order
            (then the scores cannot be rebuilt).
    """
    path = Path(path)
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise GGUFError(f"{path}: cannot read it ({exc})") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFError(f"{path}: a {model.get('type')!r} tokenizer.json vocabulary is not supported yet; "
                        "--method gguf writes SentencePiece-style BPE vocabularies (or a tokenizer.model)")
    add_space_prefix = _space_prefix(tok, path)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    # Added tokens inside the model's vocabulary (<unk>, <s>, </s>) change only their type here; those beyond it
    # are gguf_vocab's, as for a tokenizer.model.
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id = {i: piece for piece, i in vocab.items()}
    if not by_id:
        raise GGUFError(f"{path}: its BPE model has an empty vocabulary")
    for i, a in added.items():  # a special token some files keep only among the added ones, inside the range
        if i not in by_id and i < max(by_id):
            by_id[i] = a["content"]
    if sorted(by_id) != list(range(len(by_id))):
        missing = sorted(set(range(max(by_id) + 1)) - set(by_id))
        raise GGUFError(f"{path}: token ids are not contiguous (first missing id {missing[0]})")
    # A merge is "a b" (older files; SentencePiece pieces hold "▁", never a space) or ["a", "b"].
    merged = [vocab.get("".join(m.split(" ") if isinstance(m, str) else m)) for m in model.get("merges") or []]
    if None in merged:
        bad = (model.get("merges") or [])[merged.index(None)]
        raise GGUFError(f"{path}: merge {bad!r} makes a piece that is not in the vocabulary")
    if any(b < a for a, b in zip(merged, merged[1:])):
        raise GGUFError(f"{path}: its merges are not in vocabulary order (not a converted SentencePiece model), "
                        "so llama.cpp's piece scores cannot be rebuilt; this vocabulary is not supported yet — "
                        "put the SentencePiece tokenizer.model beside it")
    unk = model.get("unk_token") or unk_token
    tokens, scores, types = [], [], []
    rank = 0
    for i in range(len(by_id)):
        piece = by_id[i]
        if i in added:
            kind = UNKNOWN if piece == unk else CONTROL if added[i].get("special") else USER_DEFINED
        elif piece == unk:
            kind = UNKNOWN
        elif _BYTE_PIECE.fullmatch(piece):
            kind = BYTE
        else:
            kind = NORMAL
        tokens.append(piece)
        types.append(kind)
        scores.append(-float(rank) if kind == NORMAL else 0.0)
        rank += kind == NORMAL
    return Vocab(tokens=tokens, scores=scores, types=types, source=str(path), add_space_prefix=add_space_prefix)


def _load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        raise GGUFError(f"{tokenizer_dir}: the tokenizer does not load ({type(exc).__name__}: {exc})") from None


def _check_against(vocab: Vocab, tokenizer, what: str) -> None:
    """The base vocabulary must be the one the Hugging Face tokenizer uses (a stale tokenizer.model would write a
    file that tokenizes differently from the model it was trained with)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(vocab.tokens), len(tokenizer)))))
    for i, (ours, theirs) in enumerate(zip(vocab.tokens, pieces)):
        if theirs is not None and ours != theirs:
            raise GGUFError(f"{what}: token {i} is {ours!r} but the tokenizer has {theirs!r}; the file does not "
                            "belong to this tokenizer")


def gguf_vocab(tokenizer_dir: str | Path, vocab_size: int, tokenizer: Any = None) -> Vocab:
    """The vocabulary a GGUF file for a model with ``vocab_size`` embedding rows carries: the base vocabulary
    (``tokenizer.model`` if present, else ``tokenizer.json``), the tokenizer's added tokens beyond it (control if
    special, else user-defined with "▁" written as a space, score -1000, as llama.cpp's converter does), then
    ``[PAD{i}]`` unused rows up to ``vocab_size``.

    Args:
        tokenizer_dir: the tokenizer folder (as ``save_pretrained`` writes it).
        vocab_size: the model's embedding rows.
        tokenizer: the folder's Hugging Face tokenizer, when already loaded.

    Raises:
        GGUFError: no usable vocabulary file, one that disagrees with the tokenizer, or more tokens than rows.
    """
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(tokenizer_dir)
    sp_file, json_file = tokenizer_dir / "tokenizer.model", tokenizer_dir / "tokenizer.json"
    if sp_file.is_file():
        vocab = sentencepiece_vocab(sp_file)
    elif json_file.is_file():
        vocab = tokenizer_json_vocab(json_file, getattr(tokenizer, "unk_token", None))
    else:
        raise GGUFError(f"{tokenizer_dir}: neither tokenizer.model (SentencePiece) nor tokenizer.json is there")
    _check_against(vocab, tokenizer, vocab.source)
    for i, token in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()):
        if i < len(vocab.tokens):
            continue
        if i != len(vocab.tokens):
            raise GGUFError(f"{tokenizer_dir}: added token {token.content!r} has id {i}, leaving a gap after "
                            f"{len(vocab.tokens) - 1}")
        special = token.special
        vocab.tokens.append(token.content if special else token.content.replace("▁", " "))
        vocab.scores.append(ADDED_SCORE)
        vocab.types.append(CONTROL if special else USER_DEFINED)
        vocab.added.append(token.content)
    if len(vocab.tokens) > vocab_size:
        raise GGUFError(f"{tokenizer_dir}: the tokenizer has {len(vocab.tokens)} tokens but the model's embedding "
                        f"only {vocab_size} rows")
    vocab.padded = vocab_size - len(vocab.tokens)
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.scores.append(PAD_SCORE)
        vocab.types.append(UNUSED)
    return vocab


def _special_tokens(tokenizer) -> dict[str, Any]:
    """bos / eos / unk / pad ids and whether BOS / EOS are added, read from what the tokenizer does to a text."""
    ids = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    probe = tokenizer("a")["input_ids"]
    return {"ids": {k: v for k, v in ids.items() if v is not None},
            "add_bos": bool(probe) and ids["bos"] is not None and probe[0] == ids["bos"],
            "add_eos": bool(probe) and ids["eos"] is not None and probe[-1] == ids["eos"]}


# ---------------------------------------------------------------------------------------------------------------
# Model


@dataclass
class _Planned:
    name: str  # llama.cpp's
    source: str  # the model's parameter
    data: Any  # () -> float32 CPU tensor in llama.cpp's layout
    shape: tuple[int, ...]
    qtype: str  # "F32" / "F16" / "Q8_0"
    fallback: str | None = None


def _architecture(model) -> str:
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise GGUFError(f"--method gguf: {arch} is not supported (only {', '.join(ARCHITECTURES)}, which "
                        "llama.cpp loads as 'llama')")
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        raise GGUFError(f"--method gguf: {arch} with hidden_act {act!r}; llama.cpp's llama uses SiLU")
    return arch


def _rope(config) -> tuple[float, dict]:
    """(rope theta, extra rope metadata) or GGUFError for a scaling llama.cpp's llama cannot express here."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, {}
    if kind == "linear":
        return theta, {"linear": float(params["factor"])}
    raise GGUFError(f"--method gguf: RoPE scaling {kind!r} is not supported yet (only none or linear)")


def _weight(module, what: str) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.device.type == "meta":
        raise GGUFError(f"{what}: needs a floating-point weight in memory, found {type(module).__name__} with "
                        f"{type(w).__name__ if w is None else w.dtype}; GGUF is written from the floating-point "
                        "(merged, dequantized) model")
    return w


def _fp32(t: torch.Tensor):
    return lambda: t.detach().to("cpu", torch.float32)


def _plan(model, gguf_type: str, gguf) -> tuple[list[_Planned], bool]:
    """Every tensor of the file, in llama.cpp's order, and whether the output head is tied."""
    cfg = model.config
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]  # 32 weights (and one fp16 scale)
    out: list[_Planned] = []

    def add(key, bid, suffix, tensor, source, transform=None):
        name = names[key].format(bid=bid) + suffix
        base = _fp32(tensor)
        data = base if transform is None else (lambda: transform(base()))
        shape = tuple(tensor.shape)
        if len(shape) == 1:
            out.append(_Planned(name, source, data, shape, "F32"))
        elif gguf_type == "f16":
            out.append(_Planned(name, source, data, shape, "F16"))
        elif shape[-1] % block == 0:
            out.append(_Planned(name, source, data, shape, "Q8_0"))
        else:
            out.append(_Planned(name, source, data, shape, "F16",
                                f"row length {shape[-1]} is not a multiple of Q8_0's block of {block} weights"))

    def linear(key, bid, module, source, transform=None):
        add(key, bid, ".weight", _weight(module, source), source + ".weight", transform)
        if getattr(module, "bias", None) is not None:
            add(key, bid, ".bias", module.bias, source + ".bias", transform)

    inner = model.model
    add(T.TOKEN_EMBD, None, ".weight", _weight(inner.embed_tokens, "model.embed_tokens"),
        "model.embed_tokens.weight")
    for b, layer in enumerate(inner.layers):
        p = f"model.layers.{b}"
        att, mlp = layer.self_attn, layer.mlp
        add(T.ATTN_NORM, b, ".weight", layer.input_layernorm.weight, f"{p}.input_layernorm.weight")
        linear(T.ATTN_Q, b, att.q_proj, f"{p}.self_attn.q_proj", lambda w: _to_interleaved(w, n_head))
        linear(T.ATTN_K, b, att.k_proj, f"{p}.self_attn.k_proj", lambda w: _to_interleaved(w, n_kv))
        linear(T.ATTN_V, b, att.v_proj, f"{p}.self_attn.v_proj")
        linear(T.ATTN_OUT, b, att.o_proj, f"{p}.self_attn.o_proj")
        add(T.FFN_NORM, b, ".weight", layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm.weight")
        linear(T.FFN_GATE, b, mlp.gate_proj, f"{p}.mlp.gate_proj")
        linear(T.FFN_UP, b, mlp.up_proj, f"{p}.mlp.up_proj")
        linear(T.FFN_DOWN, b, mlp.down_proj, f"{p}.mlp.down_proj")
    add(T.OUTPUT_NORM, None, ".weight", inner.norm.weight, "model.norm.weight")
    head = model.get_output_embeddings()
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) or (
        head is not None and head.weight is inner.embed_tokens.weight)
    if not tied:
        linear(T.OUTPUT, None, head, "lm_head")
    return out, tied


def _metadata(writer, model, gguf, gguf_type: str, name: str, vocab: Vocab, special: dict, chat_template) -> None:
    cfg = model.config
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    theta, rope_extra = _rope(cfg)
    ftype = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_type("model")
    writer.add_name(name)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or n_head))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(theta)
    if "linear" in rope_extra:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_extra["linear"])
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    for kind, i in special["ids"].items():
        getattr(writer, f"add_{kind}_token_id")(int(i))
    writer.add_add_bos_token(special["add_bos"])
    writer.add_add_eos_token(special["add_eos"])
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if isinstance(chat_template, str) and chat_template:
        writer.add_chat_template(chat_template)


def _nbytes(p: _Planned, gguf) -> tuple[tuple[int, ...], Any, int]:
    """(the shape add_tensor_info takes, its numpy dtype, the bytes written) without converting anything."""
    import numpy as np

    numel = 1
    for d in p.shape:
        numel *= d
    if p.qtype == "F32":
        return p.shape, np.float32, 4 * numel
    if p.qtype == "F16":
        return p.shape, np.float16, 2 * numel
    byte_shape = gguf.quant_shape_to_byte_shape(p.shape, gguf.GGMLQuantizationType.Q8_0)
    rows = numel // p.shape[-1]
    return byte_shape, np.uint8, rows * byte_shape[-1]


def _convert(p: _Planned, gguf):
    import numpy as np

    data = p.data().numpy()
    if not np.isfinite(data).all():
        raise GGUFError(f"{p.source}: NaN or inf weights cannot be written to GGUF")
    if p.qtype == "F32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if p.qtype == "F16":
        return np.ascontiguousarray(data.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType.Q8_0)


def write_gguf(model, tokenizer_dir: str | Path, out_path: str | Path, gguf_type: str = "q8_0", *,
               name: str | None = None, progress: bool = False) -> dict:
    """Write ``model`` (a Llama-architecture causal LM in memory, floating point) and its tokenizer as one GGUF
    file llama.cpp loads.

    Args:
        model: a ``LlamaForCausalLM`` or ``MistralForCausalLM`` (merged: no adapter, no quantized layers).
        tokenizer_dir: its tokenizer folder (``tokenizer.model`` and / or ``tokenizer.json`` + config).
        out_path: the ``.gguf`` file to write (its folder is created; an existing file is replaced).
        gguf_type: "f16" (every 2-D weight F16) or "q8_0" (Q8_0 where rows are whole 32-blocks, else F16).
        name: ``general.name`` (default: the file's stem).
        progress: a tqdm bar over the tensors.

    Returns:
        The report: ``gguf_type``, ``file_type`` (llama.cpp's number), ``layers_quantized`` (2-D weights,
        embedding and head included, stored as ``gguf_type`` asks) and ``layers_kept`` (those left F16 under
        q8_0), ``bits_per_weight`` (every byte of the 2-D weights, Q8_0's block scales included, per weight: 16
        for f16, 8.5 for an all-Q8_0 file), ``gguf_package`` (version), ``tensors``
        (per tensor, in file order: ``name``, ``source`` (the model's parameter), ``type`` ("F32" / "F16" /
        "Q8_0"), ``shape`` ([rows, row length], the model's orientation)), ``fallbacks`` (tensors kept F16 under
        q8_0: ``name``, ``type``, ``shape``, ``reason``), ``tied_output``, ``vocab`` (``source``, ``size``,
        ``padded``, ``added``, ``types`` (count per type), ``special`` ids, ``add_bos`` / ``add_eos`` /
        ``add_space_prefix``, ``chat_template`` (bool)), ``notes`` and ``size_on_disk_bytes``.

    Raises:
        GGUFError: an unknown gguf_type, an unsupported architecture / RoPE scaling / vocabulary, a layer that is
            not floating point, NaN / inf weights, or a tokenizer that does not fit the model.
    """
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"--gguf_type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    gguf = _require_gguf()
    arch = _architecture(model)
    _rope(model.config)  # refuse an unsupported scaling before any work
    out_path = Path(out_path)
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = _load_tokenizer(tokenizer_dir)
    vocab_rows = int(model.get_input_embeddings().weight.shape[0])
    vocab = gguf_vocab(tokenizer_dir, vocab_rows, tokenizer)
    special = _special_tokens(tokenizer)
    chat_template = getattr(tokenizer, "chat_template", None)
    planned, tied = _plan(model, gguf_type, gguf)

    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    _metadata(writer, model, gguf, gguf_type, name or out_path.stem, vocab, special, chat_template)
    for p in planned:
        shape, dtype, nbytes = _nbytes(p, gguf)
        raw = gguf.GGMLQuantizationType.Q8_0 if p.qtype == "Q8_0" else None
        writer.add_tensor_info(p.name, shape, dtype, nbytes, raw_dtype=raw)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        steps = planned
        if progress:
            from tqdm import tqdm

            steps = tqdm(planned, desc=f"GGUF {gguf_type}", unit="tensor")
        for p in steps:
            writer.write_tensor_data(_convert(p, gguf))  # one converted tensor in memory at a time
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise

    from importlib.metadata import version

    counts: dict[str, int] = {}
    for t in vocab.types:
        counts[TYPE_NAMES.get(t, str(t))] = counts.get(TYPE_NAMES.get(t, str(t)), 0) + 1
    notes = []
    window = getattr(model.config, "sliding_window", None)
    if arch == "MistralForCausalLM" and window and window < model.config.max_position_embeddings:
        notes.append(f"sliding_window {window} is not stored: llama.cpp's llama architecture attends over the "
                     "whole context (as its own converter writes Mistral)")
    matrices = [p for p in planned if len(p.shape) == 2]
    matrix_bytes = sum(_nbytes(p, gguf)[2] for p in matrices)
    matrix_weights = sum(p.shape[0] * p.shape[1] for p in matrices)
    return {
        "gguf_type": gguf_type,
        "file_type": 1 if gguf_type == "f16" else 7,
        "layers_quantized": sum(p.fallback is None for p in matrices),
        "layers_kept": sum(p.fallback is not None for p in matrices),
        "bits_per_weight": 8 * matrix_bytes / matrix_weights,
        "gguf_package": version("gguf"),
        "tensors": [{"name": p.name, "source": p.source, "type": p.qtype, "shape": list(p.shape)} for p in planned],
        "fallbacks": [{"name": p.name, "type": p.qtype, "shape": list(p.shape), "reason": p.fallback}
                      for p in planned if p.fallback],
        "tied_output": tied,
        "vocab": {"source": Path(vocab.source).name, "size": len(vocab.tokens), "padded": vocab.padded,
                  "added": vocab.added, "types": counts, "special": special["ids"], "add_bos": special["add_bos"],
                  "add_eos": special["add_eos"], "add_space_prefix": vocab.add_space_prefix,
                  "chat_template": isinstance(chat_template, str) and bool(chat_template)},
        "notes": notes,
        "size_on_disk_bytes": out_path.stat().st_size,
    }


# ---------------------------------------------------------------------------------------------------------------
# Reading back


def read_gguf_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized to float32, in numpy / torch orientation ([rows, row length]) and
    llama.cpp's own layout (q / k interleaved)."""
    gguf = _require_gguf()
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (the row length) first
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return out


def read_back_state_dict(path: str | Path, model) -> dict[str, torch.Tensor]:
    """The file's tensors as ``model``'s own parameters (names, rotate-half q / k rows, dtype): what llama.cpp
    computes with, for ``model.load_state_dict(..., strict=False)`` (an absent ``lm_head`` is the tied
    embedding).

    Raises:
        GGUFError: a tensor of the model the file lacks, or one whose shape differs.
    """
    tensors = read_gguf_tensors(path)
    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    gguf = _require_gguf()
    planned, tied = _plan(model, "f16", gguf)
    own = model.state_dict()
    out = {}
    for p in planned:
        if p.name not in tensors:
            raise GGUFError(f"{path}: no tensor {p.name} (for {p.source})")
        t = tensors[p.name]
        if tuple(t.shape) != p.shape:
            raise GGUFError(f"{path}: {p.name} is {list(t.shape)}, {p.source} is {list(p.shape)}")
        if ".self_attn.q_proj." in p.source:
            t = _to_rotate_half(t, n_head)
        elif ".self_attn.k_proj." in p.source:
            t = _to_rotate_half(t, n_kv)
        out[p.source] = t.to(own[p.source].dtype)
    return out
