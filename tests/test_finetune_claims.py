"""What the README says about finetune.py, each held by a test that fails if the claim breaks: length-grouped
batches, Ctrl-C, rsLoRA and P-tuning v2 with a projection through plain peft, bf16, the final adapter check,
what pipeline.json records for a prepared folder, loss.png, and the progress display.

Runs use the real stories260K model on real GSM8K rows, in-process (``utils.cli.run``) except where a signal
must reach a real process.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REAL_SETS, REPO, STORIES, gsm8k_rows, interrupt_finetune, prepare_gsm8k, read_jsonl, run_finetune
from utils.cli import run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
COMMON = ["--batch_size", "8", "--micro_batch_size", "4", "--logging_steps", "0", "--seed", "3", "--notensorboard"]


@pytest.fixture(scope="module")
def prepared(gsm8k_prepared) -> Path:
    """120 GSM8K rows prepared at cutoff 320 with 16 validation examples: values that differ from finetune.py's
    own defaults for the data stage (cutoff 256, val_set_size 0.05)."""
    return gsm8k_prepared(120, "--cutoff_len", "320", "--val_set_size", "16")

def finetune(out: Path, data: Path, *extra: str) -> Path:
    return run_finetune(out, data, *COMMON, *extra)

def meta(out: Path) -> dict:
    return json.loads((out / "pipeline.json").read_text(encoding="utf-8"))


def val_rows(prepared: Path) -> list:
    from datasets import load_from_disk

    val = load_from_disk(str(prepared / "dataset"))["validation"]
    return list(zip(val["input_ids"], val["labels"]))


# --- --group_by_length ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gsm8k_lengths(stories_tokenizer) -> list[int]:
    rows = gsm8k_rows(2000)
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    return [len(ids) for ids in stories_tokenizer(texts)["input_ids"]]


def padding_fraction(steps: list[list[int]], lengths: list[int], micro_batch_size: int) -> float:
    """Pad tokens over all tokens when each step is cut into micro-batches as finetune.py cuts them."""
    from utils.training.batches import micro_batches, rank_rows

    pad = real = 0
    for step in steps:
        for group in micro_batches(rank_rows(step, lengths, 0, 1), micro_batch_size):
            width = max(lengths[i] for i in group)
            pad += width * len(group) - sum(lengths[i] for i in group)
            real += sum(lengths[i] for i in group)
    return pad / (pad + real)


@pytest.mark.parametrize("batch_size,micro", [(16, 4), (8, 8)])
def test_group_by_length_cuts_padding_and_keeps_the_epoch(gsm8k_lengths, batch_size, micro):
    """README: rows of similar length share a step; the loss is unchanged in expectation, the padding falls."""
    from utils.training.batches import epoch_steps

    lengths = gsm8k_lengths
    plain = epoch_steps(lengths, batch_size, 42, 0, False)
    grouped = epoch_steps(lengths, batch_size, 42, 0, True)
    # The same rows, each once per epoch, in steps of the same sizes: only which rows share a step changes.
    for steps in (plain, grouped):
        assert sorted(i for s in steps for i in s) == list(range(len(lengths)))
    assert sorted(map(len, grouped)) == sorted(map(len, plain))
    padded, grouped_padded = padding_fraction(plain, lengths, micro), padding_fraction(grouped, lengths, micro)
    assert grouped_padded < 0.5 * padded
    if (batch_size, micro) == (16, 4):  # the figures the README quotes
        assert padded > 0.1 and grouped_padded < 0.01, (padded, grouped_padded)
    # Steps of similar lengths, in random order (not longest first), different each epoch: unbiased over an epoch.
    spread = [max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in grouped]
    assert sorted(spread)[len(spread) // 2] < sorted(
        max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in plain)[len(plain) // 2] / 4
    means = [sum(lengths[i] for i in s) / len(s) for s in grouped]
    assert means != sorted(means) and means != sorted(means, reverse=True)
    assert epoch_steps(lengths, batch_size, 42, 1, True) != grouped


# --- Ctrl-C -------------------------------------------------------------------------------------------------


def _cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "finetune.py", "--base_model", str(STORIES), "--data_path", str(data),
            "--output_dir", str(out), *COMMON, "--max_steps", "40", "--save_steps", "1000", *extra]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, prepared):
    """README: SIGTERM or Ctrl-C saves a checkpoint at the next step boundary (143 / 130); loss.png is drawn
    beside metrics.jsonl at that checkpoint without entering its hash manifest. (Resuming such a checkpoint
    is tested after SIGTERM in test_finetune.py.)
    Slow: A real finetune.py subprocess has to be interrupted mid-run to show what a signal does."""
    from utils.training.checkpoint import MANIFEST, complete_checkpoints

    out = tmp_path / "int"
    code, err = interrupt_finetune(_cmd(out, prepared), out, 3, signal.SIGINT, ENV)
    assert code == 130, err[-2000:]
    assert "SIGINT received" in err and "Resume with --resume_from_checkpoint auto" in err and "Traceback" not in err
    ckpts = complete_checkpoints(out)
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].name.split("-")[1]) < 40
    assert not (out / "adapter_model.safetensors").exists()
    assert (out / "loss.png").is_file() and not (ckpts[0] / "loss.png").exists()
    assert "loss.png" not in json.loads((ckpts[0] / MANIFEST).read_text())["files"]


# --- rsLoRA and P-tuning v2 with a projection, end to end through plain peft ---------------------------------


@pytest.mark.parametrize("method,extra", [
    ("lora", ["--use_rslora", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]),
    ("prefix", ["--prefix_projection", "--num_virtual_tokens", "4", "--encoder_hidden_size", "16"]),
])
@pytest.mark.slow
def test_rslora_and_prefix_projection_end_to_end(tmp_path, prepared, method, extra):
    """Trained, saved, loaded by plain peft (PeftModel.from_pretrained) and generated from: the loaded adapter
    gives the run's own final eval loss, so what was saved is what was trained (rsLoRA's alpha / sqrt(r)
    scaling and the prefix MLP's output included).
    Slow: A training run per method, then its export and generation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.training.evaluate import evaluate

    out = finetune(tmp_path / method, prepared, "--method", method, "--max_steps", "6", "--learning_rate", "1e-2",
                   *extra)
    cfg = json.loads((out / "adapter_config.json").read_text())
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(STORIES)), str(out)).eval()
    if method == "lora":
        assert cfg["use_rslora"] is True
        q = loaded.base_model.model.model.layers[0].self_attn.q_proj
        assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # plain LoRA would be 8 / 4
    else:
        assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["prefix_projection"] is True
    rows = val_rows(prepared)
    reloaded = evaluate(loaded, rows, 4, 0)["eval_loss"]
    base = evaluate(AutoModelForCausalLM.from_pretrained(str(STORIES)), rows, 4, 0)
    final = meta(out)["final_eval"]["eval_loss"]
    assert reloaded == pytest.approx(final, abs=1e-4) and abs(reloaded - base["eval_loss"]) > 1e-3
    prompt = torch.tensor([rows[0][0][:40]])
    with torch.no_grad():
        new = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              min_new_tokens=8, do_sample=False)[0, prompt.shape[1]:]
    assert new.shape == (8,) and int(new.max()) < loaded.config.vocab_size


# --- bf16 -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bf16_trains_and_saves_the_documented_dtypes(tmp_path, prepared):
    """README: --dtype bf16 runs the base model in bf16; adapter weights are trained and saved in fp32, a full
    fine-tune is saved in bf16. The loss falls.
    Slow: Two bf16 runs (LoRA and full) long enough for the loss to fall; bf16 matmuls are slow on CPU."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from utils.training.evaluate import evaluate

    out = finetune(tmp_path / "bf16", prepared, "--dtype", "bf16", "--max_steps", "12", "--learning_rate", "3e-3")
    state = load_file(str(out / "adapter_model.safetensors"))
    assert state and {v.dtype for v in state.values()} == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.bfloat16)
    before = evaluate(base, val_rows(prepared), 4, 0)["eval_loss"]
    assert meta(out)["final_eval"]["eval_loss"] < before - 0.05, (before, meta(out)["final_eval"])
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])

    full = finetune(tmp_path / "full", prepared, "--dtype", "bf16", "--method", "full", "--max_steps", "2",
                    "--learning_rate", "1e-3")
    tensors = {}
    for f in full.glob("model*.safetensors"):
        tensors.update(load_file(str(f)))
    assert tensors and {v.dtype for v in tensors.values()} == {torch.bfloat16}


# --- the final adapter is checked before the run is marked complete ------------------------------------------


@pytest.mark.parametrize("damage,message", [("zero", "all zeros"), ("nan", "non-finite")])
def test_a_bad_final_adapter_fails_the_run(tmp_path, prepared, capsys, monkeypatch, damage, message):
    """An optimizer that changes nothing (LoRA B stays at its zero initialisation), or one that writes NaN:
    the reloaded adapter is refused, nothing is published at the top of the folder, the run is not complete."""
    from utils.artifacts import read_meta

    def broken_step(self, closure=None):
        if damage == "nan":
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))

    monkeypatch.setattr(torch.optim.AdamW, "step", broken_step)
    out = tmp_path / damage
    with pytest.raises(SystemExit) as exc:
        finetune(out, prepared, "--max_steps", "2", "--val_set_size", "0")
    assert exc.value.code == 1 and message in capsys.readouterr().err
    assert not (out / "adapter_model.safetensors").exists()
    assert not (read_meta(out) or {}).get("complete")


# --- pipeline.json records the data stage as it was run ----------------------------------------------------


def test_prepared_folder_values_are_recorded(tmp_path, prepared, capsys):
    """A run on a prepared folder records the folder's cutoff_len, val_set_size and template (prepared at 320 /
    16), not finetune.py's defaults (256 / 0.05), and says when a value given to finetune had no effect."""
    out = finetune(tmp_path / "rec", prepared, "--max_steps", "1", "--train_on_inputs")
    args = meta(out)["args"]
    data_args = json.loads((prepared / "pipeline.json").read_text())["args"]
    assert (args["cutoff_len"], args["val_set_size"], args["train_on_inputs"]) == (320, 16, False)
    assert args["prompt_template_name"] == data_args["prompt_template_name"]
    assert "--train_on_inputs True does not apply to the prepared --data_path" in capsys.readouterr().err


# --- loss.png --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_png_is_drawn_and_hashed(tmp_path, prepared, capsys):
    """Slow: A training run with checkpoints and evaluations, whose plot is then read back."""
    from PIL import Image

    from utils.artifacts import sha256_file
    from utils.training.checkpoint import complete_checkpoints

    out = finetune(tmp_path / "plot", prepared, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2")
    png = out / "loss.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert meta(out)["files"]["loss.png"] == sha256_file(png)
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2"]  # manifest intact
    assert f"finetune: loss curve {png.absolute()}" in capsys.readouterr().err
    assert not list(out.glob(".loss.png*"))


def test_loss_png_is_replaced_atomically(tmp_path, monkeypatch):
    """A failure while drawing leaves the previous loss.png as it was and no temporary file."""
    from matplotlib.figure import Figure

    from utils.training.tracking import plot_losses

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5 - s / 10}) + "\n" for s in range(1, 6))
                       + json.dumps({"step": 5, "eval_loss": 4.8}) + "\n")
    png = plot_losses(metrics, tmp_path / "loss.png")
    before = png.read_bytes()

    def torn(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", torn)
    with pytest.raises(OSError):
        plot_losses(metrics, png)
    assert png.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


# --- progress: a bar on a terminal, lines elsewhere -------------------------------------------------------------


def test_terminal_decision_follows_isatty():
    import pty

    from utils.training.tracking import on_terminal

    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert on_terminal(tty) is True
    finally:
        os.close(leader)
        os.close(follower)
    assert on_terminal(io.StringIO()) is False
    closed = io.StringIO()
    closed.close()
    assert on_terminal(closed) is False


def test_step_progress_bar_or_lines():
    from utils.training.tracking import StepProgress

    bar_out = io.StringIO()
    bar = StepProgress(total=4, start=0, logging_steps=2, stream=bar_out, tty=True)
    for step in range(1, 5):
        bar.update(step, 4.0 - step / 10, 1e-3, 1234.0)
    bar.close()
    text = bar_out.getvalue()
    assert "4/4" in text and "loss 3.6000" in text and "1,234 tokens/s" in text and "finetune: step" not in text

    lines_out = io.StringIO()
    lines = StepProgress(total=4, start=0, logging_steps=2, stream=lines_out, tty=False)
    for step in range(1, 5):
        lines.update(step, 4.0 - step / 10, 1e-3, 1234.0)
    lines.close()
    assert lines_out.getvalue().splitlines() == [
        "finetune: step 2/4 loss 3.8000 lr 1.00e-03 (1,234 tokens/s)",
        "finetune: step 4/4 loss 3.6000 lr 1.00e-03 (1,234 tokens/s)"]


@pytest.mark.parametrize("tty", [True, False])
@pytest.mark.slow
def test_finetune_shows_a_bar_only_on_a_terminal(tmp_path, prepared, capsys, monkeypatch, tty):
    """Slow: A finetune.py subprocess on a pseudo-terminal and one without: the bar depends on the real stream."""
    import utils.training.tracking

    monkeypatch.setattr(utils.training.tracking, "on_terminal", lambda stream=None: tty)
    run(__import__("finetune").main, ["--base_model", str(STORIES), "--data_path", str(prepared), "--output_dir",
                                      str(tmp_path / "p"), *COMMON[:4], "--notensorboard", "--max_steps", "3",
                                      "--logging_steps", "1"])
    err = capsys.readouterr().err
    if tty:
        assert "3/3 [" in err and "tokens/s]" in err and "finetune: step 1/3" not in err
    else:
        assert "finetune: step 1/3 loss" in err and "finetune: step 3/3 loss" in err and "3/3 [" not in err


@pytest.mark.parametrize("tty", [True, False])
def test_prepare_data_shows_a_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch, tty):
    import utils.training.tracking

    monkeypatch.setattr(utils.training.tracking, "on_terminal", lambda stream=None: tty)
    prepare_gsm8k(tmp_path, gsm8k_rows(30), "--val_set_size", "0")
    err = capsys.readouterr().err
    assert ("tokenizing: 100%" in err and "30/30" in err) is tty
    assert "prepare_data: 30 examples from 30 rows" in err or "examples from 30 rows" in err


# --- interrupted while preparing the data, and Hub ids ------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_during_data_preparation_says_nothing_was_written(tmp_path):
    """finetune.py on raw files, SIGTERM while the rows are tokenized: exit 143 with a message that says what was
    kept (nothing) and how to go on, no traceback, no half-written data folder.
    Slow: A real subprocess has to be interrupted while it tokenizes, so the data must take a few seconds."""
    out = tmp_path / "run"
    cmd = [sys.executable, "finetune.py", "--base_model", str(STORIES), "--data_path", str(REAL_SETS["alpaca"]),
           "--output_dir", str(out), *COMMON, "--max_steps", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the file has been read: tokenizing its 7,473 rows takes seconds
        seen.append(line)
        if "rows, format alpaca" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM while preparing the data" in err and "nothing was written" in err, err[-2000:]
    assert "run the same command again" in err and "Traceback" not in err
    if out.exists():  # whether finetune removes a folder it made itself is test_lifecycle.py's concern
        assert not (out / "data").exists() and not list(out.glob(".data.tmp-*"))


@pytest.mark.parametrize("hub_id", ["tatsu-lab/alpaca", "yahma/alpaca-cleaned"])
def test_hub_dataset_id_is_told_nothing_is_downloaded(tmp_path, capsys, hub_id):
    import finetune as ft
    import prepare_data

    for main in (prepare_data.main, ft.main):
        with pytest.raises(SystemExit) as exc:
            run(main, ["--base_model", str(STORIES), "--data_path", hub_id, "--output_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--data_path {hub_id}: no such file" in err
        assert "Hugging Face Hub dataset id" in err and "never downloads anything" in err
        assert not (tmp_path / "o").exists()
