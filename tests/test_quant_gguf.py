"""GGUF files for llama.cpp (utils/quant/gguf.py), read back with the gguf package's own reader.

The checks do not trust the writer's helpers: metadata is compared with the model's config, the vocabulary with
the SentencePiece processor's own answers (``tok512.model``, the model stories260K's ``tokenizer.json`` was
converted from), and the tensors by an independent forward pass written here — llama.cpp's "llama" graph in a
few lines of torch, with its interleaved RoPE (pairs (2i, 2i + 1)) applied to q / k exactly as the file stores
them — whose logits must equal the Hugging Face model's. A writer that skipped (or botched) the permutation from
rotate-half to interleaved fails that check (``test_a_wrong_permutation_fails_the_forward_check``). When
llama-cpp-python is installed, llama.cpp itself loads both files and continues "Once upon a time" greedily.
"""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
import torch

from conftest import STORIES

import gguf  # noqa: E402 - pinned in requirements.txt: a broken install fails, not skips

from utils.quant import gguf as G  # noqa: E402

TOK512 = STORIES.parent / "tok512.model"
PROMPT = "Once upon a time"
# Max |logit error| / max |logit| of the file's forward, measured. Against the fp32 model (the check of the
# permutation): stories260K f16 5e-4, q8_0 9.7e-3; the tiny random models (weights of std 0.2, which amplify any
# error) f16 1.9e-3, q8_0 5.1e-2; without the permutation 0.62 (stories260K), 1.06 / 1.19 (tiny llama /
# mistral). Against the HF model holding read_back_state_dict's weights (the check that the way back is what
# the file computes — blind to the permutation, which it undoes): 2e-7 to 8e-7 for every model and type.
SAME_WEIGHTS_TOLERANCE = 2e-5
FORWARD_TOLERANCE = {"f16": 1e-2, "q8_0": 0.15}
WRONG_PERMUTATION_AT_LEAST = 0.3


# ----------------------------------------------------------------------------------------------------- helpers


def field(reader, key):
    f = reader.fields.get(key)
    assert f is not None, f"no {key} in the file"
    return f.contents()


def sp_expected(model_file):
    """(pieces, scores, types) as the SentencePiece processor answers them (types: GGUF's numbers)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    scores = [sp.GetScore(i) for i in range(sp.vocab_size())]
    types = [G.UNKNOWN if sp.IsUnknown(i) else G.CONTROL if sp.IsControl(i) else G.BYTE if sp.IsByte(i)
             else G.UNUSED if sp.IsUnused(i) else G.NORMAL for i in range(sp.vocab_size())]
    return pieces, scores, types


def file_forward(path, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of llama.cpp's llama graph, computed in fp32 from the GGUF file alone (its metadata and
    its dequantized tensors, q / k in the file's interleaved layout)."""
    reader = gguf.GGUFReader(str(path))
    arch = field(reader, "general.architecture")
    meta = {k: field(reader, f"{arch}.{k}") for k in (
        "block_count", "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
        "rope.freq_base", "attention.layer_norm_rms_epsilon")}
    t = {x.name: torch.from_numpy(gguf.quants.dequantize(x.data, x.tensor_type).copy()).reshape(
        [int(d) for d in reversed(x.shape.tolist())]) for x in reader.tensors}
    n_head, n_kv = meta["attention.head_count"], meta["attention.head_count_kv"]
    hd, eps = meta["rope.dimension_count"], meta["attention.layer_norm_rms_epsilon"]
    T = len(ids)
    freqs = meta["rope.freq_base"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]
    cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]

    def rope(x):  # [T, heads, hd]: rotate the pairs (2i, 2i + 1) by position * freq_i
        a, b = x.reshape(T, x.shape[1], hd // 2, 2).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(x.shape)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def lin(x, name):
        y = x @ t[f"{name}.weight"].T
        return y + t[f"{name}.bias"] if f"{name}.bias" in t else y

    x = t["token_embd.weight"][torch.tensor(ids)]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for b in range(meta["block_count"]):
        p = f"blk.{b}"
        h = norm(x, t[f"{p}.attn_norm.weight"])
        q = rope(lin(h, f"{p}.attn_q").reshape(T, n_head, hd))
        k = rope(lin(h, f"{p}.attn_k").reshape(T, n_kv, hd)).repeat_interleave(n_head // n_kv, dim=1)
        v = lin(h, f"{p}.attn_v").reshape(T, n_kv, hd).repeat_interleave(n_head // n_kv, dim=1)
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask, dim=-1)
        x = x + lin(torch.einsum("hts,shd->thd", att, v).reshape(T, n_head * hd), f"{p}.attn_output")
        h = norm(x, t[f"{p}.ffn_norm.weight"])
        x = x + lin(torch.nn.functional.silu(lin(h, f"{p}.ffn_gate")) * lin(h, f"{p}.ffn_up"), f"{p}.ffn_down")
    x = norm(x, t["output_norm.weight"])
    return x @ t.get("output.weight", t["token_embd.weight"]).T


def with_file_weights(path, model):
    """A copy of ``model`` holding the file's tensors (dequantized, permuted back by read_back_state_dict)."""
    import copy

    out = copy.deepcopy(model)
    out.load_state_dict(G.read_back_state_dict(path, model), strict=False)
    return out


def relative_error(path, model, ids) -> float:
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float()
        got = file_forward(path, ids)
    return float((got - want).abs().max() / want.abs().max())


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def stories_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES))


@pytest.fixture(scope="module")
def sp_tokenizer_dir(tmp_path_factory):
    """stories260K's tokenizer folder with its SentencePiece model beside it, as tokenizer.model."""
    out = tmp_path_factory.mktemp("stories_sp")
    for f in STORIES.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    shutil.copy(TOK512, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def stories_files(stories, tmp_path_factory):
    """{gguf_type: (path, report)} for stories260K, vocabulary from its tokenizer.json."""
    out = tmp_path_factory.mktemp("stories_gguf")
    return {t: (out / f"s-{t}.gguf", G.write_gguf(stories, STORIES, out / f"s-{t}.gguf", t))
            for t in G.GGUF_TYPES}


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """stories260K's tokenizer plus a special pad token, a special <|im_end|> and a plain <tool> token (ids 512,
    513, 514) and a chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<|im_end|>"]})
    tok.add_tokens(["<tool>"])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    out = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(str(out))
    return out


def tiny(arch: str = "llama", **overrides):
    """A 2-layer model with 520 embedding rows (6 beyond the chat tokenizer), grouped-query attention, biases on
    the attention projections (randomised: HF initialises them to zero), untied head, theta 500000."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=520, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
              initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
              bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        kw.update(attention_bias=True)
        model = LlamaForCausalLM(LlamaConfig(**{**kw, **overrides}))
    else:
        model = MistralForCausalLM(MistralConfig(**{**kw, "sliding_window": None, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("gguf_type", G.GGUF_TYPES)
def test_stories_metadata(stories_files, stories, gguf_type):
    path, report = stories_files[gguf_type]
    r = gguf.GGUFReader(str(path))
    cfg = stories.config
    assert field(r, "general.architecture") == "llama"
    assert field(r, "general.name") == f"s-{gguf_type}"
    assert field(r, "general.file_type") == {"f16": 1, "q8_0": 7}[gguf_type] == report["file_type"]
    assert field(r, "general.quantization_version") == 2
    expected = {"context_length": 512, "embedding_length": 64, "block_count": 5, "feed_forward_length": 172,
                "attention.head_count": 8, "attention.head_count_kv": 4, "rope.dimension_count": 8,
                "vocab_size": 512, "attention.key_length": 8, "attention.value_length": 8}
    for key, value in expected.items():
        assert field(r, f"llama.{key}") == value, key
    assert field(r, "llama.rope.freq_base") == cfg.rope_parameters["rope_theta"] == 10000.0
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "tokenizer.ggml.model") == "llama"
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id"),
            field(r, "tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    assert "tokenizer.ggml.padding_token_id" not in r.fields  # stories260K has no pad token
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.ggml.add_eos_token") is False
    assert field(r, "tokenizer.ggml.add_space_prefix") is True
    assert "tokenizer.chat_template" not in r.fields


def test_tiny_metadata_added_tokens_padding_and_chat_template(chat_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    model = tiny()
    report = G.write_gguf(model, chat_tokenizer_dir, tmp_path / "t.gguf", "f16", name="tiny")
    r = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    assert field(r, "general.name") == "tiny"
    assert field(r, "llama.rope.freq_base") == 500000.0
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert (field(r, "llama.block_count"), field(r, "llama.feed_forward_length"), field(r, "llama.vocab_size"),
            field(r, "llama.attention.head_count"), field(r, "llama.attention.head_count_kv"),
            field(r, "llama.rope.dimension_count")) == (2, 128, 520, 4, 2, 16)
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))
    pad, im_end, tool = tok.convert_tokens_to_ids(["<pad>", "<|im_end|>", "<tool>"])
    assert sorted([pad, im_end, tool]) == [512, 513, 514]
    assert field(r, "tokenizer.ggml.padding_token_id") == pad
    tokens, types, scores = (field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type"),
                             field(r, "tokenizer.ggml.scores"))
    assert len(tokens) == len(types) == len(scores) == 520
    assert (tokens[pad], types[pad], scores[pad]) == ("<pad>", G.CONTROL, G.ADDED_SCORE)
    assert (tokens[im_end], types[im_end]) == ("<|im_end|>", G.CONTROL)
    assert (tokens[tool], types[tool]) == ("<tool>", G.USER_DEFINED)
    assert tokens[515:] == [f"[PAD{i}]" for i in range(515, 520)] and set(types[515:]) == {G.UNUSED}
    assert field(r, "tokenizer.chat_template") == tok.chat_template
    assert report["vocab"]["padded"] == 5 and report["vocab"]["added"] == ["<pad>", "<|im_end|>", "<tool>"]
    assert report["vocab"]["chat_template"] is True and report["tied_output"] is False


# -------------------------------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("source", ["tokenizer.json", "tokenizer.model"])
def test_vocabulary_equals_the_sentencepiece_model(stories, stories_files, sp_tokenizer_dir, tmp_path, source):
    """Both routes give SentencePiece's own pieces, scores and types: tok512.model read directly, and the
    tokenizer.json transformers converted from it (scores rebuilt from the vocabulary order)."""
    if source == "tokenizer.json":
        path, report = stories_files["f16"]
    else:
        path = tmp_path / "sp.gguf"
        report = G.write_gguf(stories, sp_tokenizer_dir, path, "f16")
    assert report["vocab"]["source"] == source
    r = gguf.GGUFReader(str(path))
    pieces, scores, types = sp_expected(TOK512)
    assert field(r, "tokenizer.ggml.tokens") == pieces
    assert field(r, "tokenizer.ggml.scores") == pytest.approx(scores, abs=0)
    assert field(r, "tokenizer.ggml.token_type") == types
    assert report["vocab"]["types"] == {"unknown": 1, "control": 2, "byte": 256, "normal": 253}


def test_sentencepiece_user_defined_and_control_pieces(tmp_path):
    """A SentencePiece model trained here with a user-defined symbol: its type comes from the protobuf (the
    processor API has no IsUserDefined), every other piece agrees with the processor."""
    import sentencepiece as spm

    text = ["the cat sat on the mat <tool> and the dog ran", "a bird sang <tool> in the tree"] * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, user_defined_symbols=["<tool>"],
                                   control_symbols=["<ctl>"], minloglevel=2)
    (tmp_path / "m.model").write_bytes(buf.getvalue())
    vocab = G.sentencepiece_vocab(tmp_path / "m.model")
    pieces, scores, types = sp_expected(tmp_path / "m.model")
    tool = pieces.index("<tool>")
    assert vocab.types[tool] == G.USER_DEFINED and types[tool] == G.NORMAL  # the processor cannot tell
    types[tool] = G.USER_DEFINED
    assert (vocab.tokens, vocab.scores, vocab.types) == (pieces, pytest.approx(scores, abs=0), types)
    assert vocab.types[pieces.index("<ctl>")] == G.CONTROL and vocab.add_space_prefix is True


def _write_json(tmp_path, tok: dict):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tok), encoding="utf-8")
    return path


def _sp_style(merges, vocab=None):
    vocab = vocab or {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5}
    return {"model": {"type": "BPE", "vocab": vocab, "merges": merges, "unk_token": "<unk>"},
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"},
            "added_tokens": [{"id": 0, "content": "<unk>", "special": True}]}


def test_tokenizer_json_scores_and_refusals(tmp_path):
    vocab = G.tokenizer_json_vocab(_write_json(tmp_path, _sp_style([["a", "b"], ["ab", "c"]])))
    assert vocab.tokens == ["<unk>", "a", "b", "c", "ab", "abc"]
    assert vocab.types == [G.UNKNOWN] + [G.NORMAL] * 5
    assert vocab.scores == [0.0, 0.0, -1.0, -2.0, -3.0, -4.0]
    assert vocab.add_space_prefix is False  # prepend_scheme "never"
    # <unk> kept only among the added tokens (not in the model's vocabulary) still takes its id
    no_unk = _sp_style([["a", "b"], ["ab", "c"]])
    del no_unk["model"]["vocab"]["<unk>"]
    assert G.tokenizer_json_vocab(_write_json(tmp_path, no_unk)).tokens == vocab.tokens
    # the old "a b" merge spelling reads the same
    assert G.tokenizer_json_vocab(_write_json(tmp_path, _sp_style(["a b", "ab c"]))).scores == vocab.scores
    with pytest.raises(G.GGUFError, match="not in vocabulary order"):
        G.tokenizer_json_vocab(_write_json(tmp_path, _sp_style([["ab", "c"], ["a", "b"]])))
    with pytest.raises(G.GGUFError, match="not in the vocabulary"):
        G.tokenizer_json_vocab(_write_json(tmp_path, _sp_style([["b", "c"]])))
    byte_level = {**_sp_style([]), "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}
    with pytest.raises(G.GGUFError, match="byte-level .* not supported yet"):
        G.tokenizer_json_vocab(_write_json(tmp_path, byte_level))
    with pytest.raises(G.GGUFError, match="'WordPiece' tokenizer.json vocabulary is not supported yet"):
        G.tokenizer_json_vocab(_write_json(tmp_path, {"model": {"type": "WordPiece", "vocab": {}}}))


def test_byte_level_tokenizer_folder_is_refused_before_writing(bpe_tokenizer_dir, tmp_path):
    model = tiny(vocab_size=800)
    with pytest.raises(G.GGUFError, match="byte-level .* not supported yet"):
        G.write_gguf(model, bpe_tokenizer_dir, tmp_path / "x.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------ tensors


def test_tensor_names_types_and_q8_0_fallbacks(stories_files):
    r = {t: {x.name: x for x in gguf.GGUFReader(str(stories_files[t][0])).tensors} for t in G.GGUF_TYPES}
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{b}.{n}.weight" for b in range(5) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    Q = gguf.GGMLQuantizationType
    for gguf_type, tensors in r.items():
        assert set(tensors) == names  # no output.weight: stories260K ties its head to the embedding
        report = stories_files[gguf_type][1]
        assert [t["name"] for t in report["tensors"]] == list(tensors)  # the report lists the file, in order
        for name, x in tensors.items():
            rows_len = int(x.shape[0])  # GGUF's ne0: the row length
            if name.endswith("norm.weight"):
                want = Q.F32
            elif gguf_type == "f16" or rows_len % 32:
                want = Q.F16
            else:
                want = Q.Q8_0
            assert x.tensor_type == want, name
            listed = next(t for t in report["tensors"] if t["name"] == name)
            assert listed["type"] == want.name and listed["shape"] == [int(d) for d in reversed(x.shape.tolist())]
    assert r["q8_0"]["blk.0.ffn_down.weight"].tensor_type == Q.F16  # 172 inputs
    assert r["q8_0"]["blk.0.ffn_gate.weight"].tensor_type == Q.Q8_0  # 64 inputs, 172 rows
    fallbacks = stories_files["q8_0"][1]["fallbacks"]
    assert [f["name"] for f in fallbacks] == [f"blk.{b}.ffn_down.weight" for b in range(5)]
    assert all(f["shape"] == [64, 172] and "172" in f["reason"] and "32" in f["reason"] for f in fallbacks)
    assert stories_files["f16"][1]["fallbacks"] == []
    # 36 matrices, counted by hand: the embedding (512 x 64) and per block q 64 x 64, k / v 32 x 64, o 64 x 64,
    # gate / up 172 x 64 and down 64 x 172 (the 5 down_proj stay F16 under q8_0). Q8_0: 34 bytes per 32 weights.
    q8 = stories_files["q8_0"][1]
    assert (q8["layers_quantized"], q8["layers_kept"]) == (1 + 5 * 6, 5)
    assert (stories_files["f16"][1]["layers_quantized"], stories_files["f16"][1]["layers_kept"]) == (36, 0)
    per_block = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 172 * 64
    q8_weights, f16_weights = 512 * 64 + 5 * per_block, 5 * 64 * 172
    assert q8["bits_per_weight"] == pytest.approx((8.5 * q8_weights + 16 * f16_weights) / (q8_weights + f16_weights))
    assert stories_files["f16"][1]["bits_per_weight"] == 16
    assert stories_files["q8_0"][0].stat().st_size < 0.7 * stories_files["f16"][0].stat().st_size


@pytest.mark.parametrize("gguf_type", G.GGUF_TYPES)
def test_stories_forward_from_the_file_matches_hf(stories_files, stories, stories_tok, gguf_type):
    ids = stories_tok("Once upon a time, there was a little girl named Lily. She loved to play")["input_ids"]
    path = stories_files[gguf_type][0]
    assert relative_error(path, with_file_weights(path, stories), ids) < SAME_WEIGHTS_TOLERANCE
    assert relative_error(path, stories, ids) < FORWARD_TOLERANCE[gguf_type]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("gguf_type", G.GGUF_TYPES)
def test_tiny_forward_from_the_file_matches_hf(chat_tokenizer_dir, tmp_path, arch, gguf_type):
    """Untied head (output.weight written), q / k biases permuted with their rows, 4 query heads over 2 key /
    value heads, theta 500000: the file's forward equals the model's."""
    model = tiny(arch)
    report = G.write_gguf(model, chat_tokenizer_dir, tmp_path / "t.gguf", gguf_type)
    names = [t["name"] for t in report["tensors"]]
    assert "output.weight" in names and report["fallbacks"] == []
    assert ("blk.0.attn_q.bias" in names) == (arch == "llama")
    ids = [1, 5, 77, 300, 12, 499, 7, 250, 3, 101, 64, 9]
    path = tmp_path / "t.gguf"
    assert relative_error(path, with_file_weights(path, model), ids) < SAME_WEIGHTS_TOLERANCE
    assert relative_error(path, model, ids) < FORWARD_TOLERANCE[gguf_type]


def test_a_wrong_permutation_fails_the_forward_check(chat_tokenizer_dir, stories, stories_tok, tmp_path,
                                                    monkeypatch):
    """The forward check can fail: the same writer without the rotate-half -> interleaved permutation is far off,
    on the tiny model (q and k weights and biases) and on stories260K."""
    ids = [1, 5, 77, 300, 12, 499, 7, 250, 3, 101, 64, 9]
    monkeypatch.setattr(G, "_to_interleaved", lambda w, n_head: w)
    model = tiny()
    G.write_gguf(model, chat_tokenizer_dir, tmp_path / "wrong.gguf", "f16")
    assert relative_error(tmp_path / "wrong.gguf", model, ids) > WRONG_PERMUTATION_AT_LEAST
    G.write_gguf(stories, STORIES, tmp_path / "wrong-s.gguf", "f16")
    story = stories_tok("Once upon a time, there was a little girl named Lily. She loved to play")["input_ids"]
    assert relative_error(tmp_path / "wrong-s.gguf", stories, story) > WRONG_PERMUTATION_AT_LEAST


def test_permutation_round_trip_and_pairs():
    """Hand-checked on one head of dim 8: rotate-half row i pairs with row i + 4; interleaved puts them at 2i,
    2i + 1."""
    w = torch.arange(16.0).reshape(8, 2)  # row r holds (2r, 2r + 1)
    inter = G._to_interleaved(w, 1)
    assert inter[:, 0].tolist() == [0, 8, 2, 10, 4, 12, 6, 14]  # rows 0, 4, 1, 5, 2, 6, 3, 7
    w2 = torch.randn(3 * 2 * 8, 5)  # 2 heads of dim 24 / 2
    assert torch.equal(G._to_rotate_half(G._to_interleaved(w2, 2), 2), w2)
    bias = torch.randn(16)
    assert torch.equal(G._to_interleaved(bias, 2), G._to_interleaved(bias[:, None], 2)[:, 0])
    with pytest.raises(G.GGUFError, match="heads"):
        G._to_interleaved(torch.zeros(10, 3), 2)


@pytest.mark.parametrize("gguf_type", G.GGUF_TYPES)
def test_read_back_state_dict(stories_files, stories, gguf_type):
    """The way back gives the model's own names and layout: F16 / F32 tensors are the weights rounded to fp16 /
    kept exactly, Q8_0 ones within Q8_0's error; loaded into the model, logits stay close."""
    import copy

    path, report = stories_files[gguf_type]
    sd = G.read_back_state_dict(path, stories)
    own = stories.state_dict()
    types = {t["source"]: t["type"] for t in report["tensors"]}
    assert set(sd) == set(types) and "lm_head.weight" not in sd
    for name, t in sd.items():
        w = own[name]
        if types[name] == "F32":
            assert torch.equal(t, w), name
        elif types[name] == "F16":
            assert torch.equal(t, w.half().float()), name
        else:  # Q8_0: per block of 32 along a row, codes of step absmax / 127 (the step itself stored fp16)
            err = (t - w).reshape(-1, 32).abs().amax(1)
            step = w.reshape(-1, 32).abs().amax(1) / 127
            assert bool((err <= 0.5 * step * 1.01 + 127 * step * 2.0 ** -11).all()), name
            assert float(err.max()) > 0, name  # really quantized
    copy_ = copy.deepcopy(stories)
    copy_.load_state_dict(sd, strict=False)
    ids = torch.tensor([[1, 403, 407, 261, 378, 432]])
    with torch.no_grad():
        a, b = stories(ids).logits, copy_(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < FORWARD_TOLERANCE[gguf_type]


# ---------------------------------------------------------------------------------------------------- refusals


def test_refusals(stories, chat_tokenizer_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(G.GGUFError, match="--gguf_type 'q4_0'"):
        G.write_gguf(stories, STORIES, tmp_path / "x.gguf", "q4_0")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512))
    with pytest.raises(G.GGUFError, match="GPT2LMHeadModel is not supported"):
        G.write_gguf(gpt2, STORIES, tmp_path / "x.gguf")
    with pytest.raises(G.GGUFError, match="RoPE scaling 'yarn' is not supported yet"):
        G.write_gguf(tiny(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
                     chat_tokenizer_dir, tmp_path / "x.gguf")
    with pytest.raises(G.GGUFError, match="has 515 tokens but the model's embedding only 300 rows"):
        G.write_gguf(tiny(vocab_size=300), chat_tokenizer_dir, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_nan_weight_leaves_no_file_and_a_stale_tokenizer_model_is_refused(stories, sp_tokenizer_dir, tmp_path):
    import copy

    bad = copy.deepcopy(stories)
    with torch.no_grad():
        bad.model.layers[3].mlp.up_proj.weight[0, 0] = float("nan")
    (tmp_path / "old.gguf").write_bytes(b"previous")
    with pytest.raises(G.GGUFError, match="model.layers.3.mlp.up_proj.weight: NaN or inf"):
        G.write_gguf(bad, STORIES, tmp_path / "old.gguf", "q8_0")
    assert [f.name for f in tmp_path.iterdir()] == ["old.gguf"]  # no .tmp left, the old file untouched
    assert (tmp_path / "old.gguf").read_bytes() == b"previous"

    stale = tmp_path / "stale"
    shutil.copytree(sp_tokenizer_dir, stale)
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["some other text entirely"] * 30), model_writer=buf,
                                   vocab_size=30, model_type="bpe", minloglevel=2)
    (stale / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(G.GGUFError, match="does not belong to this tokenizer"):
        G.write_gguf(stories, stale, tmp_path / "s.gguf")


# ---------------------------------------------------------------------------------------------------- llama.cpp


def _greedy_hf(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("gguf_type", G.GGUF_TYPES)
def test_llama_cpp_greedy_continuation_equals_hf(stories_files, stories, stories_tok, gguf_type):
    """llama.cpp loads the file, tokenizes the prompt as the Hugging Face tokenizer does, and its greedy
    continuation (40 tokens) is the Hugging Face model's."""
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - a broken build raises more than ImportError
        pytest.skip(f"llama-cpp-python is not importable ({type(exc).__name__}: {exc}); it compiles from source "
                    "(about 9 minutes on 2 cores): pip install llama-cpp-python")
    llm = llama_cpp.Llama(model_path=str(stories_files[gguf_type][0]), n_ctx=256, n_threads=2, verbose=False)
    ids = stories_tok(PROMPT)["input_ids"]
    assert llm.tokenize(PROMPT.encode(), add_bos=True) == ids
    # the rebuilt piece scores drive llama.cpp's merges: a longer text with rare characters (byte fallback)
    text = "Lily saw a big, red ball in the park. \"Wow!\" she said. Héllo ™ 你好 ~"
    assert llm.tokenize(text.encode(), add_bos=True) == stories_tok(text)["input_ids"]
    want = _greedy_hf(stories, ids, 40)
    got = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(got) == len(want):
            break
        got.append(token)
    assert stories_tok.decode(got) == stories_tok.decode(want)
    assert got == want
