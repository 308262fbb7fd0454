"""generate.py and the shared loader (utils/inference/loading.py) on the defects of issue 11: incomplete model and adapter
folders, a mistyped template, the bad-row limit, SIGTERM during batch generation, no-op re-runs, answers made by
another model, and raw prompts that must not get a template's stop strings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SHARED, STORIES, read_jsonl, tiny_model
from utils.errors import SuiteError
from utils.cli import run

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def gen(*argv: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int, *expected: str) -> None:
    """Exit ``code``, no traceback, every ``expected`` text in the message, and no weight was loaded."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr[-3000:])
    assert "generate: decoding with" not in proc.stderr and "\nloading " not in proc.stderr  # failed before loading


# -- incomplete folders (item 4) -----------------------------------------------------------------


def _model_copy(root: Path, name: str, drop: tuple[str, ...] = ()) -> Path:
    folder = root / name
    shutil.copytree(STORIES, folder)
    for f in drop:
        (folder / f).unlink()
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A plain-peft LoRA adapter folder for stories260K (no finetune metadata)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("adapter") / "lora"
    peft.save_pretrained(str(out))
    return out


def test_a_llama2c_import_without_tokenizer_is_a_clean_error_naming_the_folder(tmp_path):
    """export_state_dict.py writes no tokenizer when a llama2.c file is imported without --tokenizer; generating
    from that folder used to end in a sentencepiece/tiktoken traceback."""
    import export_state_dict

    alone = tmp_path / "bin"
    alone.mkdir()
    shutil.copy(SHARED / "models" / "stories260K" / "llama2c_stories260K.bin", alone)
    out = tmp_path / "imported"
    run(export_state_dict.main, ["--base_model", str(alone / "llama2c_stories260K.bin"), "--output_dir", str(out)])
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()
    proc = gen("--base_model", str(out), "--prompt", "Once upon a time")
    assert_clean_failure(proc, 1, f"--base_model {out}: no tokenizer files", "--tokenizer")
    assert "sentencepiece" not in proc.stderr and "tiktoken" not in proc.stderr


@pytest.mark.parametrize("case", ["no_config", "no_weights", "truncated_weights", "missing_shard"])
@pytest.mark.slow
def test_incomplete_model_folders_fail_before_loading_naming_what_is_missing(tmp_path, case):
    """Slow: One generate.py subprocess per kind of damaged folder, as a shell script would meet it."""
    if case == "no_config":
        folder, expected = _model_copy(tmp_path, case, ("config.json",)), "no config.json"
    elif case == "no_weights":
        folder, expected = _model_copy(tmp_path, case, ("model.safetensors",)), "no weights (model.safetensors)"
    elif case == "truncated_weights":
        folder = _model_copy(tmp_path, case)
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(folder / "model.safetensors") // 2)  # a copy cut off half way
        expected = "model.safetensors is truncated"
    else:
        folder = _model_copy(tmp_path, case)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}))
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        expected = "model-00002-of-00002.safetensors is missing"
    proc = gen("--base_model", str(folder), "--prompt", "Once upon a time")
    assert_clean_failure(proc, 1, f"--base_model {folder}: {expected}")


@pytest.mark.parametrize("case", ["no_adapter_weights", "truncated_adapter_weights"])
@pytest.mark.slow
def test_incomplete_adapter_folders_fail_before_loading(tmp_path, adapter, case):
    """Slow: One generate.py subprocess per kind of damaged adapter, as a shell script would meet it."""
    folder = tmp_path / case
    shutil.copytree(adapter, folder)
    weights = folder / "adapter_model.safetensors"
    if case == "no_adapter_weights":
        weights.unlink()
        expected = "no adapter_model.safetensors"
    else:
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) - 100)
        expected = "adapter_model.safetensors is truncated"
    proc = gen("--base_model", str(STORIES), "--lora_weights", str(folder), "--prompt", "Once upon a time")
    assert_clean_failure(proc, 1, f"--lora_weights {folder}: {expected}")


def test_the_shared_loader_refuses_incomplete_folders_without_reading_weights(tmp_path, adapter, monkeypatch):
    """The same checks for every stage that loads through utils.inference.loading (serving, evaluation): prepare() fails,
    and nothing reaches from_pretrained."""
    import transformers

    from utils.inference.loading import load_for_inference, prepare

    def no_loading(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    notok = _model_copy(tmp_path, "notok", ("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(SuiteError, match=f"{notok}: no tokenizer files"):
        load_for_inference(str(notok), log=lambda m: None)
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    (bare / "adapter_model.safetensors").unlink()
    with pytest.raises(SuiteError, match="no adapter_model.safetensors"):
        prepare(str(STORIES), str(bare))
    assert prepare(str(STORIES), str(adapter)).source.adapter == str(adapter)  # a whole one passes the checks


def test_a_hub_id_says_nothing_is_ever_downloaded():
    proc = gen("--base_model", "meta-llama/Llama-2-7b-hf", "--prompt", "hi")
    assert_clean_failure(proc, 1, "meta-llama/Llama-2-7b-hf", "looks like a Hugging Face Hub id",
                         "never downloads")


# -- a mistyped template (item 5) ------------------------------------------------------------------


@pytest.mark.slow
def test_unknown_template_is_a_usage_error_before_loading_with_the_closest_name():
    """Slow: generate.py subprocesses, each importing the libraries before refusing."""
    proc = gen("--base_model", str(STORIES), "--prompt_template", "alpacca", "--instruction", "Say hi")
    assert_clean_failure(proc, 2, "--prompt_template alpacca", "did you mean alpaca?")
    proc = gen("--base_model", str(STORIES), "--prompt_template", "no/such/template.json", "--instruction", "Hi")
    assert_clean_failure(proc, 2, "no such template file")


# -- batch: the bad-row limit, no-op re-runs, another model (items 6, 7) ----------------------------


def _gen(*argv: str) -> None:
    import generate

    run(generate.main, list(argv))


def _questions(path: Path, n: int, bad: tuple[int, ...] = ()) -> None:
    lines = []
    for i in range(1, n + 1):
        lines.append('{"id": "broken", "instruction": ' if i in bad else
                     json.dumps({"id": f"q{i}", "instruction": f"Tell me a story about {i} cats."}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_batch_fails_before_writing_when_too_many_rows_are_bad(tmp_path, capsys):
    q, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    _questions(q, 4, bad=(2, 4))
    common = ["--base_model", str(STORIES), "--input_file", str(q), "--output_file", str(out), "--max_new_tokens", "4"]
    with pytest.raises(SystemExit) as exc:
        _gen(*common)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "2 of 4 rows are malformed (50.00% > --max_bad_fraction 1.00%); nothing written" in err
    assert f"{q}:2" in err and f"{q}:4" in err and "not valid JSON: 2" in err
    assert "decoding with" not in err  # refused before the model was loaded
    assert not out.exists() and not list(tmp_path.glob("a.jsonl.partial*"))
    _gen(*common, "--max_bad_fraction", "0.5")  # the same rule as prepare_data.py: at the limit it passes
    assert [r["id"] for r in read_jsonl(out)] == ["q1", "q3"]
    with pytest.raises(SystemExit) as exc:
        _gen(*common, "--max_bad_fraction", "1.5")
    assert exc.value.code == 2


def test_a_finished_batch_rerun_is_a_no_op_that_says_so(tmp_path, capsys):
    q, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    _questions(q, 3)
    common = ["--base_model", str(STORIES), "--input_file", str(q), "--output_file", str(out), "--max_new_tokens", "4",
              "--prompt_template", "alpaca"]
    _gen(*common)
    assert "wrote 3 answers" in capsys.readouterr().err
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    _gen(*common)
    captured = capsys.readouterr()
    assert "nothing to do" in captured.err and "wrote" not in captured.err
    assert "decoding with" not in captured.err  # not even the model was loaded
    assert captured.out.strip() == str(out.absolute())
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    # A row that can never be answered (too long for the context) is tried again, but nothing new is written.
    q2, out2 = tmp_path / "q2.jsonl", tmp_path / "a2.jsonl"
    q2.write_text(json.dumps({"text": "Tell me a story. " * 200}) + "\n" + json.dumps({"text": "Hi?"}) + "\n")
    common = ["--base_model", str(STORIES), "--input_file", str(q2), "--output_file", str(out2), "--max_new_tokens",
              "4", "--prompt_template", "alpaca"]
    _gen(*common)
    assert "wrote 1 answers" in capsys.readouterr().err
    before = (out2.read_bytes(), out2.stat().st_mtime_ns)
    _gen(*common)
    err = capsys.readouterr().err
    assert "nothing new" in err and "(1 rows unanswered)" in err and "wrote" not in err
    assert (out2.read_bytes(), out2.stat().st_mtime_ns) == before




def test_batch_refuses_answers_made_by_another_model(tmp_path, capsys):
    """README: answers made with other settings *or another model* are refused without --overwrite."""
    first, second = (tiny_model("llama", tmp_path / name, seed=seed, eos_token_id=2, bos_token_id=1)
                     for name, seed in (("first", 0), ("second", 1)))
    q, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    _questions(q, 3)
    common = ["--input_file", str(q), "--output_file", str(out), "--max_new_tokens", "4", "--prompt_template", "alpaca"]
    _gen("--base_model", str(first), *common)
    kept = out.read_bytes()
    with pytest.raises(SystemExit) as exc:
        _gen("--base_model", str(second), *common)  # same settings, same file, another model
    assert exc.value.code == 1
    assert "another model" in capsys.readouterr().err and out.read_bytes() == kept
    _gen("--base_model", str(second), *common, "--overwrite")
    rows = read_jsonl(out)
    assert len(rows) == 3 and {r["generation"]["model"]["base_model"] for r in rows} == {str(second.resolve())}


@pytest.mark.slow
def test_sigterm_during_batch_generation_says_what_was_kept_and_the_rerun_resumes(tmp_path):
    """Slow: A real generate.py subprocess is interrupted mid-batch and run again to resume."""
    q, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    _questions(q, 12)
    partial = tmp_path / "a.jsonl.partial"
    argv = [sys.executable, "generate.py", "--base_model", str(STORIES), "--input_file", str(q), "--output_file",
            str(out), "--max_new_tokens", "32", "--batch_size", "1", "--prompt_template", "alpaca"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_file() and partial.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 143, err[-3000:]
    kept = len(read_jsonl(partial))
    assert 1 <= kept < 12 and not out.exists()
    assert f"stopped by SIGTERM; {kept} answers kept in {partial}" in err
    assert "re-run the same command to resume" in err and "Traceback" not in err
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{kept} already answered, {12 - kept} to do" in again.stderr
    assert [r["id"] for r in read_jsonl(out)] == [f"q{i}" for i in range(1, 13)]


# -- raw prompts (item 12) ---------------------------------------------------------------------------


def test_a_raw_prompt_gets_no_template_stop_strings_only_eos_and_stop(tmp_path, capsys):
    """stories260K continues "Once upon a time" with ", there was a little girl named ...". A template whose stop
    string is "little" must not cut a raw --prompt; --stop does."""
    model = _model_copy(tmp_path, "with_template")
    (model / "template.json").write_text(json.dumps({
        "name": "t", "prompt_input": "{instruction}\n{input}\n", "prompt_no_input": "{instruction}\n",
        "response_split": "\n", "stop": ["little"]}))
    _gen("--base_model", str(model), "--prompt", "Once upon a time", "--max_new_tokens", "12")
    assert capsys.readouterr().out.startswith(", there was a little girl")
    _gen("--base_model", str(STORIES), "--prompt", "Once upon a time", "--max_new_tokens", "12")
    captured = capsys.readouterr()
    assert captured.out.startswith(", there was a little girl")
    assert "using alpaca" not in captured.err  # no template is chosen for a raw prompt
    _gen("--base_model", str(model), "--prompt", "Once upon a time", "--max_new_tokens", "12", "--stop", "little")
    assert capsys.readouterr().out == ", there was a \n"


def test_a_row_holding_a_unicode_line_separator_is_one_row(tmp_path):
    """JSON written with ensure_ascii=False keeps U+2028 / U+2029 raw inside a string; str.splitlines() would cut
    the row there and report two bad lines."""
    import generate

    path = tmp_path / "q.jsonl"
    rows = [{"instruction": "first\u2028line"}, {"instruction": "second\u2029para\x1c"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    got, bad = generate.read_rows(str(path), generate.BatchIO(input_file=str(path), output_file="o.jsonl"))
    assert bad == {} and [r["row"]["instruction"] for r in got] == [r["instruction"] for r in rows]
    assert [r["line"] for r in got] == [1, 2]
