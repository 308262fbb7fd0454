"""quantize.py's other paths as a shell script runs them: bounded memory, the seeds' quantizers, bitsandbytes,
--requantize (split from test_quantize.py so the two files run on two workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA, REPO, STORIES, tiny_model
from test_quantize import STORY_FILE, quantize, tensors


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
    """Slow: two models of 2 and 8 blocks (27 and 109 MB) saved and quantized by the stage as processes. The
    blocks are read, calibrated, quantized and written one at a time, so six more blocks (82 MB) must cost almost
    nothing while the model streams (a stage that loaded it whole would pay all of it), and while the written
    model is scored, no more than its quantized weights and a fifth of the float ones.

    Peaks are the stage's own (VmHWM, per phase): ``ru_maxrss`` would carry over this process's peak through fork
    and exec, which made the figure depend on what the test process held (34 MB or 120 MB, run to run)."""
    peaks, sizes, written = {}, {}, {}
    for layers in (2, 8):
        base = tmp_path / f"m{layers}"
        sizes[layers] = _llama_folder(base, layers)
        out = tmp_path / f"q{layers}"
        proc = subprocess.run([sys.executable, "quantize.py", "--base_model", str(base), "--output_dir", str(out),
                               "--method", "rtn", "--bits", "4", "--data_path", str(STORY_FILE), "--nsamples", "4",
                               "--seqlen", "64", "--noprogress"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "quant_report.json").read_text())
        assert report["layers_quantized"] == 7 * layers and report["layers_kept"] == 0
        phases = report["peak_rss_mb_by_phase"]
        assert report["peak_rss_mb"] == max(phases.values())
        peaks[layers] = {k: v * 2**20 for k, v in phases.items()}
        written[layers] = report["size_on_disk_bytes"]
    extra_model = sizes[8] - sizes[2]
    extra = {k: peaks[8][k] - peaks[2][k] for k in peaks[2]}
    assert extra["streaming"] < 0.1 * extra_model, (extra, extra_model)
    assert extra["scoring_written"] < written[8] - written[2] + 0.2 * extra_model, (extra, extra_model)


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


def test_gguf_q8_0_file_with_its_perplexity_cost(tmp_path):
    """The stage writes one llama.cpp file (stories260K's 172-wide down_proj stays f16) and scores the weights
    read back from it."""
    out, held = tmp_path / "gguf", tmp_path / "held.jsonl"
    held.write_text("".join(STORY_FILE.read_text().splitlines(keepends=True)[-20:]))
    quantize("--base_model", str(STORIES), "--output_dir", str(out), "--method", "gguf", "--eval_data_path",
             str(held), "--noprogress")
    report = json.loads((out / "quant_report.json").read_text())
    assert report["file"] == "model-q8_0.gguf" and (out / "model-q8_0.gguf").is_file()
    assert {f["name"].split(".")[-2] for f in report["fallbacks"]} == {"ffn_down"}
    assert 0 <= report["delta_ppl"] < 0.05 and report["ppl_after"] != report["ppl_before"]
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_dtype_sets_the_tensors_kept_in_floating_point(tmp_path):
    """--dtype fp16: embeddings, norms and the layers not quantized are stored in fp16 (auto: the input's own,
    fp32 here), the config says so, and the folder loads with the perplexity the report gives."""
    import quantize as stage

    from utils.cli import run

    base = tiny_model("llama", tmp_path / "tiny", width=64, intermediate=128, positions=256)
    common = ["--base_model", str(base), "--method", "rtn", "--bits", "8", "--data_path", str(STORY_FILE),
              "--nsamples", "4", "--seqlen", "64", "--noprogress", "--modules", "self_attn.*"]
    run(stage.main, [*common, "--output_dir", str(tmp_path / "auto")])
    run(stage.main, [*common, "--output_dir", str(tmp_path / "half"), "--dtype", "fp16"])
    auto, half = tensors(tmp_path / "auto"), tensors(tmp_path / "half")
    assert auto["model.embed_tokens.weight"].dtype == torch.float32
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight"):
        assert half[name].dtype == torch.float16
    assert torch.equal(half["model.layers.0.self_attn.q_proj.qweight"], auto["model.layers.0.self_attn.q_proj.qweight"])
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float16"
    report = json.loads((tmp_path / "half" / "quant_report.json").read_text())
    assert report["dtype"] == "fp16" and report["ppl_after"] > 0
