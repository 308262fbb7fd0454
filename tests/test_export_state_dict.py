"""export_state_dict.py: llama2.c import of the real stories260K checkpoint, Meta consolidated export at several
model-parallel degrees (with an adapter merged first), exact round trips, safe loading, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import EXPORT_SHAPE, STORIES, tiny_model
from test_export import call, export, hf_logits, make_adapter, peft_logits
from utils.errors import SuiteError

LLAMA2C = STORIES.parent / "llama2c_stories260K.bin"


def sd(*argv: str) -> None:
    import export_state_dict

    call(export_state_dict.main, argv)


def tensors(folder: Path) -> dict:
    from utils.weights.shards import ModelWeights

    w = ModelWeights(folder)
    return {n: w.get(n) for n in w.names()}


def test_llama2c_stories260k_imports_to_the_published_hf_model_and_back_byte_for_byte(tmp_path):
    import torch

    hf, back = tmp_path / "hf", tmp_path / "c"
    sd("--base_model", str(LLAMA2C), "--tokenizer", str(STORIES), "--output_dir", str(hf), "--max_shard_size", "300KB")
    assert len(list(hf.glob("model-*.safetensors"))) > 1
    ours, published = tensors(hf), tensors(STORIES)
    assert ours.keys() == published.keys() and all(torch.equal(ours[k], published[k]) for k in ours)
    assert torch.equal(hf_logits(hf), hf_logits(STORIES))
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    assert (hf / "tokenizer.json").is_file()
    sd("--base_model", str(hf), "--output_dir", str(back), "--format", "llama2c")
    assert (back / "model.bin").read_bytes() == LLAMA2C.read_bytes()


@pytest.mark.parametrize("shards", [1, 2])
def test_consolidated_round_trip_is_exact(tmp_path, shards):
    import torch

    out, back = tmp_path / "meta", tmp_path / "hf"
    sd("--base_model", str(STORIES), "--output_dir", str(out), "--num_shards", str(shards))
    params = json.loads((out / "params.json").read_text())
    assert params == {"dim": 64, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 512, "multiple_of": 4,
                      "ffn_dim_multiplier": None, "norm_eps": 1e-5}  # rope_theta 10000: not written (Llama 2 style)
    parts = [torch.load(out / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(shards)]
    assert parts[0]["layers.0.attention.wq.weight"].shape == (64 // shards, 64)  # column-parallel: rows split
    assert parts[0]["layers.0.attention.wk.weight"].shape == (32 // shards, 64)
    assert parts[0]["layers.0.attention.wo.weight"].shape == (64, 64 // shards)  # row-parallel: columns split
    assert parts[0]["tok_embeddings.weight"].shape == (512, 64 // shards)  # ParallelEmbedding: dim split
    assert parts[0]["norm.weight"].shape == (64,) and "rope.freqs" not in parts[0]
    # Meta's interleaved q rows: the inverse of Hugging Face's conversion permutation.
    wq_hf = tensors(STORIES)["model.layers.0.self_attn.q_proj.weight"]
    wq_meta = torch.cat([p["layers.0.attention.wq.weight"] for p in parts])
    assert torch.equal(wq_meta.view(8, 4, 2, 64).transpose(1, 2).reshape(64, 64), wq_hf)
    with pytest.raises(SuiteError, match="--allow_pickle_weights"):
        sd("--base_model", str(out), "--output_dir", str(back))
    sd("--base_model", str(out), "--output_dir", str(back), "--allow_pickle_weights")
    stamp = (back / "pipeline.json").stat().st_mtime_ns
    sd("--base_model", str(out), "--output_dir", str(back), "--allow_pickle_weights")  # same inputs: a no-op
    assert (back / "pipeline.json").stat().st_mtime_ns == stamp
    a, b = tensors(STORIES), tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((back / "config.json").read_text()) == json.loads((STORIES / "config.json").read_text())


def test_adapter_is_merged_before_a_sharded_export(tmp_path):
    """A GQA llama + non-zero LoRA -> 2 consolidated shards -> back to HF: the merged model's logits."""
    base = tiny_model("llama", tmp_path / "base", STORIES, tie_word_embeddings=False, **EXPORT_SHAPE)
    adapter = make_adapter(base, tmp_path / "ad", use_dora=True)
    meta, back = tmp_path / "meta", tmp_path / "hf"
    sd("--base_model", str(base), "--lora_weights", str(adapter), "--output_dir", str(meta), "--num_shards", "2",
       "--dtype", "bf16")
    m = json.loads((meta / "pipeline.json").read_text())
    assert m["verification"]["rel_diff"] <= 5e-2 and m["dtype"] == "bf16"
    sd("--base_model", str(meta), "--output_dir", str(back), "--allow_pickle_weights", "--dtype", "fp32")
    ref = peft_logits(base, adapter)
    assert float((hf_logits(back) - ref).abs().max()) <= 5e-2 * float(ref.abs().max())
    exact_meta, exact = tmp_path / "meta32", tmp_path / "hf32"
    sd("--base_model", str(base), "--lora_weights", str(adapter), "--output_dir", str(exact_meta), "--num_shards", "2")
    sd("--base_model", str(exact_meta), "--output_dir", str(exact), "--allow_pickle_weights")
    assert float((hf_logits(exact) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    merged = tmp_path / "merged"
    export("--base_model", str(base), "--lora_weights", str(adapter), "--output_dir", str(merged))
    a, b = tensors(merged), tensors(exact)
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) == 0 for k in a)


def test_refusals(tmp_path, bpe_tokenizer_dir):
    qwen = tiny_model("qwen2", tmp_path / "qwen", bpe_tokenizer_dir, **EXPORT_SHAPE)
    with pytest.raises(SuiteError, match="model_type 'qwen2'"):
        sd("--base_model", str(qwen), "--output_dir", str(tmp_path / "o"))
    with pytest.raises(SuiteError, match="--num_shards 3 must divide"):
        sd("--base_model", str(STORIES), "--output_dir", str(tmp_path / "o"), "--num_shards", "3")
    with pytest.raises(SuiteError, match="choose another destination"):
        sd("--base_model", str(STORIES), "--output_dir", str(STORIES))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(LLAMA2C.read_bytes()[:-4])
    with pytest.raises(SuiteError, match="not a llama2.c"):
        sd("--base_model", str(bad), "--output_dir", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


class _Sentinel:
    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_pth_is_never_unpickled(tmp_path):
    import torch

    evil = tmp_path / "evil"
    evil.mkdir()
    sentinel = tmp_path / "pwned"
    _Sentinel.path = str(sentinel)
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": _Sentinel()}, evil / "consolidated.00.pth")
    (evil / "params.json").write_text(json.dumps({"dim": 2, "n_layers": 1, "n_heads": 1}))
    with pytest.raises(SuiteError, match="cannot read"):
        sd("--base_model", str(evil), "--output_dir", str(tmp_path / "o"), "--allow_pickle_weights")
    assert not sentinel.exists() and not (tmp_path / "o").exists()
