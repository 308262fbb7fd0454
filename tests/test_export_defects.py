"""Defects of the export stages found by a new user (issue 11): a wrong base refused before any merge work,
messages that are true for every format, Hub ids, Meta's params.json and tokenizer.model, clean errors for
incomplete input folders (run as the command line runs them), and the bounded memory of a merge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from conftest import EXPORT_SHAPE, REPO, STORIES, tiny_model
from test_export import call, export, hf_logits, make_adapter
from utils.errors import SuiteError, UsageError

SPM = STORIES.parent / "tok512.model"  # stories260K's SentencePiece model (its hf folder has no tokenizer.model)


def sd(*argv: str) -> None:
    import export_state_dict

    call(export_state_dict.main, argv)


def delta(*argv: str) -> None:
    import apply_delta

    call(apply_delta.main, argv)


def stage(script: str, *argv: str) -> subprocess.CompletedProcess:
    """A stage run as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def tensors(folder: Path) -> dict:
    from utils.weights.shards import ModelWeights

    w = ModelWeights(folder)
    return {n: w.get(n) for n in w.names()}


def perturbed_copy(src: Path, dst: Path) -> Path:
    """The same model folder (config, tokenizer, file names and sizes) with one weight changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] + 0.5
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    assert (dst / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    return dst


def finetune_like(base: Path, out: Path) -> Path:
    """A folder as finetune.py leaves it: a LoRA adapter with the tokenizer and a complete pipeline.json that
    records the base's path and fingerprint (what export_hf reads from a fine-tune)."""
    from utils.artifacts import base_fingerprint
    from utils.artifacts import finish_meta

    make_adapter(base, out, target_modules=["q_proj", "v_proj"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / name, out / name)
    finish_meta(out, {"stage": "finetune", "fingerprint": "0" * 64, "method": "lora",
                      "base_model": {"path": str(base), "fingerprint": base_fingerprint(str(base))}})
    return out


# --------------------------------------------------------------------------------------------------
# Item 7: a wrong base is refused before the merge; messages true for the format; Hub ids


def test_wrong_base_with_the_same_config_is_refused_before_any_merge_work(tmp_path, monkeypatch, capsys):
    import utils.weights.shards

    tuned = finetune_like(STORIES, tmp_path / "tuned")
    wrong = perturbed_copy(STORIES, tmp_path / "wrong")  # same config.json: only the weights tell them apart

    class NoWriting(utils.weights.shards.ShardWriter):
        def __init__(self, *a, **k):
            raise AssertionError("the merge started before the base was checked")

    monkeypatch.setattr(utils.weights.shards, "ShardWriter", NoWriting)
    out = tmp_path / "merged"
    with pytest.raises(SuiteError, match="not the model .* was trained on"):
        export("--lora_weights", str(tuned), "--base_model", str(wrong), "--output_dir", str(out))
    err = capsys.readouterr().err
    assert "verified" not in err and "merging" not in err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_the_recorded_base_changed_since_training_is_refused_first(tmp_path, monkeypatch):
    """No --base_model: the base recorded in pipeline.json is used, and checked against its recorded weights."""
    import utils.weights.shards

    base = perturbed_copy(STORIES, tmp_path / "base")
    tuned = finetune_like(base, tmp_path / "tuned")
    perturbed_copy(STORIES, tmp_path / "other")
    shutil.copyfile(STORIES / "model.safetensors", base / "model.safetensors")  # the base changed after training
    monkeypatch.setattr(utils.weights.shards, "ShardWriter", None)  # any merge work would fail with a TypeError
    with pytest.raises(SuiteError, match="not the model"):
        export("--lora_weights", str(tuned), "--output_dir", str(tmp_path / "merged"))


def test_export_messages_are_true_for_every_format(tmp_path, capsys):
    sd("--base_model", str(STORIES), "--output_dir", str(tmp_path / "c"), "--format", "llama2c")
    err = capsys.readouterr().err
    assert "shard" not in err and "within 0 of" not in err, err
    assert "model.bin" in err and "exactly" in err
    sd("--base_model", str(STORIES), "--output_dir", str(tmp_path / "m"), "--num_shards", "2")
    err = capsys.readouterr().err
    assert "2 shards" in err and "within 0 of" not in err, err
    export("--base_model", str(STORIES), "--output_dir", str(tmp_path / "h"))
    err = capsys.readouterr().err
    assert "within 0 of" not in err and "exactly" in err, err
    export("--base_model", str(STORIES), "--output_dir", str(tmp_path / "b"), "--dtype", "bf16")
    assert "within 0 of" not in (err := capsys.readouterr().err) and "of their scale" in err, err


@pytest.mark.parametrize("argv", [
    ("export_hf", "--base_model", "meta-llama/Llama-2-7b-hf"),
    ("export_hf", "--base_model", str(STORIES), "--lora_weights", "tloen/alpaca-lora-7b"),
    ("export_state_dict", "--base_model", "meta-llama/Llama-2-7b-hf"),
    ("export_state_dict", "--base_model", str(STORIES), "--lora_weights", "tloen/alpaca-lora-7b"),
    ("apply_delta", "apply", "--base_model_path", "huggyllama/llama-7b", "--delta_path", "lmsys/vicuna-7b-delta-v1.1"),
], ids=["hf-base", "hf-lora", "sd-base", "sd-lora", "delta"])
def test_a_hub_id_is_told_that_nothing_is_downloaded(tmp_path, argv):
    import importlib

    name, *rest = argv
    out = ["--target_model_path" if name == "apply_delta" else "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UsageError, match="never download") as info:
        call(importlib.import_module(name).main, [*rest, *out])
    hub = next(a for a in rest if "/" in a and not a.startswith("/"))
    assert hub in str(info.value)


# --------------------------------------------------------------------------------------------------
# Item 11: Meta's params.json and tokenizer.model


@dataclass
class Llama2ModelArgs:
    """The fields of Llama 2's ``ModelArgs`` (meta-llama/llama, llama/model.py). Its loader builds
    ``ModelArgs(max_seq_len=..., max_batch_size=..., **params)``, so any other key in params.json is a TypeError."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    max_batch_size: int = 32
    max_seq_len: int = 2048


def test_params_json_loads_in_llama2_and_keeps_a_non_default_rope_theta(tmp_path):
    import torch

    out = tmp_path / "meta"
    sd("--base_model", str(STORIES), "--output_dir", str(out))
    params = json.loads((out / "params.json").read_text())
    assert "rope_theta" not in params  # 10000: Llama 2's own value, and a key its ModelArgs rejects
    Llama2ModelArgs(max_seq_len=512, max_batch_size=1, **params)
    # Imported without our pipeline.json (a folder as Meta ships it): rope theta 10000 by default, exact weights.
    (out / "pipeline.json").unlink()
    back = tmp_path / "back"
    sd("--base_model", str(out), "--output_dir", str(back), "--allow_pickle_weights")
    assert json.loads((back / "config.json").read_text())["rope_parameters"]["rope_theta"] == 10000.0
    a, b = tensors(STORIES), tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(hf_logits(back), hf_logits(STORIES))

    llama3 = tiny_model("llama", tmp_path / "l3", STORIES, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 500000.0}, **EXPORT_SHAPE)
    out3, back3 = tmp_path / "meta3", tmp_path / "back3"
    sd("--base_model", str(llama3), "--output_dir", str(out3))
    assert json.loads((out3 / "params.json").read_text())["rope_theta"] == 500000.0  # Llama 3 style
    (out3 / "pipeline.json").unlink()
    sd("--base_model", str(out3), "--output_dir", str(back3), "--allow_pickle_weights")
    assert json.loads((back3 / "config.json").read_text())["rope_parameters"]["rope_theta"] == 500000.0
    assert float((hf_logits(back3) - hf_logits(llama3)).abs().max()) <= 1e-5


def test_tokenizer_model_is_copied_beside_the_consolidated_shards(tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(STORIES, base)
    shutil.copyfile(SPM, base / "tokenizer.model")
    # A fine-tune's folder carries the fast tokenizer (tokenizer.json) only: the SentencePiece model is the base's.
    adapter = make_adapter(base, tmp_path / "ad", target_modules=["q_proj"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / name, adapter / name)
    out = tmp_path / "meta"
    sd("--base_model", str(base), "--lora_weights", str(adapter), "--output_dir", str(out), "--num_shards", "2")
    assert (out / "tokenizer.model").read_bytes() == SPM.read_bytes()
    assert {"consolidated.00.pth", "consolidated.01.pth", "params.json"} <= {p.name for p in out.iterdir()}
    assert "tokenizer.model" in json.loads((out / "pipeline.json").read_text())["tokenizer"]
    capsys.readouterr()
    # Without one anywhere (stories260K's hf folder), the export says so instead of leaving it out silently.
    sd("--base_model", str(STORIES), "--output_dir", str(tmp_path / "plain"))
    assert "tokenizer.model" in capsys.readouterr().err
    assert not (tmp_path / "plain" / "tokenizer.model").exists()


# --------------------------------------------------------------------------------------------------
# Item 4: incomplete input folders give a clean error (exit 1, no traceback) naming the folder and what is missing


def broken_model(root: Path, defect: str) -> Path:
    folder = root / "model"  # a name that says nothing: the message must say what is wrong
    shutil.copytree(STORIES, folder)
    config = json.loads((STORIES / "config.json").read_text())
    if defect == "no_config":
        (folder / "config.json").unlink()
    elif defect == "no_weights":
        (folder / "model.safetensors").unlink()
    elif defect == "truncated":  # a copy cut off half way
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate((folder / "model.safetensors").stat().st_size // 2)
    elif defect == "config_keys":
        del config["hidden_size"], config["num_hidden_layers"]
    elif defect == "no_model_type":
        del config["model_type"]
    if defect in ("config_keys", "no_model_type"):
        (folder / "config.json").write_text(json.dumps(config))
    return folder


MODEL_DEFECTS = {"no_config": "config.json", "no_weights": "no weights", "truncated": "truncated",
                 "config_keys": "hidden_size", "no_model_type": "model_type"}


def clean_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.split("error:", 1)[-1]
    for w in words:
        assert w in last, (w, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def stories_delta(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sd") / "delta"
    delta("make", "--base_model_path", str(STORIES), "--target_model_path", str(STORIES), "--delta_path", str(d))
    return d


USES = {  # what each stage does with the model folder: every defect matters, except a config the stage never reads
    "export_hf": MODEL_DEFECTS, "export_state_dict": MODEL_DEFECTS, "make_target": MODEL_DEFECTS,
    "make_base": ("no_config", "no_weights", "truncated"), "apply_base": ("no_config", "no_weights", "truncated"),
}


@pytest.mark.parametrize("use,defect", [(u, d) for u, ds in USES.items() for d in ds])
@pytest.mark.slow
def test_an_incomplete_model_folder_is_a_clean_error(tmp_path, stories_delta, use, defect):
    """Slow: export subprocesses, one per kind of damaged folder."""
    folder, out = broken_model(tmp_path, defect), tmp_path / "out"
    argv = {
        "export_hf": ("export_hf.py", "--base_model", folder, "--output_dir", out),
        "export_state_dict": ("export_state_dict.py", "--base_model", folder, "--output_dir", out),
        "make_target": ("apply_delta.py", "make", "--base_model_path", STORIES, "--target_model_path", folder,
                        "--delta_path", out),
        "make_base": ("apply_delta.py", "make", "--base_model_path", folder, "--target_model_path", STORIES,
                      "--delta_path", out),
        "apply_base": ("apply_delta.py", "apply", "--base_model_path", folder, "--delta_path", stories_delta,
                       "--target_model_path", out),
    }[use]
    clean_error(stage(*argv), str(folder), MODEL_DEFECTS[defect])
    assert not out.exists()


def test_an_incomplete_delta_folder_is_a_clean_error(tmp_path, stories_delta):
    for defect, word in (("no_config", "config.json"), ("truncated", "truncated"), ("no_weights", "no weights")):
        d = tmp_path / f"delta{len(list(tmp_path.iterdir()))}"
        shutil.copytree(stories_delta, d)
        weights = d / "model.safetensors"
        if defect == "no_config":
            (d / "config.json").unlink()
        elif defect == "no_weights":
            weights.unlink()
        else:
            with open(weights, "r+b") as f:
                f.truncate(weights.stat().st_size // 2)
        out = tmp_path / "out"
        clean_error(stage("apply_delta.py", "apply", "--base_model_path", STORIES, "--delta_path", d,
                          "--target_model_path", out), str(d), word)
        assert not out.exists()


@pytest.fixture(scope="module")
def stories_adapter(tmp_path_factory) -> Path:
    return make_adapter(STORIES, tmp_path_factory.mktemp("ad") / "adapter", target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("script", ["export_hf.py", "export_state_dict.py"])
@pytest.mark.parametrize("defect,word", [("no_adapter_weights", "adapter_model.safetensors"),
                                         ("truncated", "truncated"), ("no_adapter_config", "adapter_config.json")])
def test_an_incomplete_adapter_folder_is_a_clean_error(tmp_path, stories_adapter, script, defect, word):
    ad = tmp_path / "adapter"
    shutil.copytree(stories_adapter, ad)
    weights = ad / "adapter_model.safetensors"
    if defect == "no_adapter_weights":
        weights.unlink()
    elif defect == "no_adapter_config":
        (ad / "adapter_config.json").unlink()
    else:
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    out = tmp_path / "out"
    clean_error(stage(script, "--base_model", STORIES, "--lora_weights", ad, "--output_dir", out), str(ad), word)
    assert not out.exists()


def test_a_folder_without_a_tokenizer_is_exported_with_a_warning_naming_it(tmp_path, capsys):
    """An export does not need a tokenizer (the weights are the work), so it is not an error; but the output
    cannot be used to generate or fine-tune without one, and the warning says where none was found."""
    folder = tmp_path / "model"
    shutil.copytree(STORIES, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    runs = [(export, ()), (sd, ("--format", "llama2c")), (sd, ())]
    for i, (fn, extra) in enumerate(runs):
        fn("--base_model", str(folder), "--output_dir", str(tmp_path / f"out{i}"), *extra)
        err = capsys.readouterr().err
        warning = [line for line in err.splitlines() if "warning" in line and "tokenizer" in line]
        assert len(warning) == 1 and str(folder) in warning[0], err
    sd("--base_model", str(tmp_path / "out1" / "model.bin"), "--output_dir", str(tmp_path / "imported"))
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning and "--tokenizer" in warning[0] and str(tmp_path / "out1") in warning[0]


# --------------------------------------------------------------------------------------------------
# README claim: the merge's peak memory is bounded by the largest tensor, not the model

MEMORY_SCRIPT = r"""
import json, os, resource, sys, traceback

# The work runs in a forked worker, and its peak is read with getrusage(RUSAGE_CHILDREN) once it has exited:
# this process was started from pytest's, and Linux carries the starting process's high-water mark into a new
# program's own ru_maxrss (fork + exec), so the test's own memory would be counted. A fork starts afresh.
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        sys.path.insert(0, sys.argv[1])
        import export_hf
        from utils.cli import bind_args

        def export(*argv):
            export_hf.main(**bind_args(export_hf.main, list(argv)))

        def high_water_kb():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

        # A first export of a tiny model does every lazy import and one-off allocation of the code path.
        export("--base_model", sys.argv[2], "--lora_weights", sys.argv[3], "--output_dir", sys.argv[4])
        os.write(write_end, str(high_water_kb()).encode())
        export("--base_model", sys.argv[5], "--lora_weights", sys.argv[6], "--output_dir", sys.argv[7])
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
os.close(write_end)
baseline = int(os.read(read_end, 64) or 0)
_, status = os.waitpid(pid, 0)
if status:
    sys.exit(1)
print(json.dumps({"baseline_kb": baseline, "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def write_llama(folder: Path, dim: int, hidden: int, layers: int, vocab: int, heads: int = 8) -> int:
    """A random fp32 Llama (untied) written straight to safetensors, one file per layer; returns the largest
    tensor's size in bytes. Written without transformers, so the test itself never holds the model."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
              "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    weight_map, largest = {}, 0

    def save(name: str, state: dict) -> None:
        nonlocal largest
        save_file(state, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
        largest = max([largest] + [t.numel() * 4 for t in state.values()])

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    save("embed.safetensors", {"model.embed_tokens.weight": rand(vocab, dim)})
    for i in range(layers):
        p = f"model.layers.{i}."
        save(f"layer{i}.safetensors", {
            **{p + f"self_attn.{m}.weight": rand(dim, dim) for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
            p + "mlp.gate_proj.weight": rand(hidden, dim), p + "mlp.up_proj.weight": rand(hidden, dim),
            p + "mlp.down_proj.weight": rand(dim, hidden),
            p + "input_layernorm.weight": torch.ones(dim), p + "post_attention_layernorm.weight": torch.ones(dim)})
    save("head.safetensors", {"model.norm.weight": torch.ones(dim), "lm_head.weight": rand(vocab, dim)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return largest


def write_lora(folder: Path, base: Path, dim: int, hidden: int, layers: int, vocab: int, r: int = 8) -> int:
    """A PEFT LoRA adapter on every linear layer and the output head (the largest tensor); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "target_modules": modules,
        "fan_in_fan_out": False, "base_model_name_or_path": str(base)}))
    gen = torch.Generator().manual_seed(1)
    shapes = {"q_proj": (dim, dim), "k_proj": (dim, dim), "v_proj": (dim, dim), "o_proj": (dim, dim),
              "gate_proj": (hidden, dim), "up_proj": (hidden, dim), "down_proj": (dim, hidden)}
    state = {}

    def add(module: str, out_in) -> None:
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, out_in[1], generator=gen) * 0.02
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_in[0], r, generator=gen) * 0.02

    for i in range(layers):
        for m, shape in shapes.items():
            add(f"model.layers.{i}.{'self_attn' if m.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{m}",
                shape)
    add("lm_head", (vocab, dim))
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * 4 for t in state.values())


@pytest.mark.slow
def test_merge_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """README: the peak is one weight matrix plus the adapter, whatever the model size. Measured as the peak
    resident size (ru_maxrss) of a process that merges a ~375 MB model whose largest tensor is 32 MiB: it stays
    below the interpreter's own high-water mark + 3x the largest tensor + the adapter, a bound that a merge
    holding the model (or a fraction of it) would break.
    Slow: The merge runs in a subprocess whose peak memory is measured: large enough tensors to measure."""
    shape = {"dim": 1024, "hidden": 2816, "layers": 6, "vocab": 8192}
    tiny = {"dim": 64, "hidden": 128, "layers": 1, "vocab": 256}
    write_llama(tmp_path / "tiny", **tiny)
    write_lora(tmp_path / "tiny_ad", tmp_path / "tiny", **tiny)
    largest = write_llama(tmp_path / "big", **shape)
    adapter = write_lora(tmp_path / "big_ad", tmp_path / "big", **shape)
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert model_bytes > 8 * largest  # the model is much more than the bound allows
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(REPO), str(tmp_path / "tiny"), str(tmp_path / "tiny_ad"),
                           str(tmp_path / "tiny_out"), str(tmp_path / "big"), str(tmp_path / "big_ad"),
                           str(tmp_path / "big_out")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "big_out" / "pipeline.json").read_text())["verification"]["merged_tensors"] == 43
    bound_kb = got["baseline_kb"] + (3 * largest + adapter) // 1024
    assert got["peak_kb"] < bound_kb, (got, f"bound {bound_kb} kB (largest tensor {largest >> 20} MiB)")
