"""Adapters trained on a GPTQ base (issue 15, items 5 and 9): LoRA on the frozen ``GPTQLinear`` layers
(``finetune.py --method qlora``), P-tuning v2 / p-tuning / prompt tuning through their backward, and the adapter
that comes out: a plain peft LoRA adapter that gives the same logits on the floating-point model whose weights are
the dequantized GPTQ weights. Also what finetune.py refuses on such a base, and a pre-quantized bitsandbytes base.

The GPTQ base is a tiny llama (hidden 64, 2 layers, the stories260K tokenizer) quantized in-process with RTN at 4
bits, group 32, in the layout quantize.py writes (one layer kept in floating point, as quantize.py keeps layers it
cannot pack); the slow test makes it with quantize.py itself and trains with finetune.py, both as subprocesses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA, REPO, tiny_model
from utils.errors import SuiteError, UsageError
from utils.quant.packing import dequantize_gptq, pack_gptq, quantize_config

BITS, GROUP = 4, 32
KEPT = "model.layers.1.mlp.down_proj"  # left in floating point: a LoRA target that is a plain nn.Linear
PACKED = ("qweight", "qzeros", "scales", "g_idx")
LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def write_gptq(fp: Path, out: Path, keep: tuple[str, ...] = (KEPT,)) -> Path:
    """``fp``'s decoder-block linear layers quantized by RTN and stored in the GPTQ layout, ``keep`` excluded."""
    from safetensors.torch import load_file, save_file

    from utils.quant.grid import rtn

    state = load_file(str(fp / "model.safetensors"))
    for key in [k for k in state if ".layers." in k and k.endswith(".weight") and state[k].dim() == 2]:
        name = key.removesuffix(".weight")
        if name not in keep:
            packed = pack_gptq(rtn(state.pop(key).float(), BITS, GROUP))
            state.update({f"{name}.{part}": tensor for part, tensor in packed.items()})
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    qconfig = quantize_config(BITS, GROUP, desc_act=False, sym=False, static_groups=False, true_sequential=True,
                              damp_percent=0.01, excluded=keep)
    config = json.loads((fp / "config.json").read_text(encoding="utf-8"))
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}, indent=2))
    (out / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(fp / name, out / name)
    return out


def dequantized_fp_model(fp: Path, gptq: Path):
    """The floating-point model ``gptq`` was made from, with each quantized layer's weight replaced by its
    dequantized GPTQ weight: what a standard peft adapter for the GPTQ base must equal on plain nn.Linear."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fp), local_files_only=True, dtype=torch.float32).eval()
    tensors = load_file(str(gptq / "model.safetensors"))
    for name in {k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")}:
        weight = dequantize_gptq({p: tensors[f"{name}.{p}"] for p in PACKED}, BITS)
        model.get_submodule(name).weight.data = weight
    return model


def gptq_model(gptq: Path):
    """The GPTQ folder loaded with the float32 ``torch`` backend (exact arithmetic: comparable to nn.Linear)."""
    from utils.quant.checkpoint import load_gptq_model

    return load_gptq_model(gptq, backend="torch")


@pytest.fixture(scope="module")
def fp_base(tmp_path_factory) -> Path:
    """Every linear width a multiple of 8 (64, 32 for k/v, 128 for the MLP), so each layer packs at 4 bits."""
    return tiny_model("llama", tmp_path_factory.mktemp("fp") / "base", width=64, intermediate=128, positions=256,
                      bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def gptq_base(fp_base, tmp_path_factory) -> Path:
    return write_gptq(fp_base, tmp_path_factory.mktemp("gptq") / "base-gptq-4bit")


@pytest.fixture(scope="module")
def stories_data(tmp_path_factory) -> Path:
    """40 short alpaca rows (a story's first sentence as the response): a few dozen tokens each."""
    lines = (DATA / "tinystories" / "valid_sample.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    rows = [{"instruction": "Begin a story.", "input": "", "output": json.loads(line)["text"].split(". ")[0][:80] + "."}
            for line in lines]
    path = tmp_path_factory.mktemp("data") / "stories.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


TRAIN_FLAGS = ("--batch_size", "8", "--micro_batch_size", "8", "--max_steps", "6", "--learning_rate", "1e-2",
               "--cutoff_len", "128", "--val_set_size", "8", "--lora_dropout", "0", "--logging_steps", "0",
               "--notensorboard")


@pytest.fixture(scope="module")
def qlora_run(gptq_base, stories_data, tmp_path_factory) -> Path:
    """finetune.py --method qlora on the GPTQ base, in this process as its command line runs it."""
    from conftest import run_finetune

    return run_finetune(tmp_path_factory.mktemp("run") / "qlora", stories_data, "--method", "qlora", *TRAIN_FLAGS,
                        base=gptq_base)


def step_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def tokens(n: int = 12, rows: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (rows, n), generator=torch.Generator().manual_seed(seed))


# -- the LoRA layer ------------------------------------------------------------------------------------------


def lora_on(model, **config):
    from peft import LoraConfig, get_peft_model

    from utils.quant.adapters import register_gptq_lora

    return get_peft_model(model, register_gptq_lora(LoraConfig(lora_dropout=0.0, **config)))


def test_lora_output_is_the_gptq_output_plus_the_scaled_low_rank_update(gptq_base):
    """By hand: y = x Wᵀ + (x Aᵀ Bᵀ) · alpha / r with W the dequantized layer; the input gradient goes through
    the packed layer's backward, the adapter's gradients reach A and B, and disabling the adapter gives x Wᵀ."""
    from utils.quant.adapters import GPTQLoraLinear
    from utils.quant.kernels import GPTQLinear

    model = lora_on(gptq_model(gptq_base), r=4, lora_alpha=8, target_modules=["q_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, GPTQLoraLinear) and isinstance(layer.base_layer, GPTQLinear)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(generator=torch.Generator().manual_seed(1))  # a fresh LoRA's B is zero
    weight = dequantize_gptq(layer.base_layer.tensors(), BITS)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)

    y = layer(x)
    torch.testing.assert_close(y, x @ weight.T + (x @ a.T @ b.T) * 2.0, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 5, 64) @ (weight + 2.0 * b @ a), rtol=1e-4, atol=1e-4)
    assert float(a.grad.abs().max()) > 0 and float(b.grad.abs().max()) > 0
    torch.testing.assert_close(layer.get_delta_weight("default"), 2.0 * (b @ a).detach())
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_merging_into_a_gptq_layer_and_lora_variants_are_refused(gptq_base):
    from peft import LoraConfig, get_peft_model

    from utils.quant.adapters import GPTQLoraLinear, register_gptq_lora
    from utils.quant.kernels import GPTQLinear

    model = lora_on(gptq_model(gptq_base), r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: a LoRA adapter cannot be merged "
                                         r"into a GPTQ layer .*quantize\.py --requantize"):
        model.merge_and_unload()
    with pytest.raises(SuiteError, match="--use_dora: DoRA .* packed integers"):
        register_gptq_lora(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    # The layer itself also refuses a variant (a config registered by hand, without our check).
    config = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    config._register_custom_module({GPTQLinear: GPTQLoraLinear})
    with pytest.raises(ValueError, match=r"q_proj: LoRA variants \(DoRA and the like\) are not supported"):
        get_peft_model(gptq_model(gptq_base), config)


def test_without_the_registration_peft_does_not_know_the_gptq_layer(gptq_base):
    """Why ``register_gptq_lora`` exists: peft 0.21.2's dispatchers take nn.Linear, not ``GPTQLinear``."""
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="is not supported"):
        get_peft_model(gptq_model(gptq_base), LoraConfig(r=2, target_modules=["q_proj"]))


def test_all_linear_finds_the_packed_and_the_kept_layers(gptq_base, fp_base):
    from transformers import AutoModelForCausalLM

    from utils.training.methods import MethodArgs, linear_module_names, lora_config

    model = gptq_model(gptq_base)
    assert type(model.get_submodule(KEPT)) is torch.nn.Linear
    assert linear_module_names(model) == LINEARS == linear_module_names(AutoModelForCausalLM.from_pretrained(
        str(fp_base), local_files_only=True))
    config = lora_config(MethodArgs(method="qlora"), model)
    assert sorted(config.target_modules) == LINEARS and config._custom_modules
    assert lora_config(MethodArgs(), AutoModelForCausalLM.from_pretrained(str(fp_base)))._custom_modules is None


# -- qlora through finetune.py ---------------------------------------------------------------------------------


def test_qlora_on_a_gptq_base_learns_and_writes_a_plain_peft_adapter(qlora_run, gptq_base):
    from safetensors.torch import load_file

    from utils.artifacts import base_fingerprint

    losses = step_losses(qlora_run)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses
    config = json.loads((qlora_run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == LINEARS
    assert not any("custom" in key for key in config)  # the registration is not saved: a standard adapter
    state = load_file(str(qlora_run / "adapter_model.safetensors"))
    lora_b = [k for k in state if ".lora_B." in k]
    assert len(lora_b) == 2 * 7 and all(float(state[k].abs().max()) > 0 for k in lora_b)  # trained (init: zero)
    assert all(k.startswith("base_model.model.model.layers.") for k in state)  # as on any base
    meta = json.loads((qlora_run / "pipeline.json").read_text())
    assert meta["complete"] and meta["method"] == "qlora"
    assert meta["base_model"] == {"path": str(gptq_base.resolve()), "fingerprint": base_fingerprint(gptq_base)}
    q = meta["quantization"]
    assert q["base"] == "gptq-4bit" and q["bits"] == BITS and q["group_size"] == GROUP
    assert q["quantized_layers"] == 13 and q["lora_layers"] == 13  # 14 linear layers, one kept in floating point
    # The packed base is untouched by training.
    from safetensors.torch import load_file as load

    stored = load(str(gptq_base / "model.safetensors"))
    model = gptq_model(gptq_base)
    assert torch.equal(model.get_submodule("model.layers.0.self_attn.q_proj").qweight,
                       stored["model.layers.0.self_attn.q_proj.qweight"])


def test_the_adapter_gives_the_same_logits_on_the_dequantized_fp_model(qlora_run, gptq_base, fp_base):
    """Plain peft on nn.Linear layers holding the dequantized weights vs our LoRA on the packed layers."""
    from peft import PeftModel

    from utils.quant.adapters import attach_adapter

    ids = tokens()
    reference = PeftModel.from_pretrained(dequantized_fp_model(fp_base, gptq_base), str(qlora_run)).eval()
    ours = attach_adapter(gptq_model(gptq_base), qlora_run).eval()
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, ours(input_ids=ids).logits
        untuned = dequantized_fp_model(fp_base, gptq_base)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((want - untuned).abs().max()) > 1e-2  # the adapter does change the logits


def test_the_adapter_also_loads_on_the_cpu_int4_backend(qlora_run, gptq_base):
    """finetune.py's default backend on CPU (bfloat16 int4 matmul): the same logits up to its rounding."""
    from utils.quant.adapters import attach_adapter, load_quantized_base

    fast = load_quantized_base(gptq_base)
    assert "cpu_int4" in fast.quant_backend and fast.name_or_path == str(gptq_base)
    ids = tokens()
    with torch.no_grad():
        got = attach_adapter(fast, qlora_run)(input_ids=ids).logits
        want = attach_adapter(gptq_model(gptq_base), qlora_run)(input_ids=ids).logits
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())


# -- prefix, p-tuning and prompt tuning ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prefix", "ptuning", "prompt"])
def test_virtual_token_methods_train_through_the_gptq_layers(gptq_base, fp_base, method):
    """The same gradients as on the dequantized fp model (the packed layers' backward is exact on the torch
    backend), and the loss falls in a few steps on the GPTQ base."""
    from utils.training.methods import MethodArgs, prepare_model

    settings = MethodArgs(method=method, num_virtual_tokens=4)
    ids = tokens(16, 4)
    grads = []
    for base in (gptq_model(gptq_base), dequantized_fp_model(fp_base, gptq_base)):
        torch.manual_seed(0)
        model = prepare_model(base, settings)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        if len(grads) == 1:
            gptq_peft = model
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)

    params = [p for p in gptq_peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-1)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = gptq_peft(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    # Each step lowers the loss (measured: by 0.07 to 0.12 over the 8 steps on this random model).
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.03, losses


def test_prefix_tuning_through_finetune_on_a_gptq_base(gptq_base, fp_base, stories_data, tmp_path):
    """finetune.py --method prefix (P-tuning v2) on the GPTQ base: the loss falls, the adapter and the record are
    written, and the prefix gives the same logits on the dequantized fp model."""
    from peft import PeftModel

    from conftest import run_finetune
    from utils.quant.adapters import attach_adapter

    flags = list(TRAIN_FLAGS)
    flags[flags.index("--learning_rate") + 1] = "1e-1"
    out = run_finetune(tmp_path / "prefix", stories_data, "--method", "prefix", "--num_virtual_tokens", "4",
                       "--lr_scheduler", "constant", *flags, base=gptq_base)
    losses = step_losses(out)
    assert losses[-1] < losses[0] - 0.02, losses  # measured: 6.252 -> 6.209 in 6 steps
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    assert json.loads((out / "pipeline.json").read_text())["quantization"]["base"] == "gptq-4bit"
    ids = tokens()
    with torch.no_grad():
        want = PeftModel.from_pretrained(dequantized_fp_model(fp_base, gptq_base), str(out)).eval()(input_ids=ids)
        got = attach_adapter(gptq_model(gptq_base), out).eval()(input_ids=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


# -- what finetune.py refuses on a quantized base --------------------------------------------------------------


def problems(base: Path, data: Path, tmp_path: Path, **flags) -> str:
    """finetune.py's validation of these flags ("" when it accepts them)."""
    import finetune

    args = finetune.FinetuneArgs.from_flags({"base_model": str(base), "data_path": [str(data)],
                                             "output_dir": str(tmp_path / "out"), "tensorboard": False, **flags})
    try:
        finetune.validate_args(args)
    except UsageError as exc:
        return str(exc)
    return ""


def test_finetune_refuses_what_a_gptq_base_cannot_do(gptq_base, stories_data, tmp_path):
    check = lambda **flags: problems(gptq_base, stories_data, tmp_path, **flags)  # noqa: E731
    assert check(method="qlora") == "" and check(method="prefix") == "" and check(method="prompt") == ""
    assert "--method lora: --base_model" in check(method="lora") and "--method qlora" in check(method="lora")
    assert "--method full: " in check(method="full") and "cannot be trained" in check(method="full")
    message = check(method="qlora", qlora_bits=8, qlora_quant_type="fp4")
    assert "--qlora_bits 8, --qlora_quant_type fp4: bitsandbytes settings" in message and "do not apply" in message
    assert "--use_dora: DoRA" in check(method="qlora", use_dora=True)
    (tmp_path / "ds.json").write_text("{}")
    assert "--deepspeed: --base_model" in check(method="prefix", deepspeed=str(tmp_path / "ds.json"))


def test_finetune_checks_a_gptq_folder_as_the_loader_does(gptq_base, stories_data, tmp_path):
    """A standard AutoGPTQ folder names its weights after the model: accepted; a truncated one is refused."""
    other = tmp_path / "autogptq"
    shutil.copytree(gptq_base, other)
    (other / "model.safetensors").rename(other / "gptq_model-4bit-32g.safetensors")
    assert problems(other, stories_data, tmp_path, method="qlora") == ""
    data = (other / "gptq_model-4bit-32g.safetensors").read_bytes()
    (other / "gptq_model-4bit-32g.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in problems(other, stories_data, tmp_path, method="qlora")


def test_a_seed_quantized_folder_is_not_a_training_base(gptq_base, stories_data, tmp_path):
    other = tmp_path / "rowwise"
    shutil.copytree(gptq_base, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "chatglm_rowwise", "bits": 8}
    (other / "config.json").write_text(json.dumps(config))
    (other / "quantize_config.json").unlink()
    assert "trains adapters on GPTQ and bitsandbytes folders only" in problems(other, stories_data, tmp_path,
                                                                              method="prefix")


def test_load_base_model_refuses_a_gptq_folder_by_name(gptq_base):
    from utils.quant.adapters import TRAINABLE_FORMATS
    from utils.quant.checkpoint import BITSANDBYTES, QUANTIZED_FORMATS
    from utils.training.methods import QUANTIZED_BASES
    from utils.weights.pretrained import SUITE_QUANTIZED, load_base_model, stored_quantization

    # The names kept where torch is not imported agree with the quantization package's own.
    assert set(SUITE_QUANTIZED) == set(QUANTIZED_FORMATS) - {BITSANDBYTES}
    assert set(QUANTIZED_BASES) == set(TRAINABLE_FORMATS)
    assert stored_quantization(str(gptq_base)) == "gptq"
    with pytest.raises(SuiteError, match="is a gptq quantized folder.*load_quantized_base"):
        load_base_model(str(gptq_base))


def test_layer_shapes_unpack_the_gptq_layers(gptq_base, fp_base):
    from utils.quant.adapters import layer_shapes

    assert layer_shapes(gptq_base) == layer_shapes(fp_base)
    assert layer_shapes(gptq_base)["model.layers.0.mlp.gate_proj"] == (128, 64)


# -- a pre-quantized bitsandbytes base -------------------------------------------------------------------------


def test_qlora_on_a_prequantized_bitsandbytes_folder(fp_base, tmp_path, stories_data):
    from utils.quant.adapters import load_quantized_base, quantized_base_summary
    from utils.quant.bnb import write_bnb
    from utils.training.methods import MethodArgs, prepare_model

    folder = tmp_path / "bnb"
    write_bnb(fp_base, folder, "nf4")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(fp_base / name, folder / name)
    assert "--qlora_bits 8" in problems(folder, stories_data, tmp_path, method="qlora", qlora_bits=8)
    assert problems(folder, stories_data, tmp_path, method="qlora") == ""

    model = prepare_model(load_quantized_base(folder), MethodArgs(method="qlora", lora_dropout=0.0))
    summary = quantized_base_summary(model)
    assert summary["base"] == "bnb-nf4" and summary["quantized_layers"] == 14 == summary["lora_layers"]
    ids = tokens(16, 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses


# -- the shell pipeline ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quantize_py_then_finetune_py_qlora_as_a_shell_script_runs_them(fp_base, stories_data, tmp_path):
    """Slow: quantize.py and finetune.py as subprocesses (each imports torch, transformers and peft; quantize.py
    also measures perplexity twice), then the logits check of the trained adapter."""
    from peft import PeftModel

    from utils.quant.adapters import attach_adapter

    story = DATA / "tinystories" / "valid_sample.jsonl"
    gptq, out = tmp_path / "gptq", tmp_path / "qlora"
    proc = subprocess.run([sys.executable, "quantize.py", "--base_model", str(fp_base), "--output_dir", str(gptq),
                           "--method", "rtn", "--bits", "4", "--group_size", "32", "--data_path", str(story),
                           "--nsamples", "4", "--seqlen", "32", "--noprogress"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "finetune.py", "--base_model", str(gptq), "--data_path", str(stories_data),
                           "--output_dir", str(out), "--method", "qlora", *TRAIN_FLAGS],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out.absolute())
    assert "is already quantized (gptq-4bit)" in proc.stderr and "do not apply" in proc.stderr
    losses = step_losses(out)
    assert losses[-1] < losses[0] - 0.1, losses
    assert json.loads((out / "pipeline.json").read_text())["quantization"]["quantized_layers"] == 14

    ids = tokens()
    with torch.no_grad():
        want = PeftModel.from_pretrained(dequantized_fp_model(fp_base, gptq), str(out)).eval()(input_ids=ids).logits
        got = attach_adapter(gptq_model(gptq), out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
