"""finetune.py under torchrun: data parallel, FSDP and DeepSpeed ZeRO-2/3 reach the losses of one process,
and resume (the other training features are in test_finetune_features.py).

Each "same result" test compares against a plain single-process run with LoRA dropout off, so the
only differences left are floating-point summation order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, STORIES
from utils.cli import run

BASE_FLAGS = ["--batch_size", "8", "--micro_batch_size", "2", "--lora_dropout", "0", "--learning_rate", "3e-3",
              "--logging_steps", "0", "--seed", "5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def prepared(gsm8k_prepared) -> Path:
    return gsm8k_prepared(120, "--cutoff_len", "320", "--val_set_size", "16")

def _flags(extra) -> list[str]:
    """BASE_FLAGS, less those that ``extra`` sets itself, then ``extra``."""
    pairs = [BASE_FLAGS[i:i + 2] for i in range(0, len(BASE_FLAGS), 2)]
    return [x for flag, value in pairs if flag not in extra for x in (flag, value)] + list(extra)


def _finetune(out: Path, data: Path, *extra: str) -> None:
    import finetune as ft

    run(ft.main, ["--base_model", str(STORIES), "--data_path", str(data), "--output_dir", str(out), *_flags(extra)])


def _cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return ["finetune.py", "--base_model", str(STORIES), "--data_path", str(data), "--output_dir", str(out),
            *_flags(extra)]


def _metrics(out: Path) -> tuple[list[float], list[dict]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def _assert_same_run(a: Path, b: Path, rtol: float = 1e-4) -> None:
    from safetensors.torch import load_file

    (la, ea), (lb, eb) = _metrics(a), _metrics(b)
    assert len(la) == len(lb) and la == pytest.approx(lb, rel=rtol)
    assert ea[-1]["eval_loss"] == pytest.approx(eb[-1]["eval_loss"], rel=rtol)
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


# -- several processes -----------------------------------------------------------------------------

def _torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


NO_DEEPSPEED = pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed (optional)")


@pytest.mark.parametrize("extra", [
    [], ["--fsdp"],
    pytest.param(["--deepspeed", str(REPO / "examples/deepspeed_zero2.json")], marks=NO_DEEPSPEED),
    pytest.param(["--deepspeed", str(REPO / "examples/deepspeed_zero3.json")], marks=NO_DEEPSPEED),
], ids=["ddp", "fsdp", "zero2", "zero3"])
@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path, prepared, extra):
    """Multi-process: Two torchrun processes against one: data parallelism cannot be shown in one process."""
    one = tmp_path / "one"
    _finetune(one, prepared, "--max_steps", "3", "--save_steps", "2")
    two = tmp_path / "two"
    proc = _torchrun(2, _cmd(two, prepared, "--max_steps", "3", "--save_steps", "2", *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(two.absolute())  # one payload line, from rank 0 only
    assert proc.stderr.count("resolved arguments") == 1
    _assert_same_run(one, two)
    meta = json.loads((two / "pipeline.json").read_text())
    assert meta["world_size"] == 2 and meta["complete"]

    # Interrupted after its checkpoint (simulated: the finished outputs removed), the job resumes
    # from checkpoint-2 with two processes and ends where it ended before.
    for name in ("pipeline.json", "adapter_model.safetensors"):
        (two / name).unlink()
    before = (two / "metrics.jsonl").read_text()
    proc = _torchrun(2, _cmd(two, prepared, "--max_steps", "3", "--save_steps", "2", "--resume_from_checkpoint", "auto",
                             *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and (two / "metrics.jsonl").read_text() == before


def test_deepspeed_flag_is_checked_up_front(tmp_path, prepared, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        _finetune(tmp_path / "x", prepared, "--deepspeed", str(bad), "--fsdp")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--deepspeed {bad}: not a readable JSON config" in err
    assert "--deepspeed cannot be combined with --fsdp" in err
    if not _has_deepspeed():
        assert "--deepspeed needs the deepspeed package" in err


def test_fsdp_needs_several_processes(tmp_path, prepared, capsys):
    with pytest.raises(SystemExit) as exc:
        _finetune(tmp_path / "x", prepared, "--fsdp")
    assert exc.value.code == 2 and "--fsdp needs torchrun with 2 or more processes" in capsys.readouterr().err
