"""The README's set-up commands, run as a user would run them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    setup = text.split("## Set-up", 1)[1]
    block = re.search(r"```sh\n(.*?)```", setup, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_gives_exactly_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert commands == ["make pipeline", "make test"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci


def test_readme_pipeline_command_runs_end_to_end(tmp_path):
    env = {**os.environ, "RUN_DIR": str(tmp_path / "demo"), "PYTHON": sys.executable}
    cmd = readme_commands()[0].split()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, data = tmp_path / "demo" / "base", tmp_path / "demo" / "data"
    assert json.loads((base / "pipeline.json").read_text())["stage"] == "make_tiny_model"
    assert (base / "model.safetensors").is_file()
    meta = json.loads((data / "pipeline.json").read_text())
    assert meta["stage"] == "prepare_data" and meta["base_model"]["path"] == str(base)
    assert proc.stdout.count("⟦") >= 2  # the inspected examples, trained text marked
    assert "trained-token ratio" in proc.stdout
    lora = tmp_path / "demo" / "lora"
    assert json.loads((lora / "pipeline.json").read_text())["stage"] == "finetune"
    assert (lora / "adapter_model.safetensors").is_file() and "generation: " in proc.stdout
    merged = tmp_path / "demo" / "merged"
    assert json.loads((merged / "pipeline.json").read_text())["stage"] == "export_hf"
    assert "merged generation: " in proc.stdout
    # A second run is a no-op for every stage.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("nothing to do") == 4
