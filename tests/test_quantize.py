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


def _llama_folder(folder: Path, layers: int) -> int:
    """A random Llama of ``layers`` 512-wide blocks (13.6 MB each in float32), saved with the stories260K
    tokenizer; its size in bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.slow
def test_memory_is_bounded_by_one_block_not_the_model(tmp_path):
    """Slow: two models of 2 and 12 blocks (27 and 164 MB) saved and quantized by the stage as processes. The
    blocks are read, calibrated, quantized and written one at a time, so ten more blocks (136 MB) must cost far
    less than their size in peak memory; a stage that loaded the model whole would pay all of it."""
    peaks, sizes = {}, {}
    for layers in (2, 12):
        base = tmp_path / f"m{layers}"
        sizes[layers] = _llama_folder(base, layers)
        out = tmp_path / f"q{layers}"
        quantize("--base_model", str(base), "--output_dir", str(out), "--method", "rtn", "--bits", "4",
                 "--data_path", str(STORY_FILE), "--nsamples", "4", "--seqlen", "64", "--noprogress")
        report = json.loads((out / "quant_report.json").read_text())
        assert report["layers_quantized"] == 7 * layers and report["layers_kept"] == 0
        peaks[layers] = report["peak_rss_mb"] * 2**20
    extra_model, extra_peak = sizes[12] - sizes[2], peaks[12] - peaks[2]
    assert extra_peak < 0.3 * extra_model, (extra_peak / 2**20, extra_model / 2**20)


@pytest.mark.slow
def test_the_seeds_quantizers_write_folders_that_generate_loads(tmp_path):
    """Slow: two quantizations of stories260K and a generate.py run, as processes. ChatGLM's int4 rows (two codes
    a byte, a float16 scale per row) and LLMZoo's group-wise 4-bit codes, each measured on the calibration inputs
    and loaded back by the shared loader."""
    common = ["--base_model", str(STORIES), "--data_path", str(STORY_FILE), "--nsamples", "8", "--seqlen", "64",
              "--noprogress"]
    rows, groups = tmp_path / "int4_row", tmp_path / "groupwise"
    quantize(*common, "--output_dir", str(rows), "--method", "int4_row")
    quantize(*common, "--output_dir", str(groups), "--method", "groupwise", "--bits", "4", "--group_size", "32",
             "--nosym")
    saved = tensors(rows)
    name = "model.layers.0.mlp.down_proj"  # [64, 172]: every layer packs here (int4 pairs need an even width)
    assert saved[f"{name}.weight"].dtype == torch.int8 and tuple(saved[f"{name}.weight"].shape) == (64, 86)
    assert saved[f"{name}.weight_scale"].dtype == torch.float16
    for folder, method in ((rows, "chatglm_rowwise"), (groups, "llmzoo_groupwise")):
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == method and len(config["modules"]) == 35
        report = json.loads((folder / "quant_report.json").read_text())
        assert report["layers_quantized"] == 35 and all(0 < x["relative_error"] < 0.5 for x in report["layers"])
        assert 0 < report["delta_ppl"] < 2 and 4 < report["bits_per_weight"] < 11  # LLMZoo: a code per byte
    assert json.loads((groups / "config.json").read_text())["quantization_config"]["symmetric"] is False
    proc = subprocess.run([sys.executable, "generate.py", "--base_model", str(rows), "--prompt", "Once upon a time",
                           "--max_new_tokens", "8", "--temperature", "0"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "int4_row" in proc.stderr and proc.stdout.strip()


@pytest.mark.slow
def test_requantize_merges_an_adapter_into_the_quantized_base_it_was_trained_on(tmp_path):
    """Slow: a qlora run (6 steps), a GPTQ quantization and two requantizations, in this process. The merge is
    made into the dequantized base the adapter was trained against, not into the floating-point original: its
    perplexity equals the adapter's own on the bitsandbytes base, as finetune.py ran it; a GPTQ folder
    requantized starts from exactly the perplexity its own report gave."""
    pytest.importorskip("bitsandbytes")
    import finetune as ft
    import quantize as stage
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.cli import run
    from utils.weights.pretrained import bnb_config

    base = tiny_model("llama", tmp_path / "base", width=128, intermediate=256, positions=512, bos_token_id=1,
                      eos_token_id=2)
    rows = json.loads((DATA / "alpaca" / "gsm8k_train.json").read_text())[:60]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    tuned = tmp_path / "qlora"
    run(ft.main, ["--base_model", str(base), "--data_path", str(data), "--output_dir", str(tuned), "--method",
                  "qlora", "--batch_size", "8", "--micro_batch_size", "4", "--max_steps", "6", "--learning_rate",
                  "1e-2", "--cutoff_len", "256", "--val_set_size", "8", "--lora_dropout", "0", "--logging_steps", "0",
                  "--notensorboard"])
    common = ["--data_path", str(data), "--nsamples", "8", "--seqlen", "128", "--noprogress"]
    out = tmp_path / "rq"
    run(stage.main, ["--lora_weights", str(tuned), "--output_dir", str(out), "--requantize", "--group_size", "32",
                     *common])
    report = json.loads((out / "quant_report.json").read_text())
    rq = report["requantize"]
    assert rq["base_quantization"].startswith("bnb-nf4") and rq["layers_dequantized"] == 14
    assert rq["ppl_fp_merge"] == report["ppl_before"] and report["layers_quantized"] == 14

    plan = stage.prepare(str(base), str(tuned), dtype="fp32", device="cpu")
    held = stage.calibration_data(stage.Calibration(data_path=str(data), nsamples=8, seqlen=128), plan)
    nf4 = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, device_map={"": "cpu"},
                                               quantization_config=bnb_config({"bits": 4, "quant_type": "nf4",
                                                                               "double_quant": True}, torch.float32))
    as_trained = stage.held_out_ppl(PeftModel.from_pretrained(nf4, str(tuned)).eval(), plan.tokenizer, held, 512)
    fp = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    on_fp = stage.held_out_ppl(PeftModel.from_pretrained(fp, str(tuned)).eval(), plan.tokenizer, held, 512)
    assert abs(rq["ppl_fp_merge"] - as_trained["ppl"]) < 1e-3 * as_trained["ppl"]
    assert abs(on_fp["ppl"] - as_trained["ppl"]) > 10 * abs(rq["ppl_fp_merge"] - as_trained["ppl"])

    gptq = tmp_path / "gptq"
    run(stage.main, ["--base_model", str(base), "--output_dir", str(gptq), "--group_size", "32", *common])
    again = tmp_path / "again"
    run(stage.main, ["--base_model", str(gptq), "--output_dir", str(again), "--requantize", "--bits", "8", *common])
    first, second = (json.loads((f / "quant_report.json").read_text()) for f in (gptq, again))
    assert second["requantize"]["ppl_fp_merge"] == pytest.approx(first["ppl_after"], rel=1e-6)

    on_gptq = tmp_path / "qlora-gptq"  # an adapter trained on the GPTQ base, merged into it
    run(ft.main, ["--base_model", str(gptq), "--data_path", str(data), "--output_dir", str(on_gptq), "--method",
                  "qlora", "--batch_size", "8", "--micro_batch_size", "4", "--max_steps", "4", "--learning_rate",
                  "1e-2", "--cutoff_len", "256", "--val_set_size", "8", "--lora_dropout", "0", "--logging_steps", "0",
                  "--notensorboard"])
    merged = tmp_path / "merged-gptq"
    run(stage.main, ["--lora_weights", str(on_gptq), "--output_dir", str(merged), "--requantize", *common])
    third = json.loads((merged / "quant_report.json").read_text())["requantize"]
    assert third["base_quantization"] == "gptq-4bit" and third["layers_dequantized"] == 14
    from utils.inference.loading import load_for_inference

    adapted = load_for_inference(str(gptq), str(on_gptq), device="cpu", dtype="fp32").model
    as_run = stage.held_out_ppl(adapted, plan.tokenizer, held, 512)["ppl"]
    assert third["ppl_fp_merge"] == pytest.approx(as_run, rel=2e-3)  # the merge is what the adapter computed
    with pytest.raises(SystemExit):
        run(stage.main, ["--base_model", str(gptq), "--output_dir", str(tmp_path / "no"), *common])


@pytest.mark.slow
def test_bnb_nf4_writes_a_pre_quantized_folder_that_generate_loads_on_the_cpu(tmp_path):
    """Slow: the stage and generate.py as processes on stories260K. Its 172-wide MLP cannot take bitsandbytes'
    packed CPU kernel: those layers are named in the report and loaded on the generic path."""
    pytest.importorskip("bitsandbytes")
    out, held = tmp_path / "nf4", tmp_path / "held.jsonl"
    held.write_text("".join(STORY_FILE.read_text().splitlines(keepends=True)[-20:]))
    quantize("--base_model", str(STORIES), "--output_dir", str(out), "--method", "bnb_nf4", "--eval_data_path",
             str(held), "--noprogress")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"
    report = json.loads((out / "quant_report.json").read_text())
    assert report["layers_quantized"] == 35 and 0 < report["delta_ppl"] < 2
    assert sorted({n.rsplit(".", 1)[1] for n in report["cpu_generic_path"]}) == ["down_proj", "gate_proj", "up_proj"]
    proc = subprocess.run([sys.executable, "generate.py", "--base_model", str(out), "--prompt", "Once upon a time",
                           "--max_new_tokens", "8", "--temperature", "0"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    assert "generic 4-bit path" in proc.stderr
