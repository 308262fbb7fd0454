"""Loading GPTQ checkpoint folders (utils/quant/checkpoint.py) through the shared loader, on the real stories260K.

The folders are built here from real pieces, as quantize.py writes them: the model calibrated by
``quantize_model``, each quantized linear's weight replaced by ``pack_gptq``'s tensors, ``config.json`` with
``packing.quantize_config``'s dict, the tokenizer beside. The reference for the loaded model is the model in memory
right after ``quantize_model`` (its weights are the dequantized ones), so the test checks the whole path: packing,
the folder, the loader and the kernels.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA, REPO, STORIES
from utils.errors import SuiteError
from utils.inference.loading import load_for_inference, prepare
from utils.inference.runners import HFRunner, fast_path_problem, make_runner
from utils.quant.calibrate import quantize_model
from utils.quant.checkpoint import gptq_settings, is_gptq_folder, load_gptq_model
from utils.quant.gptq import GPTQSettings
from utils.quant.kernels import GPTQLinear
from utils.quant.packing import pack_gptq, packable, quantize_config

PROMPT = "Once upon a time"


def stories(n: int) -> list[str]:
    path = DATA / "tinystories" / "valid_sample.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def load_fp32():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)


def write_gptq_folder(folder: Path, bits: int, group_size: int):
    """Quantize stories260K and write it in the GPTQ layout; returns (the quantized model in memory, its layers).

    Layers the layout cannot pack at ``bits`` (``packable``) are kept in floating point and excluded in the config.
    """
    model, tok = load_fp32()
    samples = [torch.tensor(tok(t)["input_ids"][:48]) for t in stories(4)]
    settings = GPTQSettings(bits=bits, group_size=group_size)
    done = quantize_model(model, samples, settings, keep=lambda name, m: packable(m.in_features, m.out_features, bits),
                          progress=False)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # saved once, as save_pretrained does (safetensors refuses shared tensors)
    for name, q in done.layers.items():
        del state[f"{name}.weight"]
        state.update({f"{name}.{k}": v for k, v in pack_gptq(q).items()})
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    kept = [r.name for r in done.report if r.kept]
    qconfig = quantize_config(bits, group_size, desc_act=False, sym=False, static_groups=False, true_sequential=True,
                              damp_percent=0.01, excluded=kept)
    config = json.loads((STORIES / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}, indent=2))
    (folder / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
    tok.save_pretrained(str(folder))
    return model, done


@pytest.fixture(scope="module")
def gptq8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptq") / "stories-gptq-8bit"
    model, done = write_gptq_folder(folder, 8, -1)
    return folder, model, done


@pytest.fixture(scope="module")
def gptq4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptq") / "stories-gptq-4bit-g32"
    model, done = write_gptq_folder(folder, 4, 32)
    return folder, model, done


def with_stored_scales(model, done):
    """A copy of ``model`` whose quantized weights use float16-rounded scales, as the checkpoint stores them."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True, dtype=torch.float32).eval()
    ref.load_state_dict(model.state_dict())
    for name, q in done.layers.items():
        stored = dataclasses.replace(q, scales=q.scales.to(torch.float16).to(torch.float32))
        ref.get_submodule(name).weight.data = stored.dequantize()
    return ref


def logits(model, tok, text: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def copy_folder(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """``src`` copied to ``dst`` with its tensors and / or quantization config changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_the_folder_is_recognised_and_its_settings_read(gptq8, gptq4):
    assert is_gptq_folder(gptq8[0]) and not is_gptq_folder(STORIES)
    settings = gptq_settings(gptq4[0])
    assert (settings["bits"], settings["group_size"], settings["checkpoint_format"]) == (4, 32, "gptq")
    # 4-bit packs in runs of 8: the 172-wide MLP layers stay in floating point, the attention ones are packed.
    assert all(".self_attn." in name for name in gptq4[2].layers) and gptq4[2].layers


def test_the_quantized_folder_registry_reads_gptq_folders(gptq8):
    from utils.quant.checkpoint import (load_quantized_model, quantization_label, quantized_folder_problems,
                                        quantized_format)

    assert quantized_format(gptq8[0]) == "gptq" and quantization_label(gptq8[0]) == "gptq-8bit"
    assert quantized_format(STORIES) is None and quantized_folder_problems(gptq8[0]) == []
    model = load_quantized_model(gptq8[0], backend="torch")
    assert model.quant_backend == model.gptq_backend and model.quant_backend.startswith("torch (requested)")
    assert model.quant_label == "gptq-8bit" and model.quant_settings["bits"] == 8


def test_every_linear_layer_is_replaced_and_logits_match_the_model_in_memory(gptq8, stories_tokenizer):
    folder, model, done = gptq8
    loaded = load_gptq_model(folder, backend="torch")
    gptq_layers = {n for n, m in loaded.named_modules() if isinstance(m, GPTQLinear)}
    assert gptq_layers == set(done.layers) and len(gptq_layers) == 7 * loaded.config.num_hidden_layers
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied, as the config says
    assert loaded.gptq_backend.startswith("torch (requested)")
    ref = with_stored_scales(model, done)
    torch.testing.assert_close(logits(loaded, stories_tokenizer), logits(ref, stories_tokenizer),
                               rtol=1e-4, atol=1e-4)


def test_4bit_with_kept_layers_matches_on_the_cpu_int4_backend(gptq4, stories_tokenizer):
    """The default backend on CPU for 4-bit g32 is torch's int4 kernel, which computes in bfloat16."""
    folder, model, done = gptq4
    loaded = load_gptq_model(folder)
    assert loaded.gptq_backend.startswith("cpu_int4")
    kept = loaded.model.layers[0].mlp.down_proj
    assert type(kept) is torch.nn.Linear and torch.equal(kept.weight, model.model.layers[0].mlp.down_proj.weight)
    ref = with_stored_scales(model, done)
    got, want = logits(loaded, stories_tokenizer), logits(ref, stories_tokenizer)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    ids = stories_tokenizer(stories(1)[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss, ref_loss = (m(input_ids=ids, labels=ids).loss.item() for m in (loaded, model))
    assert abs(loss - ref_loss) < 0.01 * ref_loss, (loss, ref_loss)


def test_the_shared_loader_takes_the_folder_and_the_fast_path_steps_aside(gptq4):
    lines = []
    loaded = load_for_inference(str(gptq4[0]), device="cpu", log=lines.append)
    assert loaded.info["quantization"] == "gptq-4bit"
    assert loaded.info["quantization_backend"].startswith("cpu_int4")
    assert any("cpu_int4" in line for line in lines), lines
    assert fast_path_problem(loaded.model) == "quantized layers (GPTQ)"
    assert isinstance(make_runner(loaded.model), HFRunner)


def test_a_missing_or_an_extra_tensor_is_named(gptq8, tmp_path):
    def drop(tensors):
        del tensors["model.norm.weight"]

    def add(tensors):
        tensors["model.layers.0.extra.weight"] = torch.zeros(2)

    def drop_scales(tensors):
        del tensors["model.layers.1.self_attn.k_proj.scales"]

    for edit, name in ((drop, "model.norm.weight"), (add, "model.layers.0.extra.weight"),
                       (drop_scales, "model.layers.1.self_attn.k_proj.scales")):
        folder = copy_folder(gptq8[0], tmp_path / edit.__name__, edit_tensors=edit)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_gptq_model(folder)


def test_other_checkpoint_formats_and_bnb_flags_are_refused_before_loading(gptq8, tmp_path):
    folder = copy_folder(gptq8[0], tmp_path / "v2", edit_config=lambda q: q.update(checkpoint_format="gptq_v2"))
    with pytest.raises(ValueError, match="checkpoint_format 'gptq_v2' is not supported; only gptq"):
        gptq_settings(folder)
    with pytest.raises(SuiteError, match="gptq_v2"):
        prepare(str(folder), device="cpu")
    with pytest.raises(SuiteError, match="--load_4bit: --base_model .* is already quantized"):
        prepare(str(gptq8[0]), device="cpu", load_4bit=True)


def test_a_lora_adapter_on_a_gptq_base_runs_as_peft_on_the_dequantized_weights(gptq8, tmp_path):
    """The shared loader applies an adapter to a GPTQ folder (LoRA on the packed layers, unmerged): its logits are
    those of plain peft on the model holding the dequantized weights."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from utils.quant.checkpoint import dequantize_model

    model, tok = load_fp32()
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "lora"))
    ours = load_for_inference(str(gptq8[0]), str(tmp_path / "lora"), device="cpu", dtype="fp32").model
    plain = load_gptq_model(gptq8[0], "cpu", torch.float32, backend="torch")
    dequantize_model(plain)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        bare = plain(ids).logits
        reference = PeftModel.from_pretrained(plain, str(tmp_path / "lora")).eval()  # wraps plain in place
        got, want = ours(ids).logits, reference(ids).logits
    assert (got - bare).abs().max() > 1e-3  # the adapter is applied
    assert torch.allclose(got, want, atol=2e-3, rtol=0), (got - want).abs().max()


def generate(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *argv, "--prompt", PROMPT, "--max_new_tokens", "20",
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_py_on_gptq_folders(gptq8, gptq4):
    """Slow: three generate.py subprocesses (each imports torch and transformers); the claim is about the CLI."""
    fp32, int8, int4 = (generate("--base_model", str(path)) for path in (STORIES, gptq8[0], gptq4[0]))
    for proc in (fp32, int8, int4):
        assert proc.returncode == 0, proc.stderr
    assert int8.stdout.strip() and int8.stdout == fp32.stdout  # greedy: 8-bit keeps the same continuation
    assert int4.stdout.strip()
    assert "GPTQ layers run on torch" in int8.stderr and "GPTQ layers run on cpu_int4" in int4.stderr
