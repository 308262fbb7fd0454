"""finetune.py on the real stories260K model and real GSM8K rows: learning, resume, artifacts, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_SETS, REPO, STORIES, interrupt_finetune, run_finetune, tiny_model
from utils.cli import run

COMMON = ["--batch_size", "16", "--micro_batch_size", "8", "--logging_steps", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def prepared(gsm8k_prepared) -> Path:
    """300 GSM8K rows prepared once (cutoff 320, 48 validation examples)."""
    return gsm8k_prepared(300, "--cutoff_len", "320", "--val_set_size", "48")

def finetune(out: Path, data: Path, *extra: str) -> Path:
    return run_finetune(out, data, *COMMON, *extra)

def base_eval_loss(prepared: Path) -> float:
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from utils.training.evaluate import evaluate

    val = load_from_disk(str(prepared / "dataset"))["validation"]
    model = AutoModelForCausalLM.from_pretrained(str(STORIES))
    return evaluate(model, list(zip(val["input_ids"], val["labels"])), 8, 0)["eval_loss"]


@pytest.mark.parametrize("method,extra,gain", [
    ("lora", ["--learning_rate", "3e-3", "--max_steps", "30"], 0.3),
    # A random prefix first hurts (peft initialises it N(0, 1)); it has to learn its way back and past.
    ("prefix", ["--learning_rate", "1e-1", "--num_virtual_tokens", "8", "--max_steps", "50"], 0.2),
])
@pytest.mark.slow
def test_training_lowers_validation_loss(tmp_path, prepared, method, extra, gain):
    """Slow: Learning has to be measured on real data over tens of steps; fewer steps leave the fall inside the noise."""
    out = tmp_path / method
    finetune(out, prepared, "--method", method, *extra)
    meta = json.loads((out / "pipeline.json").read_text())
    before, after = base_eval_loss(prepared), meta["final_eval"]["eval_loss"]
    assert after < before - gain, (before, after)
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == meta["args"]["max_steps"] and sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.slow
def test_lora_artifact_loads_in_plain_peft(tmp_path, prepared):
    """Slow: A training run whose artifact is then loaded by plain peft and transformers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    finetune(out, prepared, "--max_steps", "4", "--learning_rate", "1e-2", "--lora_target_modules", "q_proj", "v_proj")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["r"] == 8
    for name in ("adapter_model.safetensors", "tokenizer.json", "template.json", "data_report.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))
    ids = torch.tensor([[1, 100, 200, 300]])
    base = AutoModelForCausalLM.from_pretrained(str(STORIES))
    ref = base(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(STORIES)), str(out))(ids).logits
    assert not torch.allclose(ref, tuned, atol=1e-4)  # a trained, non-zero adapter
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["stage"] == "finetune" and meta["complete"] and meta["base_model"]["path"] == str(STORIES)
    assert meta["data"]["path"] == str(prepared) and meta["trainable_parameters"] > 0


def test_raw_files_are_prepared_into_the_run_folder(tmp_path):
    rows = json.loads(Path(REAL_SETS["alpaca"]).read_text(encoding="utf-8"))[:40]
    src = tmp_path / "d.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "run"
    finetune(out, src, "--max_steps", "2", "--cutoff_len", "320", "--val_set_size", "8", "--method", "prompt",
             "--num_virtual_tokens", "4", "--learning_rate", "1e-2")
    assert json.loads((out / "data" / "pipeline.json").read_text())["stage"] == "prepare_data"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"


@pytest.mark.slow
def test_rerun_is_noop_and_other_args_need_overwrite(tmp_path, prepared, capsys):
    """Slow: It needs a finished run, then re-runs the stage three times to show each outcome."""
    out = tmp_path / "r"
    finetune(out, prepared, "--max_steps", "2")
    stamp = (out / "pipeline.json").stat().st_mtime_ns
    finetune(out, prepared, "--max_steps", "2")
    assert "nothing to do" in capsys.readouterr().err and (out / "pipeline.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit) as exc:
        finetune(out, prepared, "--max_steps", "3")
    assert exc.value.code == 1 and "--overwrite" in capsys.readouterr().err
    finetune(out, prepared, "--max_steps", "3", "--overwrite")
    assert json.loads((out / "pipeline.json").read_text())["args"]["max_steps"] == 3


def test_bad_inputs_fail_before_training(tmp_path, prepared, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune(tmp_path / "a", prepared, "--lora_target_modules", "query_key_value")
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "query_key_value" in err and "q_proj" in err
    assert not (tmp_path / "a" / "checkpoint-1").exists()
    pickle_only = tmp_path / "pkl"
    pickle_only.mkdir()
    shutil.copy(STORIES / "config.json", pickle_only)
    (pickle_only / "pytorch_model.bin").write_bytes(b"not really")
    import finetune as ft

    with pytest.raises(SystemExit) as exc:
        run(ft.main, ["--base_model", str(pickle_only), "--data_path", str(prepared), "--output_dir", str(tmp_path / "b")])
    assert exc.value.code == 2 and "--allow_pickle_weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(ft.main, ["--base_model", str(STORIES), "--data_path", str(prepared), "--output_dir", str(tmp_path / "c"),
                      "--lora_rank", "4"])
    assert exc.value.code == 2 and "unknown flag --lora_rank (did you mean --lora_r?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(ft.main, ["--base_model", str(STORIES), "--data_path", str(prepared), "--output_dir", str(tmp_path / "c"),
                      "--batch_size", "10", "--micro_batch_size", "4", "--warmup_ratio", "2", "--noadd_eos_token"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--batch_size 10 must be a multiple of --micro_batch_size 4" in err
    assert "--warmup_ratio" in err and "--add_eos_token" in err and not (tmp_path / "c").exists()


def test_second_run_on_same_folder_is_refused(tmp_path, prepared, capsys):
    from utils.artifacts import Lock

    out = tmp_path / "busy"
    out.mkdir()
    with Lock(out / ".lock", "busy"):
        with pytest.raises(SystemExit) as exc:
            finetune(out, prepared, "--max_steps", "1")
    assert exc.value.code == 1 and "in use by another run" in capsys.readouterr().err


def _cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "finetune.py", "--base_model", str(STORIES), "--data_path", str(data),
            "--output_dir", str(out), *COMMON, "--max_steps", "20", "--save_steps", "1000", *extra]


@pytest.mark.slow
def test_sigterm_then_resume_is_bitwise_identical(tmp_path, prepared):
    """Interrupted mid-epoch by SIGTERM, resumed: same adapter bytes and loss log as an uninterrupted run.
    20 steps run past the end of the first epoch (234 training rows, 16 per step): resume crosses epochs.
    Slow: Three real training runs (whole, killed, resumed) as subprocesses, long enough to cross an epoch: a shorter run would not show resume across the epoch boundary."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref, prepared), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

    out = tmp_path / "int"
    code, err = interrupt_finetune(_cmd(out, prepared), out, 5, signal.SIGTERM, env, wait=120)
    assert code == 143, err[-2000:]
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and 5 <= int(ckpts[0].name.split("-")[1]) < 20
    assert not (out / "adapter_model.safetensors").exists()

    # Without --resume_from_checkpoint, the unfinished run is not silently restarted.
    again = subprocess.run(_cmd(out, prepared), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "resume_from_checkpoint auto" in again.stderr

    done = subprocess.run(_cmd(out, prepared, "--resume_from_checkpoint", "auto"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_damaged_checkpoint_is_skipped(tmp_path, prepared, capsys):
    """Slow: Training runs that write checkpoints, then a resume past a damaged one."""
    out = tmp_path / "d"
    finetune(out, prepared, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "5")
    (out / "pipeline.json").unlink()  # pretend the run stopped before finishing
    (out / "checkpoint-2" / "trainable.safetensors").write_bytes(b"torn")
    from utils.training.checkpoint import complete_checkpoints

    capsys.readouterr()
    assert [p.name for p in complete_checkpoints(out, report=True)] == []
    assert "checkpoint-2: trainable.safetensors does not match its hash" in capsys.readouterr().err




@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "glm"])
def test_architectures_lora_all_linear_and_prefix(tmp_path, kind, bpe_tokenizer_dir):
    from safetensors.torch import load_file

    base = tiny_model(kind, tmp_path / kind, bpe_tokenizer_dir, token_ids=True)
    rows = json.loads(Path(REAL_SETS["alpaca"]).read_text(encoding="utf-8"))[:24]
    src = tmp_path / "d.json"
    src.write_text(json.dumps(rows))
    import finetune as ft

    for method in ("lora", "prefix"):
        out = tmp_path / f"{kind}-{method}"
        run(ft.main, ["--base_model", str(base), "--data_path", str(src), "--output_dir", str(out), "--method", method,
                      "--max_steps", "2", "--batch_size", "8", "--micro_batch_size", "4", "--cutoff_len", "192",
                      "--val_set_size", "4", "--learning_rate", "1e-2", "--num_virtual_tokens", "4", "--logging_steps", "0"])
        state = load_file(str(out / "adapter_model.safetensors"))
        assert state and json.loads((out / "pipeline.json").read_text())["complete"]
        if method == "lora":
            assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in state.items())


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_trained_weights(tmp_path, prepared):
    """Slow: Two training runs in a row: the second must start from the first's weights."""
    import torch
    from safetensors.torch import load_file

    first = tmp_path / "first"
    finetune(first, prepared, "--max_steps", "3", "--learning_rate", "1e-2")
    second = tmp_path / "second"
    finetune(second, prepared, "--max_steps", "1", "--learning_rate", "1e-12", "--init_from", str(first))
    a, b = load_file(str(first / "adapter_model.safetensors")), load_file(str(second / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    third = tmp_path / "third"
    with pytest.raises(SystemExit) as exc:
        finetune(third, prepared, "--max_steps", "1", "--method", "prefix", "--init_from", str(first))
    assert exc.value.code == 1


def test_other_stage_folder_is_never_replaced(tmp_path, prepared, capsys):
    before = (prepared / "pipeline.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        finetune(prepared, prepared, "--max_steps", "1", "--overwrite")
    assert exc.value.code == 1 and "not a fine-tune" in capsys.readouterr().err
    assert (prepared / "pipeline.json").read_bytes() == before and not list(prepared.glob("checkpoint-*"))
