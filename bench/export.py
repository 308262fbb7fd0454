"""Benchmark: export_hf.py and apply_delta.py against the usual whole-model way, same inputs, same run.

Inputs, built here: a randomly initialised Llama of about 1 GB in fp32 (hidden 1024, 14 layers, GQA 16/8
heads, FFN 2816, vocabulary 32000, untied head), saved in 200 MB safetensors shards; a LoRA adapter (r=16,
all linear layers, non-zero); a target (the base perturbed) and its delta made with apply_delta.py make.

    merge   ours: export_hf.py --base_model B --lora_weights A --max_shard_size 200MB (verification included)
            reference: transformers from_pretrained + peft PeftModel.from_pretrained + merge_and_unload()
                       + save_pretrained(max_shard_size="200MB")
    delta   ours: apply_delta.py apply (per-tensor hash check against the recorded target included)
            reference (LLMZoo's tools/apply_delta.py): load base and delta fully, add the delta's state dict
                       into the base's, save_pretrained

Each side runs in its own process; peak memory is that process's ru_maxrss (os.wait4), time its wall
clock (imports included, as a user runs it). Each side runs --repeats times, alternating; the best time
and the largest peak are kept. The last line is ``RESULT {json}``: ratios are reference / ours (higher
is better for us), plus the raw figures and checks that the outputs agree.

Usage: .venv/bin/python bench/export.py [--work_dir DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

BUILD = r"""
import sys, torch
from pathlib import Path
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
root, tok = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=14, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg)
model.save_pretrained(str(root / "base"), max_shard_size="200MB")
tokenizer = AutoTokenizer.from_pretrained(tok)
tokenizer.save_pretrained(str(root / "base"))
gen = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
model.save_pretrained(str(root / "target"), max_shard_size="200MB")
tokenizer.save_pretrained(str(root / "target"))
del model
model = LlamaForCausalLM.from_pretrained(str(root / "base"))
peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
with torch.no_grad():
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.01, generator=gen)
peft_model.save_pretrained(str(root / "lora"))
tokenizer.save_pretrained(str(root / "lora"))
print(sum(p.numel() for p in model.parameters()) * 4 / 1e9)
"""

REF_MERGE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, lora, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
model = PeftModel.from_pretrained(model, lora).merge_and_unload()
model.save_pretrained(out, max_shard_size="200MB")
AutoTokenizer.from_pretrained(lora).save_pretrained(out)
"""

REF_DELTA = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
base_path, delta_path, out = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, local_files_only=True)
delta = AutoModelForCausalLM.from_pretrained(delta_path, dtype=torch.float32, local_files_only=True)
delta_sd = delta.state_dict()
for name, param in base.state_dict().items():
    assert name in delta_sd
    param.data += delta_sd[name]
base.save_pretrained(out, max_shard_size="200MB")
AutoTokenizer.from_pretrained(delta_path).save_pretrained(out)
"""


def measure(cmd: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one process; ``out`` is removed first."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def compare(a: Path, b: Path) -> float:
    sys.path.insert(0, str(REPO))
    from utils.weights.shards import ModelWeights

    wa, wb = ModelWeights(a), ModelWeights(b)
    assert set(wa.entries) == set(wb.entries), (a, b)
    return max(float((wa.get(n).float() - wb.get(n).float()).abs().max()) for n in wa.names())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work_dir", default=None, help="where the inputs and outputs go (default: a temporary folder)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    root = Path(a.work_dir or tempfile.mkdtemp(prefix="bench-export-"))
    root.mkdir(parents=True, exist_ok=True)
    stories = REPO.parent / "shared" / "models" / "stories260K" / "hf"
    print(f"building inputs in {root} ...", file=sys.stderr)
    if not (root / "lora" / "adapter_model.safetensors").is_file():
        subprocess.run([PY, "-c", BUILD, str(root), str(stories)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors")) / 1e9
    subprocess.run([PY, str(REPO / "apply_delta.py"), "make", "--base_model_path", str(root / "base"),
                    "--target_model_path", str(root / "target"), "--delta_path", str(root / "delta"),
                    "--max_shard_size", "200MB"], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    sides = {
        "merge_ours": ([PY, str(REPO / "export_hf.py"), "--base_model", str(root / "base"), "--lora_weights",
                        str(root / "lora"), "--output_dir", str(root / "merged_ours"), "--max_shard_size", "200MB"],
                       root / "merged_ours"),
        "merge_ref": ([PY, "-c", REF_MERGE, str(root / "base"), str(root / "lora"), str(root / "merged_ref")],
                      root / "merged_ref"),
        "delta_ours": ([PY, str(REPO / "apply_delta.py"), "apply", "--base_model_path", str(root / "base"),
                        "--delta_path", str(root / "delta"), "--target_model_path", str(root / "applied_ours"),
                        "--max_shard_size", "200MB"], root / "applied_ours"),
        "delta_ref": ([PY, "-c", REF_DELTA, str(root / "base"), str(root / "delta"), str(root / "applied_ref")],
                      root / "applied_ref"),
    }
    best = {k: [float("inf"), 0.0] for k in sides}
    for rep in range(a.repeats):
        for name, (cmd, out) in sides.items():
            wall, peak = measure(cmd, out)
            best[name][0] = min(best[name][0], wall)
            best[name][1] = max(best[name][1], peak)
            print(f"  run {rep + 1} {name:11s} {wall:6.1f} s  {peak:7.0f} MB", file=sys.stderr)
    merge_diff = compare(root / "merged_ours", root / "merged_ref")
    delta_vs_target = compare(root / "applied_ours", root / "target")
    ref_vs_target = compare(root / "applied_ref", root / "target")
    result = {
        "model_gb_fp32": round(size, 3),
        "merge_peak_mem_ratio": round(best["merge_ref"][1] / best["merge_ours"][1], 2),
        "merge_time_ratio": round(best["merge_ref"][0] / best["merge_ours"][0], 2),
        "delta_peak_mem_ratio": round(best["delta_ref"][1] / best["delta_ours"][1], 2),
        "delta_time_ratio": round(best["delta_ref"][0] / best["delta_ours"][0], 2),
        "merge_ours_s": round(best["merge_ours"][0], 2), "merge_ref_s": round(best["merge_ref"][0], 2),
        "merge_ours_mb": round(best["merge_ours"][1]), "merge_ref_mb": round(best["merge_ref"][1]),
        "delta_ours_s": round(best["delta_ours"][0], 2), "delta_ref_s": round(best["delta_ref"][0], 2),
        "delta_ours_mb": round(best["delta_ours"][1]), "delta_ref_mb": round(best["delta_ref"][1]),
        "merge_max_abs_diff_vs_peft": merge_diff,
        "delta_ours_max_abs_diff_vs_target": delta_vs_target, "delta_ref_max_abs_diff_vs_target": ref_vs_target,
    }
    if not a.work_dir:
        shutil.rmtree(root, ignore_errors=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
