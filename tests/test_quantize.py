"""quantize.py as a shell script runs it, on the real stories260K: a GPTQ 4-bit checkpoint in the standard layout
(packed tensors for every layer that packs, the 172-wide MLP kept in floating point and listed as excluded),
a report with the perplexity before and after, a no-op re-run, LoRA merged first, and bad arguments reported
together before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA, REPO, STORIES, peft_adapters, tiny_model

STORY_FILE = DATA / "tinystories" / "valid_sample.jsonl"


def quantize(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "quantize.py", *args], cwd=REPO, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.slow
def test_gptq_4bit_checkpoint_of_stories260k(tmp_path):
    """Slow: the stage as separate processes (load, calibrate five blocks, two perplexity runs; then the no-op
    re-run that must not touch the output, and the refused second quantization) and generate.py on the output."""
    out = tmp_path / "q4"
    flags = ["--base_model", str(STORIES), "--output_dir", str(out), "--bits", "4", "--group_size", "32",
             "--act_order", "--data_path", str(STORY_FILE), "--nsamples", "16", "--seqlen", "128", "--noprogress"]
    proc = quantize(*flags)
    assert proc.stdout.strip() == str(out.resolve())
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["desc_act"] is True
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    report = json.loads((out / "quant_report.json").read_text())
    kept = {r["name"] for r in report["layers"] if r["kept"]}
    quantized = {r["name"] for r in report["layers"] if not r["kept"]}
    assert len(quantized) == 20 and len(kept) == 15 and all(".mlp." in n for n in kept)
    assert all(0 < r["relative_error"] < 0.5 for r in report["layers"] if not r["kept"])
    # The held-out perplexity is measured before and after (stories260K on its own domain: about 3.9).
    assert 2 < report["ppl_before"] < 6 and 0 <= report["delta_ppl"] < 0.5 * report["ppl_before"]
    assert 4 < report["bits_per_weight"] < 6  # 4-bit codes plus an fp16 scale and a 4-bit zero per 32 weights

    from transformers import AutoModelForCausalLM

    from utils.quant.packing import unpack_gptq

    original = AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True, dtype=torch.float32)
    ref = original.state_dict()
    saved = tensors(out)
    for name in quantized:
        assert f"{name}.weight" not in saved
        parts = {p: saved[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
        w = unpack_gptq(parts, 4, 32).dequantize()
        assert (w - ref[f"{name}.weight"]).abs().max() < 0.25 * ref[f"{name}.weight"].abs().max()
    for name in kept:
        assert torch.equal(saved[f"{name}.weight"], ref[f"{name}.weight"])
    assert torch.equal(saved["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    for excluded in kept:  # listed so that the ecosystem's GPTQ loaders leave them in floating point
        assert any(excluded.replace(".", "\\.") in rule for rule in qc.get("dynamic", {}))

    # The output loads in generate.py (GPTQ layers, the MLP in floating point), and is not quantized twice.
    gen = subprocess.run([sys.executable, "generate.py", "--base_model", str(out), "--prompt", "Once upon a time",
                          "--max_new_tokens", "12"], cwd=REPO, capture_output=True, text=True)
    assert gen.returncode == 0 and gen.stdout.strip() and "gptq-4bit" in gen.stderr, gen.stderr[-2000:]
    twice = quantize("--base_model", str(out), "--output_dir", str(tmp_path / "qq"), "--data_path", str(STORY_FILE),
                     check=False)
    assert twice.returncode == 2 and "already quantized" in twice.stderr and not (tmp_path / "qq").exists()

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = quantize(*flags)
    assert "nothing to do" in again.stderr and (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / "pipeline.json").read_text())["stage"] == "quantize"


@pytest.mark.slow
def test_a_lora_adapter_is_merged_before_quantizing(tmp_path):
    """Slow: the stage as a process (load, merge, calibrate), then peft's own merge to compare with."""
    base = tiny_model("llama", tmp_path / "tiny", width=64, intermediate=128, positions=256)
    adapter = peft_adapters(base, tmp_path / "adapters")["lora"]
    out = tmp_path / "q8"
    quantize("--lora_weights", str(adapter), "--output_dir", str(out), "--bits", "8", "--group_size", "-1",
             "--data_path", str(STORY_FILE), "--nsamples", "8", "--seqlen", "64", "--noprogress")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.quant.packing import unpack_gptq

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).merge_and_unload()
    plain = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    saved = tensors(out)
    name = "model.layers.0.self_attn.q_proj"
    w = unpack_gptq({p: saved[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}, 8, -1).dequantize()
    target = merged.state_dict()[f"{name}.weight"]
    assert (w - target).abs().max() < (w - plain[f"{name}.weight"]).abs().max()  # the merge, not the bare base
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["base_model"]["adapter"] == str(adapter.resolve())


def test_bad_arguments_are_reported_together_before_any_work(tmp_path):
    proc = quantize("--base_model", str(STORIES), "--output_dir", str(tmp_path / "o"), "--bits", "5",
                    "--group_size", "0", "--damp_percent", "2", "--data_path", str(tmp_path / "none.txt"),
                    "--method", "rtn", "--act_order", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for word in ("--bits", "--group_size", "--damp_percent", "none.txt", "--act_order"):
        assert word in proc.stderr, word
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_modules_selects_the_layers_and_a_pattern_that_matches_nothing_is_refused(tmp_path):
    """Slow: two runs of the stage as processes (the refusal needs the model's layer names, so it loads it)."""
    base = tiny_model("llama", tmp_path / "tiny", width=64, intermediate=128, positions=256)
    out = tmp_path / "q8"
    common = ["--base_model", str(base), "--bits", "8", "--group_size", "-1", "--data_path", str(STORY_FILE),
              "--nsamples", "4", "--seqlen", "64", "--noprogress"]
    quantize(*common, "--output_dir", str(out), "--modules", "self_attn.q_proj", "*.mlp.down_proj")
    report = json.loads((out / "quant_report.json").read_text())
    quantized = sorted(r["name"].split(".", 3)[3] for r in report["layers"] if not r["kept"])
    assert quantized == ["mlp.down_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.q_proj"]
    assert {r["kept"] for r in report["layers"] if r["kept"]} == {"not selected by --modules"}
    saved = tensors(out)
    assert "model.layers.0.self_attn.q_proj.qweight" in saved and "model.layers.0.self_attn.k_proj.weight" in saved
    proc = quantize(*common, "--output_dir", str(tmp_path / "bad"), "--modules", "attn.qkv", check=False)
    assert proc.returncode == 2 and "--modules attn.qkv: matches no linear layer" in proc.stderr
    assert "self_attn.q_proj" in proc.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_prepared_folder_calibrates_on_its_rows_and_is_scored_on_its_validation_split(tmp_path, gsm8k_prepared,
                                                                                      capsys):
    """Slow: a calibration of stories260K (five blocks) and two perplexity runs, in this process."""
    import quantize as stage
    from utils.cli import run
    from utils.training.prepared import prepared_rows

    data = gsm8k_prepared(40, "--val_set_size", "8", "--cutoff_len", "256")
    out = tmp_path / "q8"
    common = ["--base_model", str(STORIES), "--bits", "8", "--group_size", "-1", "--data_path", str(data),
              "--seqlen", "128", "--noprogress"]
    run(stage.main, [*common, "--output_dir", str(out), "--nsamples", "16"])
    report = json.loads((out / "quant_report.json").read_text())
    validation = prepared_rows(data, "validation")["validation"]
    assert report["eval_tokens"] == sum(len(ids) - 1 for ids, _ in validation)  # every row scored on its own
    assert report["calibration_tokens"] == 16 * 128 and report["layers_quantized"] == 35
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["inputs"]["data"] == json.loads((data / "pipeline.json").read_text())["fingerprint"]
    train = len(prepared_rows(data, "train")["train"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run(stage.main, [*common, "--output_dir", str(tmp_path / "too_few"), "--nsamples", "500"])
    assert stop.value.code == 1
    assert f"{train} usable training rows, fewer than --nsamples 500" in capsys.readouterr().err


def _plan(template: str | None = None):
    from utils.inference.loading import prepare

    return prepare(str(STORIES), prompt_template=template, dtype="fp32", device="cpu")


def _decoded(plan, ids) -> str:
    return plan.tokenizer.decode(ids.tolist() if hasattr(ids, "tolist") else ids)


def test_data_files_are_rendered_with_the_template_as_finetune_trains_on_them(tmp_path):
    """Chat / instruction files calibrate on what the model was trained on: each row rendered with the template
    (the format's default, or --prompt_template), cut to --seqlen; the last tenth of the rows is held out."""
    import quantize as stage

    rows = json.loads((DATA / "alpaca" / "gsm8k_train.json").read_text())[:20]
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps(rows))
    cal = stage.Calibration(data_path=str(alpaca), nsamples=6, seqlen=160, seed=1)
    plan = _plan()
    data = stage.calibration_data(cal, plan)
    assert len(data.samples) == 6 and all(1 < len(s) <= 160 for s in data.samples)
    assert all("Below is an instruction" in _decoded(plan, s) for s in data.samples)
    assert data.held_out_texts is None and len(data.held_out_ids) == 2  # rows 19 and 20, never calibrated on
    assert rows[-1]["output"][:20] in _decoded(plan, data.held_out_ids[-1])
    assert not any(h[:len(s)] == s.tolist() for h in data.held_out_ids for s in data.samples)
    vicuna = stage.calibration_data(cal, _plan("vicuna_v1.1"))
    assert all("USER:" in _decoded(plan, s) and "Below is an instruction" not in _decoded(plan, s)
               for s in vicuna.samples)
    moss = stage.calibration_data(stage.Calibration(data_path=str(DATA / "moss" / "moss_sft_sample.jsonl"),
                                                    nsamples=4, seqlen=64), plan)
    assert all(_decoded(plan, s).startswith("<s> You are an AI assistant whose name is MOSS") for s in moss.samples)
    assert all("<|Human|>" in _decoded(plan, h) for h in moss.held_out_ids)  # whole rows: the turns follow
    text = stage.calibration_data(stage.Calibration(data_path=str(STORY_FILE), nsamples=3, seqlen=32), plan)
    assert [len(s) for s in text.samples] == [32, 32, 32] and text.held_out_texts  # {"text"} rows: plain text


def test_method_flags_that_do_not_apply_are_refused_together():
    import quantize as stage

    def problems(**flags):
        args = stage.QuantizeArgs.from_flags({"base_model": str(STORIES), "output_dir": "o", "data_path":
                                              str(STORY_FILE), **flags})
        return "\n".join(args.problems())

    found = problems(method="int8_row", bits=4, act_order=True, gguf_type="f16")
    for flag in ("--bits 4 contradicts", "--act_order applies to --method gptq", "--gguf_type applies"):
        assert flag in found, flag
    assert "--group_size applies" in problems(method="gguf", group_size=32)
    assert "--static_groups" in problems(static_groups=True)  # without --act_order
    assert "--bits must lie in 2..8" in problems(method="groupwise", bits=9)
    assert problems(method="groupwise", bits=4, group_size=64, group_dim=0) == ""
    no_data = stage.QuantizeArgs.from_flags({"base_model": str(STORIES), "output_dir": "o", "method": "bnb_nf4"})
    assert any("--eval_data_path" in p for p in no_data.problems())
    gptq = stage.QuantizeArgs.from_flags({"base_model": str(STORIES), "output_dir": "o"})
    assert any("--data_path is required" in p for p in gptq.problems())
    assert stage.Method(method="int4_row").resolved()["bits"] == 4
    assert stage.Method(method="groupwise").resolved() == {"bits": 8, "group_size": 256, "sym": True,
                                                           "gguf_type": None}
