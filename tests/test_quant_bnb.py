"""Pre-quantized bitsandbytes folders (utils/quant/bnb.py): written on the CPU, reloaded to exactly the state that
quantizing on load gives, close to the floating-point model, and guarded against the packed CPU kernel's shapes.

The tiny llama has hidden 64 and intermediate 172, as stories260K: its ``gate/up_proj`` (172 outputs, not a
multiple of bitsandbytes' 32-row CPU block) and ``down_proj`` (172 inputs, not a whole number of 64-weight
quantization blocks) cannot take the packed 4-bit CPU kernel; its attention layers (64 x 64) can. The references
are plain transformers calls with a hand-written ``BitsAndBytesConfig``, not this module's own helpers.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DATA, STORIES

import bitsandbytes as bnb  # pinned in requirements.txt: a broken install fails, not skips
import bitsandbytes.functional as bnb_functional

from utils.quant.bnb import BnbError, cpu_generic_layers, load_bnb_folder, write_bnb  # noqa: E402
from utils.weights.pretrained import keep_bnb_cpu_layout  # noqa: E402

LAYERS = 2
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
# Relative logits error ‖L_q − L‖ / ‖L‖ of the tiny random model, measured over 4 seeds: nf4 0.107–0.131,
# fp4 0.121–0.175, int8 0.009–0.011. The bounds leave about 2x margin; a broken quantizer (wrong scales, lost
# codes) lands near 1.
LOGIT_ERROR = {"nf4": 0.25, "fp4": 0.35, "int8": 0.03}
# Mean token NLL increase of stories260K over the first 4 stories (128 tokens each), measured: nf4 +0.091,
# fp4 +0.233, int8 -0.001 (fp32 itself: about 1.2).
STORIES_NLL_LOSS = {"nf4": 0.2, "fp4": 0.45, "int8": 0.02}
STORIES_TEXTS, STORIES_TOKENS = 4, 128
CASES = [("nf4", True), ("fp4", True), ("nf4", False), ("int8", False)]


def names(*leaves: str, layers: range = range(LAYERS)) -> list[str]:
    return sorted(f"model.layers.{i}.{leaf}" for i in layers for leaf in leaves)


def reference_config(kind: str, double_quant: bool, skip: list[str] | None = None):
    """The BitsAndBytesConfig a user would write for the same quantization (transformers' own spelling)."""
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)


def quantized_on_load(folder, kind: str, double_quant: bool, skip: list[str] | None = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=reference_config(
        kind, double_quant, skip), dtype=torch.float32, device_map={"": "cpu"}).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("bnb_fp")
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def written(fp_folder, tmp_path_factory):
    """``(kind, double_quant) -> (folder, report)``, each written once."""
    done = {}

    def get(kind: str, double_quant: bool):
        if (kind, double_quant) not in done:
            out = tmp_path_factory.mktemp(f"bnb_{kind}_{int(double_quant)}")
            done[kind, double_quant] = out, write_bnb(fp_folder, out, kind, double_quant=double_quant)
        return done[kind, double_quant]

    return get


@pytest.mark.parametrize("kind, double_quant", CASES)
def test_folder_reloads_to_exactly_the_state_of_quantizing_on_load(fp_folder, written, ids, kind, double_quant):
    out, report = written(kind, double_quant)
    reloaded = load_bnb_folder(out)
    reference = quantized_on_load(fp_folder, kind, double_quant)
    # Before any forward pass (which repacks 4-bit storage in place on an AVX512-BF16 CPU): every stored tensor.
    mine, theirs = reloaded.state_dict(), reference.state_dict()
    assert sorted(mine) == sorted(theirs)
    unequal = [k for k in mine if not torch.equal(mine[k].cpu(), theirs[k].cpu())]
    assert not unequal, unequal[:5]
    layer = reloaded.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer) is (bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit)
    assert type(reloaded.lm_head) is torch.nn.Linear
    if kind != "int8":  # (the packed CPU kernel flattens the nested scales on its first pass: look before)
        assert (layer.weight.quant_state.quant_type, layer.weight.quant_state.nested) == (kind, double_quant)
    keep_bnb_cpu_layout(reference)  # the same guard as load_bnb_folder, so both run the same kernels
    assert torch.equal(logits(reloaded, ids), logits(reference, ids))
    assert report["quant_type"] == kind and report["bits"] == (8 if kind == "int8" else 4)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quality_is_close_to_the_floating_point_model(fp_folder, written, ids, kind):
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(str(fp_folder), dtype=torch.float32).eval()
    reference = logits(fp, ids)
    error = relative(logits(load_bnb_folder(written(kind, kind != "int8")[0]), ids), reference)
    assert 1e-4 < error < LOGIT_ERROR[kind]  # quantized (not a copy of the fp weights), and close


def test_int8_is_closer_than_4bit_and_nf4_report_errors(written):
    """The per-layer weight errors order the kinds as their grids do: 8 bits well below 4 bits."""
    int8 = {x["name"]: x["weight_relative_error"] for x in written("int8", False)[1]["layers"] if not x["kept"]}
    nf4 = {x["name"]: x["weight_relative_error"] for x in written("nf4", True)[1]["layers"] if not x["kept"]}
    assert sorted(int8) == sorted(nf4) == names(*MLP, *ATTENTION)
    for name in nf4:
        assert 0 < int8[name] < nf4[name] / 5 and nf4[name] < 0.2, name


@pytest.mark.parametrize("kind, double_quant", CASES)
def test_report_names_layers_sizes_and_the_cpu_guard(written, kind, double_quant):
    out, report = written(kind, double_quant)
    assert report["quantized"] == names(*MLP, *ATTENTION)
    assert report["kept"] == {"lm_head": "output head: never quantized"}
    assert (report["layers_quantized"], report["layers_kept"]) == (14, 1)
    # The packed CPU kernel's shapes: exactly the MLP layers, from the guard itself, on any CPU.
    assert report["cpu_generic_path"] == ([] if kind == "int8" else names(*MLP))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["llm_int8_skip_modules"] == ["lm_head"]
    assert report["size_on_disk_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    # int8: 8 bits a weight plus one float32 row scale (32 / in bits); 4-bit: 4 bits plus the block scales
    # (0.5 bits as float32, 0.125 as double-quantized uint8) and the small per-layer maps.
    low, high = {"int8": (8.1, 8.6)}.get(kind, (4.5, 6.5) if double_quant else (4.5, 5.0))
    assert low < report["bits_per_weight"] < high
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layer = "model.layers.0.mlp.up_proj"
    if kind == "int8":
        assert {f"{layer}.weight", f"{layer}.SCB"} <= keys
    else:
        assert f"{layer}.weight.quant_state.bitsandbytes__{kind}" in keys
        assert (f"{layer}.weight.nested_absmax" in keys) == double_quant


def test_guard_list_is_what_keep_bnb_cpu_layout_turns_off_and_what_would_fail(written, ids):
    out, report = written("nf4", True)
    model = load_bnb_folder(out)
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert cpu_generic_layers(model) == report["cpu_generic_path"] == names(*MLP)
    if not bnb_functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never uses its packed 4-bit kernel here")
    # load_bnb_folder applied the guard: exactly the listed layers are off the packed path.
    assert sorted(n for n, m in four_bit.items() if not m.support_avx512bf16_for_cpu) == names(*MLP)
    from transformers import AutoModelForCausalLM

    unguarded = AutoModelForCausalLM.from_pretrained(str(out), device_map={"": "cpu"}).eval()
    with pytest.raises(AssertionError, match="N must be divisible by block_n"):
        logits(unguarded, ids)


def test_selected_modules_only_are_quantized(fp_folder, tmp_path, ids):
    chosen = {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    report = write_bnb(fp_folder, tmp_path, "nf4", modules=chosen)
    model = load_bnb_folder(tmp_path)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)) == sorted(chosen)
    assert report["quantized"] == sorted(chosen) and report["cpu_generic_path"] == ["model.layers.1.mlp.down_proj"]
    assert report["kept"]["lm_head"].startswith("output head")
    assert report["kept"]["model.layers.0.mlp.up_proj"] == "not among the selected modules"
    assert report["layers_kept"] == 13
    skip = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert sorted(skip) == sorted(set(report["kept"]))
    reference = quantized_on_load(fp_folder, "nf4", True, skip)
    keep_bnb_cpu_layout(reference)
    assert torch.equal(logits(model, ids), logits(reference, ids))


@pytest.mark.parametrize("modules, message", [
    ({"lm_head"}, "output head is never quantized"),
    ({"model.layers.7.mlp.up_proj"}, "model.layers.7.mlp.up_proj is not a linear layer"),
    ({"model.embed_tokens"}, "model.embed_tokens is not a linear layer"),
])
def test_bad_modules_are_refused_by_name(fp_folder, tmp_path, modules, message):
    with pytest.raises(BnbError, match=message):
        write_bnb(fp_folder, tmp_path, "nf4", modules=modules)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_bad_folders_and_kinds_are_refused(fp_folder, tmp_path):
    with pytest.raises(BnbError, match="output folder is the input folder"):
        write_bnb(fp_folder, fp_folder, "nf4")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text((fp_folder / "config.json").read_text())
    with pytest.raises(BnbError, match="no safetensors weights"):
        write_bnb(tmp_path / "src", tmp_path / "out", "nf4")
    with pytest.raises(BnbError, match="kind 'int4'"):
        write_bnb(fp_folder, tmp_path / "out", "int4")


def stories(n: int) -> list[str]:
    path = DATA / "tinystories" / "valid_sample.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def mean_nll(model, tok, texts: list[str]) -> float:
    total = count = 0.0
    for text in texts:
        row = tok(text, return_tensors="pt").input_ids[:, :STORIES_TOKENS]
        with torch.no_grad():
            total += model(row, labels=row).loss.item() * (row.shape[1] - 1)
        count += row.shape[1] - 1
    return total / count


@pytest.fixture(scope="module")
def stories_fp():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32, local_files_only=True).eval()
    return model, tok, mean_nll(model, tok, stories(STORIES_TEXTS))


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_stories260k_folder_generates_and_keeps_its_quality(stories_fp, tmp_path, kind):
    fp, tok, fp_nll = stories_fp
    report = write_bnb(STORIES, tmp_path, kind)
    blocks = range(fp.config.num_hidden_layers)
    assert report["kept"] == {"lm_head": "output head: never quantized"}  # tied to the embeddings
    assert report["cpu_generic_path"] == ([] if kind == "int8" else names(*MLP, layers=blocks))
    model = load_bnb_folder(tmp_path)
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 8) and torch.equal(out[:, :prompt.shape[1]], prompt)
    assert tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    loss = mean_nll(model, tok, stories(STORIES_TEXTS)) - fp_nll
    assert -0.02 < loss < STORIES_NLL_LOSS[kind], loss


def test_conv1d_model_and_sharded_output(tmp_path, ids):
    """GPT-2's Conv1D layers ([in, out] weights) are quantized as transformers converts them, their weight errors
    measured in the right orientation, and a sharded folder reloads as one."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    fp = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                    bos_token_id=0, eos_token_id=0)).eval()
    fp.save_pretrained(str(tmp_path / "fp"))
    report = write_bnb(tmp_path / "fp", tmp_path / "q", "int8", max_shard_size="60KB")
    assert report["quantized"] == sorted(f"transformer.h.{i}.{leaf}" for i in range(2)
                                         for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert len([f for f in report["files"] if f.endswith(".safetensors")]) > 1
    assert "model.safetensors.index.json" in report["files"]
    assert all(0 < x["weight_relative_error"] < 0.03 for x in report["layers"] if not x["kept"])
    error = relative(logits(load_bnb_folder(tmp_path / "q"), ids), logits(fp, ids))
    assert 1e-4 < error < LOGIT_ERROR["int8"]
