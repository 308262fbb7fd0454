"""export_hf.py: merges of every LoRA variant on llama (GQA), qwen2 and gpt2 built from configs and on
stories260K, checked against peft's own base + adapter logits in plain transformers; refusals; atomicity.

The model and adapter builders here are shared with test_export_state_dict.py and test_delta.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXPORT_SHAPE, REPO, STORIES, gsm8k_rows, prepare_gsm8k, tiny_model
from utils.errors import SuiteError
from utils.cli import run

PROMPT = [[1, 17, 250, 3, 99, 411, 7]]




def make_adapter(base: Path, out: Path, seed: int = 1, scale: float = 0.05, **lora) -> Path:
    """A plain-peft LoRA adapter with random non-zero A and B (a fresh LoRA is zero and merges to the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora}
    peft_model = get_peft_model(model, LoraConfig(**kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out))
    return out


def peft_logits(base: Path, adapter: Path | None, ids=PROMPT):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(ids)).logits[0]


def hf_logits(folder: Path, ids=PROMPT):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(ids)).logits[0]


def call(main, argv) -> None:
    """Run a stage's main() as its command line binds it, letting SuiteError through (run() would exit)."""
    from utils.cli import bind_args

    main(**bind_args(main, list(argv)))


_BASE_LOGITS: dict = {}


def base_logits(folder: Path):
    if folder not in _BASE_LOGITS:
        _BASE_LOGITS[folder] = hf_logits(folder)
    return _BASE_LOGITS[folder]


def export(*argv: str) -> None:
    import export_hf

    call(export_hf.main, argv)


@pytest.fixture(scope="module")
def models(tmp_path_factory, bpe_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"llama": tiny_model("llama", root / "llama", STORIES, tie_word_embeddings=False, **EXPORT_SHAPE),
            "qwen2": tiny_model("qwen2", root / "qwen2", bpe_tokenizer_dir, **EXPORT_SHAPE),
            "gpt2": tiny_model("gpt2", root / "gpt2", bpe_tokenizer_dir, token_ids=True, **EXPORT_SHAPE)}


CASES = [
    ("llama", {}), ("llama", {"use_dora": True}), ("llama", {"use_rslora": True, "r": 8}),
    ("llama", {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
    ("llama", {"target_modules": ["q_proj", "down_proj"], "rank_pattern": {"down_proj": 2},
               "alpha_pattern": {"down_proj": 32}, "modules_to_save": ["lm_head"]}),
    ("qwen2", {"use_dora": True}), ("qwen2", {"bias": "all"}),
    ("gpt2", {}), ("gpt2", {"use_dora": True}),
]


@pytest.mark.parametrize("kind,lora", CASES, ids=[f"{k}-{'-'.join(v) or 'lora'}" for k, v in CASES])
def test_merge_matches_peft_base_plus_adapter(tmp_path, models, kind, lora):
    base = models[kind]
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    out = tmp_path / "merged"
    export("--base_model", str(base), "--lora_weights", str(adapter), "--output_dir", str(out), "--max_shard_size", "40KB")
    ref, merged, plain = peft_logits(base, adapter), hf_logits(out), base_logits(base)
    scale = float(ref.abs().max())
    assert float((merged - ref).abs().max()) <= 1e-5 * max(scale, 1.0)
    assert float((plain - ref).abs().max()) > 1e-3  # the adapter matters, so the check_jinja above means something
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in names and len(list(out.glob("model-*.safetensors"))) > 1
    assert {"config.json", "pipeline.json"} <= names and (names & {"tokenizer.json", "vocab.json"})
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["stage"] == "export_hf" and meta["complete"] and meta["kind"] == "merged"
    v = meta["verification"]
    assert v["method"] == "layer-by-layer from disk" and v["rel_diff"] <= 1e-5 and v["merged_tensors"] > 0
    assert meta["lora_weights"]["use_dora"] == bool(lora.get("use_dora"))
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob(".merged*"))


def test_layerwise_forward_equals_transformers(tmp_path, models):
    """The bounded verification's forward pass is the models' own forward (llama GQA, qwen2, gpt2, stories260K)."""
    from utils.weights import forward
    from utils.weights.config import read_config
    from utils.weights.shards import ModelWeights

    llama31 = tiny_model("llama", tmp_path / "llama31", STORIES, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, **EXPORT_SHAPE)
    for folder in [*models.values(), STORIES, llama31]:
        config = read_config(folder, "x")
        got = forward.logits(config, forward.WeightSource(ModelWeights(folder)), PROMPT[0])
        ref = base_logits(folder)
        assert float((got - ref).abs().max()) <= 1e-4 * max(float(ref.abs().max()), 1.0), folder


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A real finetune.py LoRA run on stories260K (DoRA, all linear layers, a few steps)."""
    import finetune as ft

    root = tmp_path_factory.mktemp("tuned")
    data = prepare_gsm8k(root, gsm8k_rows(24), "--cutoff_len", "256", "--val_set_size", "0")
    out = root / "lora"
    run(ft.main, ["--base_model", str(STORIES), "--data_path", str(data), "--output_dir", str(out), "--max_steps", "2",
                  "--batch_size", "8", "--micro_batch_size", "8", "--learning_rate", "1e-2", "--use_dora",
                  "--logging_steps", "0", "--notensorboard"])
    return out


def test_finetune_output_exports_with_base_from_metadata(tmp_path, tuned, capsys):
    """Base read from pipeline.json; bf16; tokenizer and the training template carried (as chat template too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.data.templates import Message, load_template

    out = tmp_path / "merged"
    export("--lora_weights", str(tuned), "--output_dir", str(out), "--dtype", "bf16")
    assert capsys.readouterr().out.strip() == str(out.absolute())
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.dtype == torch.bfloat16
    ref = peft_logits(STORIES, tuned)
    got = hf_logits(out)
    assert float((got - ref).abs().max()) <= 5e-2 * float(ref.abs().max())
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["base_model"]["path"] == str(STORIES) and meta["dtype"] == "bf16"
    assert meta["source_finetune"]["path"] == str(tuned.absolute()) and meta["template"]["chat_template"]
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    template = load_template("alpaca")
    assert json.loads((out / "template.json").read_text())["name"] == "alpaca"
    messages = [{"role": "user", "content": "How many legs has a cat?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        template.render([Message("user", "How many legs has a cat?")], add_generation_prompt=True).text
    # Same inputs again: a no-op that leaves the folder untouched.
    stamp = (out / "pipeline.json").stat().st_mtime_ns
    export("--lora_weights", str(tuned), "--output_dir", str(out), "--dtype", "bf16")
    assert "nothing to do" in capsys.readouterr().err and (out / "pipeline.json").stat().st_mtime_ns == stamp
    # Different flags: needs --overwrite.
    with pytest.raises(SuiteError, match="--overwrite"):
        export("--lora_weights", str(tuned), "--output_dir", str(out), "--dtype", "fp32")
    export("--lora_weights", str(tuned), "--output_dir", str(out), "--dtype", "fp32", "--overwrite")
    assert json.loads((out / "pipeline.json").read_text())["dtype"] == "fp32"


def test_full_finetune_folder_is_resharded_with_its_template(tmp_path, tuned):
    import finetune as ft

    full = tmp_path / "full"
    run(ft.main, ["--base_model", str(STORIES), "--data_path", str(tuned.parent / "prepared"), "--output_dir", str(full),
                  "--method", "full", "--max_steps", "1", "--batch_size", "8", "--micro_batch_size", "8",
                  "--logging_steps", "0", "--notensorboard"])
    out = tmp_path / "bf16"
    export("--lora_weights", str(full), "--output_dir", str(out), "--dtype", "bf16")
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["kind"] == "resharded" and meta["template"]["chat_template"] and (out / "chat_template.jinja").is_file()
    ref = hf_logits(full)
    assert float((hf_logits(out) - ref).abs().max()) <= 5e-2 * float(ref.abs().max())
    assert float((ref - base_logits(STORIES)).abs().max()) > 1e-4  # the run changed the model


def test_other_architectures_are_verified_through_transformers(tmp_path, bpe_tokenizer_dir):
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    base = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=len(tok), word_embed_proj_dim=32, max_position_embeddings=64)) \
        .save_pretrained(str(base))
    tok.save_pretrained(str(base))
    adapter = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj", "fc1"])
    out = tmp_path / "merged"
    export("--base_model", str(base), "--lora_weights", str(adapter), "--output_dir", str(out))
    assert json.loads((out / "pipeline.json").read_text())["verification"]["method"] == "transformers (whole models)"
    ref = peft_logits(base, adapter)
    assert float((hf_logits(out) - ref).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1.0)


def test_wrong_base_for_a_finetune_is_refused(tmp_path, tuned, models):
    with pytest.raises(SuiteError, match="not the model"):
        export("--lora_weights", str(tuned), "--base_model", str(models["llama"]), "--output_dir", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_full_model_is_resharded_and_retyped(tmp_path, models):
    import torch

    out = tmp_path / "bf16"
    export("--base_model", str(models["qwen2"]), "--output_dir", str(out), "--dtype", "bf16", "--max_shard_size", "30KB")
    from utils.weights.shards import ModelWeights

    src, dst = ModelWeights(models["qwen2"]), ModelWeights(out)
    assert set(src.entries) == set(dst.entries) and len(dst.files) > 1
    for f in dst.files:  # each shard within the limit, unless it holds one larger tensor
        held = [e for e in dst.entries.values() if e.path == f]
        assert sum(e.nbytes for e in held) <= 30_000 or len(held) == 1
    for name in src.entries:
        assert torch.equal(dst.get(name), src.get(name).to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = tmp_path / "fp32"
    export("--base_model", str(models["qwen2"]), "--output_dir", str(back), "--dtype", "fp32", "--max_shard_size", "1GB")
    assert [p.name for p in back.glob("*.safetensors")] == ["model.safetensors"]
    assert torch.equal(hf_logits(back), hf_logits(models["qwen2"]))


def test_unmergeable_and_empty_adapters_are_refused(tmp_path, models):
    import torch
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = models["llama"]
    prefix = tmp_path / "prefix"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    model.save_pretrained(str(prefix))
    with pytest.raises(SuiteError, match="cannot be merged.*--adapter_only"):
        export("--base_model", str(base), "--lora_weights", str(prefix), "--output_dir", str(tmp_path / "o"))
    export("--base_model", str(base), "--lora_weights", str(prefix), "--output_dir", str(tmp_path / "a"), "--adapter_only")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and (tmp_path / "a" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "a" / "pipeline.json").read_text())["kind"] == "adapter"

    fresh = tmp_path / "fresh"  # lora_B starts at zero: merging changes nothing
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(r=4, target_modules=["q_proj"])) \
        .save_pretrained(str(fresh))
    with pytest.raises(SuiteError, match="changes nothing"):
        export("--base_model", str(base), "--lora_weights", str(fresh), "--output_dir", str(tmp_path / "o"))

    empty = tmp_path / "empty"  # alpaca-lora's 443-byte adapter_model.bin: a pickled empty dict
    empty.mkdir()
    (empty / "adapter_config.json").write_text((fresh / "adapter_config.json").read_text())
    torch.save({}, empty / "adapter_model.bin")
    with pytest.raises(SuiteError, match="--allow_pickle_weights"):
        export("--base_model", str(base), "--lora_weights", str(empty), "--output_dir", str(tmp_path / "o"))
    with pytest.raises(SuiteError, match="no tensors at all"):
        export("--base_model", str(base), "--lora_weights", str(empty), "--output_dir", str(tmp_path / "o"),
               "--allow_pickle_weights")
    assert not (tmp_path / "o").exists()


def test_destination_rules(tmp_path, models, capsys):
    base = models["llama"]
    adapter = make_adapter(base, tmp_path / "ad")
    for dest in (base, adapter, base.parent):
        with pytest.raises(SuiteError, match="choose another destination"):
            export("--base_model", str(base), "--lora_weights", str(adapter), "--output_dir", str(dest))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SuiteError, match="not written by this suite"):
        export("--base_model", str(base), "--lora_weights", str(adapter), "--output_dir", str(other))
    with pytest.raises(SuiteError, match="did you mean --lora_weights"):
        export("--base_model", str(base), "--lora_weight", str(adapter), "--output_dir", str(tmp_path / "x"))


@pytest.mark.slow
def test_kill_during_export_leaves_no_destination(tmp_path, models):
    """Slow: A real export_hf.py subprocess has to be killed in the middle of writing shards."""
    base = models["llama"]
    adapter = make_adapter(base, tmp_path / "ad")
    out = tmp_path / "merged"
    cmd = [sys.executable, str(REPO / "export_hf.py"), "--base_model", str(base), "--lora_weights", str(adapter),
           "--output_dir", str(out), "--max_shard_size", "40KB"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "SUITE_TEST_WRITE_DELAY": "0.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".merged.tmp-*/model-*.safetensors")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".merged.tmp-*/model-*.safetensors")), "the export never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "pipeline.json").is_file() and not list(tmp_path.glob(".merged.tmp-*"))  # stale staging swept


def test_pickle_base_needs_opt_in(tmp_path, models):
    import shutil

    import torch

    from utils.weights.shards import ModelWeights

    base = tmp_path / "pickled"
    base.mkdir()
    src = ModelWeights(models["llama"])
    torch.save({n: src.get(n) for n in src.names()}, base / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(models["llama"] / name, base / name)
    with pytest.raises(SuiteError, match="--allow_pickle_weights"):
        export("--base_model", str(base), "--output_dir", str(tmp_path / "o"))
    export("--base_model", str(base), "--output_dir", str(tmp_path / "o"), "--allow_pickle_weights")
    assert torch.equal(hf_logits(tmp_path / "o"), hf_logits(models["llama"]))


def test_shard_writer_and_reader_agree_with_safetensors(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from utils.weights.shards import ModelWeights, ShardWriter, read_header

    tensors = {"a": torch.randn(5, 3), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16),
               "d": torch.zeros(0, 3), "e": torch.tensor(2.5)}
    w = ShardWriter(tmp_path, [(n, {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}[t.dtype], t.shape)
                               for n, t in tensors.items()], max_shard_size=40)
    w.write("a", tensors["a"][:2])
    w.write("a", tensors["a"][2:])
    for n in "bcde":
        w.write(n, tensors[n])
    hashes = w.close()
    assert len(hashes) > 2  # several shards + the index
    loaded = {}
    for f in sorted(tmp_path.glob("model-*.safetensors")):
        loaded.update(load_file(str(f)))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    save_file(tensors, str(tmp_path / "lib.safetensors"))
    entries, _ = read_header(tmp_path / "lib.safetensors")
    from utils.weights.shards import read_entry

    assert all(torch.equal(read_entry(entries[n]), tensors[n]) for n in tensors)
    # Damaged files give a clear error, never a crash.
    raw = (tmp_path / "lib.safetensors").read_bytes()
    for bad in (raw[:5], raw[:-3], b"\xff" * 8 + raw[8:], raw[:8] + b"[" + raw[9:]):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        with pytest.raises(SuiteError, match="not a valid safetensors file"):
            read_header(tmp_path / "bad.safetensors")
    assert ModelWeights(tmp_path).total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_every_builtin_template_becomes_an_equivalent_chat_template():
    from utils.data.chat_template import check_jinja, to_jinja
    from utils.data.templates import available_templates, load_template

    for name in available_templates():
        if name == "tokenizer":
            continue
        template = load_template(name)
        assert check_jinja(template, to_jinja(template)) is None, name
