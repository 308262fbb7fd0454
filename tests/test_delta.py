"""apply_delta.py: make / apply round trips (exact in fp32, with an added <pad> token), base checks, foreign
(FastChat-style) deltas, FastChat's flag spelling, destination rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXPORT_SHAPE, REPO, STORIES, tiny_model
from test_export import call, hf_logits
from utils.errors import SuiteError


def delta(*argv: str) -> None:
    import apply_delta

    call(apply_delta.main, argv)


def tensors(folder: Path) -> dict:
    from utils.weights.shards import ModelWeights

    w = ModelWeights(folder)
    return {n: w.get(n) for n in w.names()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A base and a fine-tuned target with one added token (<pad>): embeddings and head grow by a row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("delta")
    base = tiny_model("llama", root / "base", STORIES, tie_word_embeddings=False, **EXPORT_SHAPE)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_special_tokens({"pad_token": "<pad>"})
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    target = root / "target"
    model.save_pretrained(str(target), max_shard_size="60KB")
    tok.save_pretrained(str(target))
    return base, target


def test_apply_of_make_is_the_target_exactly(tmp_path, pair):
    import torch

    base, target = pair
    d, rebuilt = tmp_path / "delta", tmp_path / "rebuilt"
    delta("make", "--base_model_path", str(base), "--target_model_path", str(target), "--delta_path", str(d),
          "--max_shard_size", "50KB")
    meta = json.loads((d / "pipeline.json").read_text())
    assert meta["stage"] == "make_delta" and meta["grown_rows"]["model.embed_tokens.weight"] == [512, 513]
    assert set(meta["grown_rows"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    dt = tensors(d)
    assert all(t.dtype == torch.float32 for t in dt.values())
    tt, bt = tensors(target), tensors(base)
    assert torch.equal(dt["model.norm.weight"], tt["model.norm.weight"] - bt["model.norm.weight"])
    assert torch.equal(dt["lm_head.weight"][512], tt["lm_head.weight"][512])  # the new row: target's own values
    # apply through the real command line, with FastChat's dashed flag spelling
    proc = subprocess.run([sys.executable, str(REPO / "apply_delta.py"), "apply", "--base-model-path", str(base),
                           "--delta-path", str(d), "--target-model-path", str(rebuilt)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bit for bit" in proc.stderr and proc.stdout.strip() == str(rebuilt.absolute())
    rt = tensors(rebuilt)
    assert rt.keys() == tt.keys() and all(torch.equal(rt[n], tt[n]) for n in tt)
    assert torch.equal(hf_logits(rebuilt), hf_logits(target))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(rebuilt)).pad_token == "<pad>"
    out_meta = json.loads((rebuilt / "pipeline.json").read_text())
    assert out_meta["verified_against_target"] and out_meta["delta"]["made_by_suite"]
    assert set(out_meta["base_model"]["files"]) >= {"config.json"} and out_meta["files"]
    # re-running is a no-op; a different request needs --overwrite
    again = subprocess.run(proc.args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    with pytest.raises(SuiteError, match="--overwrite"):
        delta("apply", "--base_model_path", str(base), "--delta_path", str(d), "--target_model_path", str(rebuilt),
              "--dtype", "bf16")


def test_wrong_base_is_refused_before_anything_is_written(tmp_path, pair):
    base, target = pair
    d = tmp_path / "delta"
    delta("make", "--base_model_path", str(base), "--target_model_path", str(target), "--delta_path", str(d))
    other = tiny_model("llama", tmp_path / "other", STORIES, seed=9, tie_word_embeddings=False, **EXPORT_SHAPE)
    with pytest.raises(SuiteError, match="differs from the base the delta was made from"):
        delta("apply", "--base_model_path", str(other), "--delta_path", str(d), "--target_model_path", str(tmp_path / "t"))
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.tmp-*"))
    for flag, path in (("--delta_path", base), ("--delta_path", target)):
        with pytest.raises(SuiteError, match="choose another destination"):
            delta("make", "--base_model_path", str(base), "--target_model_path", str(target), flag, str(path))


def test_fp64_fallback_keeps_extreme_tensors_exact(tmp_path, pair):
    """target - base in fp32 cannot always give the target back (1e8 + (1 - 1e8) != 1 in fp32)."""
    import torch
    from safetensors.torch import load_file, save_file

    base, _ = pair
    b2, t2 = tmp_path / "b", tmp_path / "t"
    for src, dst, value in ((base, b2, 1e8), (base, t2, 1.0)):
        dst.mkdir()
        state = {}
        for f in sorted(src.glob("model-*.safetensors")):
            state.update(load_file(str(f)))
        state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], value)
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
        (dst / "config.json").write_text((src / "config.json").read_text())
    d, r = tmp_path / "d", tmp_path / "r"
    delta("make", "--base_model_path", str(b2), "--target_model_path", str(t2), "--delta_path", str(d))
    assert json.loads((d / "pipeline.json").read_text())["fp64_tensors"] == ["model.norm.weight"]
    delta("apply", "--base_model_path", str(b2), "--delta_path", str(d), "--target_model_path", str(r))
    assert torch.equal(tensors(r)["model.norm.weight"], torch.ones(64))


def test_foreign_delta_without_metadata_is_applied(tmp_path, pair, capsys):
    """A FastChat-style delta (a plain model folder of target - base, no pipeline.json)."""
    import torch
    from transformers import AutoModelForCausalLM

    base, target = pair
    tgt = AutoModelForCausalLM.from_pretrained(str(target))
    bt = tensors(base)
    with torch.no_grad():
        for name, p in tgt.named_parameters():
            p[: bt[name].shape[0]] -= bt[name]
    d = tmp_path / "fc-delta"
    tgt.save_pretrained(str(d))
    out = tmp_path / "out"
    delta("apply", "--base_model_path", str(base), "--delta_path", str(d), "--target_model_path", str(out))
    assert "not made by this suite" in capsys.readouterr().err
    tt, ot = tensors(target), tensors(out)
    assert all(float((ot[n] - tt[n]).abs().max()) <= 1e-6 for n in tt)
    assert not json.loads((out / "pipeline.json").read_text())["verified_against_target"]
