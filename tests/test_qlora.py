"""--method qlora: the frozen base really is quantized (bitsandbytes 4-bit nf4/fp4 or 8-bit), the LoRA
on top learns, and the adapter is a plain PEFT adapter that also loads on the unquantized base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REAL_SETS, STORIES
from utils.cli import run

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def base64(tmp_path_factory) -> Path:
    """A tiny Llama (linear layers in multiples of 64, bitsandbytes' block size) with the stories260K
    tokenizer (vocabulary 512)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("q") / "base"
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = json.loads(Path(REAL_SETS["alpaca"]).read_text(encoding="utf-8"))[:64]
    path = tmp_path_factory.mktemp("qd") / "d.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _train(base: Path, data: Path, out: Path, *extra: str, steps: int = 6) -> dict:
    import finetune as ft

    run(ft.main, ["--base_model", str(base), "--data_path", str(data), "--output_dir", str(out), "--method", "qlora",
                  "--batch_size", "8", "--micro_batch_size", "4", "--max_steps", str(steps), "--learning_rate", "1e-2",
                  "--cutoff_len", "256", "--val_set_size", "8", "--lora_dropout", "0", "--logging_steps", "0",
                  "--notensorboard", *extra])
    return json.loads((out / "pipeline.json").read_text())


def _eval_loss(model, data_dir: Path) -> float:
    from datasets import load_from_disk

    import finetune as ft

    val = load_from_disk(str(data_dir / "dataset"))["validation"]
    return ft.evaluate(model, list(zip(val["input_ids"], val["labels"])), {"micro_batch_size": 4}, 0)["eval_loss"]


@pytest.mark.parametrize("flags,layer", [
    ([], "Linear4bit"),                                                        # nf4 + double quantization
    (["--qlora_quant_type", "fp4", "--noqlora_double_quant"], "Linear4bit"),
    (["--qlora_bits", "8"], "Linear8bitLt"),
])
def test_qlora_quantizes_the_base_and_learns(tmp_path, base64, data, flags, layer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.model import load_base_model

    out = tmp_path / "q"
    meta = _train(base64, data, out, *flags)
    assert meta["complete"] and meta["method"] == "qlora"
    # 2 layers x 7 linear layers (q k v o gate up down), all under LoRA and all quantized.
    assert meta["quantization"]["quantized_layers"] == 14

    # The base really was quantized: the same loading path gives bitsandbytes layers, not nn.Linear.
    bits = 8 if "8" in flags else 4
    quant = {"bits": bits, "quant_type": "fp4" if "fp4" in flags else "nf4", "double_quant": "fp4" not in flags,
             "compute_dtype": "fp32"}
    qmodel = load_base_model(str(base64), quantization=quant)
    kinds = {type(m).__name__ for m in qmodel.modules()}
    assert layer in kinds, kinds

    # The adapter is plain PEFT: it loads on the quantized base, and lowers the validation loss there.
    before = _eval_loss(qmodel, out / "data")
    tuned = PeftModel.from_pretrained(qmodel, str(out))
    after = _eval_loss(tuned, out / "data")
    assert after < before - 0.05, (before, after)
    assert abs(after - meta["final_eval"]["eval_loss"]) < 1e-3

    # ... and on the unquantized base, where it gives nearly the same loss (quantization error only).
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base64)), str(out))
    assert abs(_eval_loss(full, out / "data") - after) < 0.25


def test_qlora_on_real_stories260k_runs(tmp_path, data):
    """stories260K's MLP is 172 wide (not a multiple of 64); training through the 4-bit base still works."""
    meta = _train(STORIES, data, tmp_path / "s", steps=2)
    assert meta["complete"] and meta["trainable_parameters"] > 0


def test_4bit_layers_of_odd_widths_stay_off_the_packed_cpu_kernel():
    """bitsandbytes' packed CPU inference kernel (AVX512-BF16 machines) asserts on widths that are not
    multiples of its blocks; those layers are kept on the generic path, the others keep the fast one, and an
    eval-mode forward without gradients (what evaluation and generation run) works on stories260K."""
    import torch

    from utils.model import BNB_CPU_BLOCK_N, load_base_model

    model = load_base_model(str(STORIES), quantization={"bits": 4, "quant_type": "nf4", "double_quant": True,
                                                        "compute_dtype": "fp32"}).eval()
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    off = [m for m in layers if m.support_avx512bf16_for_cpu is False]
    odd = [m for m in layers if m.out_features % BNB_CPU_BLOCK_N or m.in_features % 64]
    assert odd and set(map(id, off)) == set(map(id, odd))  # the 172-wide MLP layers, and only those
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 403, 407, 261]])).logits
    assert torch.isfinite(logits).all()
