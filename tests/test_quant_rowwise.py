"""The seeds' quantizers as checkpoints (utils/quant/rowwise.py) and the loader for every quantized folder
(utils/quant/checkpoint.py, utils/inference/loading.py).

Expected values are hand-computed (ChatGLM's absmax rule and nibble packing, LLMZoo's multiplier) or round trips;
the folder tests build a tiny llama from a config, write it as quantize.py does (each quantized layer's ``.weight``
replaced by its payload's tensors, config.json's quantization_config from ``rowwise.quantization_config``) and
compare the loaded model's logits with the tiny model whose weights were replaced by the dequantized ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from utils.errors import SuiteError
from utils.inference.loading import load_for_inference, prepare
from utils.inference.runners import HFRunner, fast_path_problem, make_runner
from utils.quant.baselines import CompressionConfig, groupwise_compress, groupwise_decompress
from utils.quant.checkpoint import (load_quantized_model, quantization_label, quantized_folder_problems,
                                    quantized_format)
from utils.quant.rowwise import (GroupwiseLinear, GroupwiseWeight, RowwiseLinear, RowwiseWeight, chatglm_layer,
                                 groupwise_layer, layer_compression, quantization_config, rowwise_packable,
                                 settings_from_config)
from utils.weights.pretrained import keep_bnb_cpu_layout

# ---- the payloads, hand-computed ----


def test_chatglm_int4_packs_the_pair_3_minus_2_into_0x3E():
    # absmax 7 at 4 bits: scale 7 / 7 = 1, so the codes are the values themselves.
    payload = chatglm_layer(torch.tensor([[3.0, -2.0, 7.0, 0.0]]), 4)
    assert payload.packed.dtype == torch.int8 and payload.packed.shape == (1, 2)
    assert payload.packed.view(torch.uint8).tolist() == [[0x3E, 0x70]]
    assert payload.scale.dtype == torch.float16 and payload.scale.tolist() == [1.0]
    assert payload.shape == (1, 4)
    assert payload.dequantize().tolist() == [[3.0, -2.0, 7.0, 0.0]]
    assert set(payload.tensors()) == {"weight", "weight_scale"}


def test_chatglm_int8_row_with_a_known_absmax_and_an_all_zero_row():
    # absmax 63.5 = 127 * 0.5: scale 0.5 (exact in fp16); codes round(w / 0.5) = 127, round(-20.4) = -20,
    # round(1.48) = 1, round(1.52) = 2. An all-zero row: scale 0, codes 0, zeros back (ChatGLM would give NaN).
    w = torch.tensor([[63.5, -10.2, 0.74, 0.76], [0.0, 0.0, 0.0, 0.0]])
    payload = chatglm_layer(w, 8)
    assert payload.scale.tolist() == [0.5, 0.0]
    assert payload.packed.tolist() == [[127, -20, 1, 2], [0, 0, 0, 0]]
    assert payload.dequantize().tolist() == [[63.5, -10.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]]


def test_an_all_zero_llmzoo_group_gives_zeros_not_nan():
    # Symmetric 8 bits, group 2 along the inputs: group [0, 0] has no range (LLMZoo: scale inf, NaN codes);
    # group [0.5, -1.0]: scale 127 / 1.0, codes round-half-even(63.5) = 64 and -127, back 64 / 127 and -1.
    payload = groupwise_layer(torch.tensor([[0.0, 0.0, 0.5, -1.0]]), CompressionConfig(8, 2, 1, True))
    assert payload.codes.dtype == torch.int8 and payload.codes.tolist() == [[0, 0, 64, -127]]
    assert payload.scale.dtype == torch.float32 and payload.scale.tolist() == [[0.0, 127.0]]
    assert payload.mn is None and set(payload.tensors()) == {"weight", "weight_scale"}
    back = payload.dequantize()
    assert torch.isfinite(back).all()
    torch.testing.assert_close(back, torch.tensor([[0.0, 0.0, 64 / 127, -1.0]]), rtol=0, atol=1e-7)


def test_an_all_zero_asymmetric_group_gives_zeros_and_a_constant_group_its_constant():
    payload = groupwise_layer(torch.tensor([[0.0, 0.0, 0.25, 0.25, 0.0, 1.0]]), CompressionConfig(8, 2, 1, False))
    assert payload.codes.dtype == torch.uint8 and payload.mn.tolist() == [[0.0, 0.25, 0.0]]
    assert payload.scale.tolist() == [[0.0, 0.0, 255.0]]
    assert set(payload.tensors()) == {"weight", "weight_scale", "weight_mn"}
    assert payload.dequantize().tolist() == [[0.0, 0.0, 0.25, 0.25, 0.0, 1.0]]


@pytest.mark.parametrize("group_dim", [0, 1])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_groupwise_storage_drops_llmzoos_padding_without_changing_a_value(group_dim, symmetric):
    """Codes are stored with the weight's own shape; the result is LLMZoo's compress -> decompress exactly."""
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    config = CompressionConfig(4, 4, group_dim, symmetric)  # 10 inputs / 6 outputs: a short last group either way
    payload = groupwise_layer(w, config)
    assert payload.codes.shape == (6, 10)
    assert payload.scale.shape == ((6, 3) if group_dim == 1 else (2, 10))
    assert torch.equal(payload.dequantize(), groupwise_decompress(groupwise_compress(w, config), config))


def test_which_shapes_and_methods_can_be_stored():
    assert rowwise_packable(172, 64, "int4_row", 4) is None
    assert "in_features = 171 is odd" in rowwise_packable(171, 64, "int4_row", 4)
    assert rowwise_packable(171, 64, "int8_row", 8) is None
    assert rowwise_packable(171, 63, "groupwise", 3) is None
    with pytest.raises(ValueError, match="int8_row is 8-bit"):
        rowwise_packable(64, 64, "int8_row", 4)
    with pytest.raises(ValueError, match="unknown row-wise"):
        rowwise_packable(64, 64, "gptq", 4)


def test_quantization_config_for_both_families_and_read_back():
    row = quantization_config("int4_row", 4, None, 1, None, ["b", "a"])
    assert row == {"quant_method": "chatglm_rowwise", "bits": 4, "modules": ["a", "b"]}
    group = quantization_config("groupwise", 8, -1, 0, None, ["x"])
    assert group == {"quant_method": "llmzoo_groupwise", "num_bits": 8, "group_size": -1, "group_dim": 0,
                     "symmetric": True, "modules": ["x"]}
    assert settings_from_config(group)["group_size"] == -1
    # -1: the layer's whole group_dim is one group (here the 5 output rows of a [5, 7] weight).
    assert layer_compression(settings_from_config(group), 5, 7) == CompressionConfig(8, 5, 0, True)
    with pytest.raises(ValueError, match="num_bits 9"):
        settings_from_config({**group, "num_bits": 9})
    with pytest.raises(ValueError, match="group_size must be -1 or a positive integer, got 0"):
        quantization_config("groupwise", 8, 0, 1, True, [])


# ---- the modules ----

PAYLOADS = {
    "int8_row": lambda w: chatglm_layer(w, 8),
    "int4_row": lambda w: chatglm_layer(w, 4),
    "groupwise-sym": lambda w: groupwise_layer(w, CompressionConfig(8, 16, 1, True)),
    "groupwise-asym-dim0": lambda w: groupwise_layer(w, CompressionConfig(4, 8, 0, False)),
}


def module_of(payload, bias=None):
    cls = RowwiseLinear if isinstance(payload, RowwiseWeight) else GroupwiseLinear
    return cls.from_payload(payload, bias)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_tensors_to_from_tensors_to_dequantize_is_exact(kind):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    payload = PAYLOADS[kind](w)
    tensors = {k: v.clone() for k, v in payload.tensors().items()}
    if isinstance(payload, RowwiseWeight):
        layer = RowwiseLinear.from_tensors(tensors, 40, 24, payload.bits)
    else:
        assert isinstance(payload, GroupwiseWeight)
        layer = GroupwiseLinear.from_tensors(tensors, 40, 24, payload.config)
    assert torch.equal(layer.dequantize(), payload.dequantize())
    assert set(dict(layer.named_buffers())) == set(payload.tensors())


@pytest.mark.parametrize("kind", PAYLOADS)
def test_forward_is_f_linear_with_the_dequantized_weight_and_the_input_gets_a_gradient(kind):
    gen = torch.Generator().manual_seed(2)
    w, bias = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    payload = PAYLOADS[kind](w)
    layer = module_of(payload, bias)
    x = torch.randn(3, 5, 40, generator=gen, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, payload.dequantize(), bias))
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ payload.dequantize())
    assert not any(t.requires_grad for t in layer.buffers()) and not list(layer.parameters())
    half = layer(x.detach().to(torch.bfloat16))  # dequantized into the input's dtype
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), y.detach(), rtol=0.05, atol=0.1)


def test_casting_the_module_keeps_the_stored_dtypes():
    # A group of absmax 1e-3: LLMZoo's multiplier 127 / 1e-3 = 127000 overflows float16 (max 65504).
    w = torch.full((4, 8), 1e-3)
    layer = module_of(groupwise_layer(w, CompressionConfig(8, 8, 1, True)), torch.zeros(4))
    before = layer.dequantize()
    layer.half()
    assert layer.weight_scale.dtype == torch.float32 and layer.weight.dtype == torch.int8
    assert torch.equal(layer.dequantize(), before)
    torch.testing.assert_close(before, w, rtol=0.01, atol=0)
    assert layer(torch.ones(1, 8, dtype=torch.float16)).dtype == torch.float16


def test_from_tensors_names_the_layer_whose_tensor_does_not_fit():
    payload = chatglm_layer(torch.randn(8, 16), 4)
    name = "model.layers.0.mlp.up_proj"
    with pytest.raises(ValueError, match=rf"{name}\.weight has shape \(8, 8\), expected \(8, 16\)"):
        RowwiseLinear.from_tensors(payload.tensors(), 16, 8, 8, name=name)
    with pytest.raises(ValueError, match=rf"{name}\.weight_scale is missing"):
        RowwiseLinear.from_tensors({"weight": payload.packed}, 16, 8, 4, name=name)
    sym = groupwise_layer(torch.randn(8, 16), CompressionConfig(8, 4, 1, True))
    with pytest.raises(ValueError, match=rf"{name}\.weight is torch.int8, expected torch.uint8"):
        GroupwiseLinear.from_tensors(sym.tensors(), 16, 8, CompressionConfig(8, 4, 1, False), name=name)


# ---- folders ----


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, attention_bias=True,
                 mlp_bias=True)
    config = LlamaConfig(**{**sizes, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def write_folder(folder: Path, tokenizer, method: str, quantize, skip=(), **config_kwargs):
    """A tiny llama written as quantize.py writes a seed folder; returns the reference (weights dequantized)."""
    from safetensors.torch import save_file

    model = tiny_llama()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    del state["lm_head.weight"]  # tied: saved once, as save_pretrained does
    quantized = []
    for name, linear in decoder_linears(model).items():
        if any(name.endswith(s) for s in skip):
            continue  # kept in floating point: its .weight stays
        payload = quantize(linear.weight.detach())
        del state[f"{name}.weight"]
        state.update({f"{name}.{k}": v.contiguous() for k, v in payload.tensors().items()})
        linear.weight.data = payload.dequantize()
        quantized.append(name)
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(method, modules=quantized, **config_kwargs)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(str(folder))
    return model, quantized


def logits(model, tokenizer, text: str = "Once upon a time") -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory, stories_tokenizer):
    folder = tmp_path_factory.mktemp("rowwise") / "tiny-int4"
    ref, quantized = write_folder(folder, stories_tokenizer, "int4_row", lambda w: chatglm_layer(w, 4),
                                  skip=("mlp.down_proj",), bits=4)
    return folder, ref, quantized


@pytest.fixture(scope="module")
def groupwise_folder(tmp_path_factory, stories_tokenizer):
    folder = tmp_path_factory.mktemp("rowwise") / "tiny-groupwise"
    ref, quantized = write_folder(folder, stories_tokenizer, "groupwise",
                                  lambda w: groupwise_layer(w, CompressionConfig(6, w.shape[0], 0, False)),
                                  bits=6, group_size=-1, group_dim=0, sym=False)
    return folder, ref, quantized


def test_a_rowwise_folder_loads_with_the_logits_of_the_dequantized_model(int4_folder, stories_tokenizer):
    folder, ref, quantized = int4_folder
    assert quantized_format(folder) == "chatglm_rowwise" and quantization_label(folder) == "int4_row"
    assert quantized_folder_problems(folder) == []
    lines = []
    loaded = load_for_inference(str(folder), device="cpu", log=lines.append)
    model = loaded.model
    assert loaded.info["quantization"] == "int4_row"
    assert loaded.info["quantization_backend"].startswith("torch (dequantize per call")
    assert "int4_row" in lines[0] and any("ChatGLM row-wise layers run on torch" in line for line in lines), lines
    assert {n for n, m in model.named_modules() if isinstance(m, RowwiseLinear)} == set(quantized)
    kept = model.model.layers[0].mlp.down_proj  # not quantized: a float .weight, no .weight_scale
    assert type(kept) is torch.nn.Linear and torch.equal(kept.weight, ref.model.layers[0].mlp.down_proj.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[1].self_attn.q_proj.bias is not None
    torch.testing.assert_close(logits(model, stories_tokenizer), logits(ref, stories_tokenizer))


def test_a_groupwise_folder_with_per_layer_groups_loads_the_same_way(groupwise_folder, stories_tokenizer):
    folder, ref, quantized = groupwise_folder
    assert quantization_label(folder) == "groupwise-6bit"
    model = load_quantized_model(folder, "cpu", torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GroupwiseLinear)}
    assert set(layers) == set(quantized) == set(decoder_linears(ref))
    # group_size -1 along the outputs: each layer's column is one group, whatever its width.
    assert layers["model.layers.0.mlp.up_proj"].config.group_size == 128
    assert layers["model.layers.0.self_attn.k_proj"].weight_scale.shape == (1, 64)
    assert model.quant_label == "groupwise-6bit" and model.quant_settings["group_dim"] == 0
    torch.testing.assert_close(logits(model, stories_tokenizer), logits(ref, stories_tokenizer))


def test_greedy_generation_and_the_runner_choice(int4_folder, stories_tokenizer):
    folder, ref, _ = int4_folder
    loaded = load_for_inference(str(folder), device="cpu", log=lambda _: None)
    assert fast_path_problem(loaded.model) == "quantized layers (ChatGLM row-wise)"
    assert isinstance(make_runner(loaded.model), HFRunner)
    ids = stories_tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = (m.generate(ids, max_new_tokens=8, do_sample=False) for m in (loaded.model, ref))
    assert torch.equal(got, want)


def test_a_plain_folder_is_unaffected(tmp_path, stories_tokenizer):
    model = tiny_llama()
    model.save_pretrained(str(tmp_path / "plain"))
    stories_tokenizer.save_pretrained(str(tmp_path / "plain"))
    assert quantized_format(tmp_path / "plain") is None
    loaded = load_for_inference(str(tmp_path / "plain"), device="cpu", log=lambda _: None)
    assert loaded.info["quantization"] is None and "quantization_backend" not in loaded.info
    assert all(type(m) is torch.nn.Linear for m in decoder_linears(loaded.model).values())
    torch.testing.assert_close(logits(loaded.model, stories_tokenizer), logits(model, stories_tokenizer))


def test_flags_that_do_not_apply_and_adapters_are_refused_before_loading(int4_folder, tmp_path):
    folder = str(int4_folder[0])
    with pytest.raises(SuiteError, match=r"--load_8bit: --base_model .* is already quantized \(ChatGLM row-wise\)"):
        prepare(folder, device="cpu", load_8bit=True)
    with pytest.raises(SuiteError, match="--device_map: not supported for a ChatGLM row-wise model"):
        prepare(folder, device="cpu", device_map="auto")
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(SuiteError, match="--lora_weights .* are not supported; merge the adapter"):
        prepare(folder, str(tmp_path / "lora"), device="cpu")


def test_a_damaged_folder_is_named(int4_folder, tmp_path):
    from test_quant_loading import copy_folder

    def copy(name, edit_tensors=None, edit_config=None) -> Path:
        return copy_folder(int4_folder[0], tmp_path / name, edit_tensors, edit_config)

    layer = "model.layers.1.self_attn.o_proj"
    narrow = copy("narrow", lambda t: t.update({f"{layer}.weight": t[f"{layer}.weight"][:, :16].contiguous()}))
    with pytest.raises(ValueError, match=rf"{layer}\.weight has shape \(64, 16\), expected \(64, 32\)"):
        load_quantized_model(narrow)
    unlisted = copy("unlisted", edit_config=lambda q: q["modules"].remove(layer))
    with pytest.raises(ValueError, match=f"stored quantized but not listed: {layer}"):
        load_quantized_model(unlisted)
    bad_bits = copy("bits", edit_config=lambda q: q.update(bits=3))
    assert "bits 3; chatglm_rowwise has 4 or 8" in quantized_folder_problems(bad_bits)[0]
    with pytest.raises(SuiteError, match="bits 3"):
        prepare(str(bad_bits), device="cpu")
    with pytest.raises(ValueError, match="torch backend only"):
        load_quantized_model(int4_folder[0], backend="cpu_int4")


# ---- bitsandbytes ----


def bnb_folder(folder: Path, tokenizer, quantization, **overrides):
    """A tiny llama quantized by bitsandbytes on CPU and saved by save_pretrained; returns the model in memory."""
    from transformers import AutoModelForCausalLM

    tiny_llama(**overrides).save_pretrained(str(folder / "fp"))
    # bitsandbytes (pinned) quantizes on the CPU since 0.49: a failure here is a failure, not a skip.
    model = AutoModelForCausalLM.from_pretrained(str(folder / "fp"), quantization_config=quantization,
                                                 device_map={"": "cpu"}, dtype=torch.float32).eval()
    model.save_pretrained(str(folder / "q"))
    tokenizer.save_pretrained(str(folder / "q"))
    keep_bnb_cpu_layout(model)  # the reference runs the same layers off the packed CPU kernel as the loader does
    return model, folder / "q"


def test_a_pre_quantized_nf4_folder_loads_through_transformers_with_the_cpu_guard(tmp_path, stories_tokenizer):
    from transformers import BitsAndBytesConfig

    # 80-wide MLP: gate/up have 80 outputs (not a multiple of 32) and down 80 inputs (not a multiple of the
    # 64-element block), so the packed CPU kernel cannot take them; attention (64 wide) can.
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model, folder = bnb_folder(tmp_path, stories_tokenizer, quantization, intermediate_size=80)
    assert quantized_format(folder) == "bitsandbytes" and quantization_label(folder) == "bnb-nf4"
    loaded = load_for_inference(str(folder), device="cpu", log=lambda _: None)
    assert loaded.info["quantization"] == "bnb-nf4"
    assert loaded.info["quantization_backend"].startswith("bitsandbytes nf4 on cpu (6 layers on the generic")
    layers = {n: m for n, m in loaded.model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(layers) == 7 * 2
    generic = {n for n, m in layers.items() if getattr(m, "support_avx512bf16_for_cpu", True) is False}
    assert generic == {n for n in layers if ".mlp." in n}
    torch.testing.assert_close(logits(loaded.model, stories_tokenizer), logits(model, stories_tokenizer))
    with pytest.raises(SuiteError, match=r"--load_4bit: .* already quantized \(bitsandbytes\)"):
        prepare(str(folder), device="cpu", load_4bit=True)


def test_a_pre_quantized_int8_folder_loads(tmp_path, stories_tokenizer):
    from transformers import BitsAndBytesConfig

    model, folder = bnb_folder(tmp_path, stories_tokenizer, BitsAndBytesConfig(load_in_8bit=True))
    assert quantization_label(folder) == "bnb-int8"
    loaded = load_for_inference(str(folder), device="cpu", log=lambda _: None)
    assert loaded.info["quantization"] == "bnb-int8"
    assert any(type(m).__name__ == "Linear8bitLt" for m in loaded.model.modules())
    torch.testing.assert_close(logits(loaded.model, stories_tokenizer), logits(model, stories_tokenizer))
