"""scripts/score_validation.py: the demo's "validation loss before", scored like finetune.py's "after"."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO, STORIES, gsm8k_rows, prepare_gsm8k
from utils.cli import run


def load_script():
    spec = importlib.util.spec_from_file_location("score_validation", REPO / "scripts" / "score_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(gsm8k_prepared):
    return gsm8k_prepared(24, "--val_set_size", "6", "--prompt_template_name", "alpaca_short", "--cutoff_len", "384",
                          "--on_overlength", "drop")

def test_base_score_is_finetune_eval_of_an_unchanged_model(tmp_path, prepared):
    """A LoRA run that cannot move the weights (B starts at zero, learning rate 1e-12) evaluates the base
    model: its final eval must be the score, on the same rows and tokens."""
    import finetune

    out = tmp_path / "base_eval.json"
    run(load_script().main, ["--model", str(STORIES), "--data_path", str(prepared), "--output_file", str(out)])
    score = json.loads(out.read_text())
    run(finetune.main, ["--base_model", str(STORIES), "--data_path", str(prepared), "--output_dir",
                        str(tmp_path / "lora"), "--max_steps", "1", "--learning_rate", "1e-12", "--batch_size", "2",
                        "--micro_batch_size", "2", "--lora_dropout", "0", "--logging_steps", "0", "--notensorboard"])
    final = json.loads((tmp_path / "lora" / "pipeline.json").read_text())["final_eval"]
    assert score["eval_tokens"] == final["eval_tokens"] > 0
    # Only float rounding differs (other micro-batches, so other padding).
    assert abs(score["eval_loss"] - final["eval_loss"]) < 1e-4
    assert score["eval_token_accuracy"] == pytest.approx(final["eval_token_accuracy"], abs=1e-3)
    assert score["validation_rows"] == 6 and 3 < score["eval_loss"] < 8  # stories260K does not know GSM8K


def test_rerun_is_a_no_op_and_other_files_are_refused(tmp_path, prepared, capsys):
    script = load_script()
    out = tmp_path / "base_eval.json"
    argv = ["--model", str(STORIES), "--data_path", str(prepared), "--output_file", str(out)]
    run(script.main, argv)
    first = out.read_bytes()
    capsys.readouterr()
    run(script.main, argv)
    assert "nothing to do" in capsys.readouterr().err and out.read_bytes() == first

    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    with pytest.raises(SystemExit) as exc:
        run(script.main, argv[:-1] + [str(mine)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and mine.read_text() == '{"mine": true}'
    assert "--output_file" in err and "--overwrite" in err
    with pytest.raises(SystemExit) as exc:
        run(script.main, ["--model", str(STORIES), "--data_path", str(tmp_path / "nope"), "--output_file", str(out),
                          "--micro_batch_size", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--data_path" in err and "--micro_batch_size" in err  # all problems at once


def test_data_without_validation_split_is_a_clean_error(tmp_path, capsys):
    data = prepare_gsm8k(tmp_path, gsm8k_rows(8), "--val_set_size", "0")
    with pytest.raises(SystemExit) as exc:
        run(load_script().main, ["--model", str(STORIES), "--data_path", str(data), "--output_file",
                                 str(tmp_path / "s.json")])
    assert exc.value.code == 1 and "no validation split" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
