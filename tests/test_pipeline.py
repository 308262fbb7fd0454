"""The README's set-up commands, run as a user would run them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED, STORIES


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


def summary_value(stdout: str, label: str) -> str:
    """The text after ``label`` on its line of the demo's closing summary."""
    summary = stdout.split("== what ", 1)[1]
    match = re.search(rf"^ *{re.escape(label)}(.*)$", summary, re.M)
    assert match, f"{label!r} missing from the summary:\n{summary}"
    return match.group(1).strip()


@pytest.mark.slow
def test_readme_pipeline_command_runs_end_to_end(tmp_path):
    """`make pipeline` fine-tunes the pretrained stories260K on GSM8K, and its summary shows that it learned.
    Slow: It is the README's demo itself (about two minutes): its claim is the end-to-end run on the real model."""
    run_dir = tmp_path / "demo"
    env = {**os.environ, "RUN_DIR": str(run_dir), "SHARED": str(SHARED), "PYTHON": sys.executable}
    cmd = readme_commands()[0].split()
    # A hang guard, not a timing: about 3 minutes on an idle 2-core machine, several times that on a busy one.
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout

    data, lora, merged = run_dir / "data", run_dir / "lora", run_dir / "merged"
    meta = json.loads((data / "pipeline.json").read_text())
    assert meta["stage"] == "prepare_data" and Path(meta["base_model"]["path"]).resolve() == STORIES.resolve()
    assert out.count("⟦") >= 2  # the inspected examples, trained text marked
    assert "trained-token ratio" in out
    assert json.loads((lora / "pipeline.json").read_text())["stage"] == "finetune"
    assert (lora / "adapter_model.safetensors").is_file()
    assert json.loads((merged / "pipeline.json").read_text())["stage"] == "export_hf"
    assert len((run_dir / "answers.jsonl").read_text().splitlines()) == 80

    # Validation loss before -> after, from the run's own files: the base model scored on the same split
    # that finetune.py evaluated the tuned adapter on.
    before = json.loads((run_dir / "base_eval.json").read_text())
    records = [json.loads(line) for line in (lora / "metrics.jsonl").read_text().splitlines() if line.strip()]
    after = next(r for r in reversed(records) if r.get("final"))
    assert before["data"] == meta["fingerprint"] and before["eval_tokens"] == after["eval_tokens"]
    # stories260K writes stories: on GSM8K answers it scores about 4.9; 40 LoRA steps bring that to about
    # 2.6. Half that fall is required, far beyond what noise in a 16,000-token evaluation could produce.
    assert after["eval_loss"] < before["eval_loss"] - 1.0, (before["eval_loss"], after["eval_loss"])
    printed = summary_value(out, "validation loss")
    assert f"{before['eval_loss']:.2f} -> {after['eval_loss']:.2f}" in printed, printed

    # The base model's answer next to the tuned one's, for the same question; the merged model agrees.
    question = summary_value(out, "question:")
    base_answer, tuned_answer = summary_value(out, "base model:"), summary_value(out, "tuned model:")
    assert question and base_answer and tuned_answer and "(empty)" not in (base_answer, tuned_answer)
    assert base_answer != tuned_answer
    assert f"generation: {tuned_answer}" in out and f"merged generation: {tuned_answer}" in out
    assert summary_value(out, "merged model gives the same answer as base + adapter:") == "yes"
    # The pipeline ends by asking the tuned adapter through serve.py with the openai client.
    assert f"served generation: {tuned_answer}" in out
    assert summary_value(out, "served (serve.py, OpenAI API) gives the same answer:") == "yes"

    # It ends with the perplexity of base and tuned model on held-out text (the validation split's answers),
    # from eval/perplexity.py's reports: training on GSM8K must lower it (about 112 -> 15).
    ppl = {k: json.loads((run_dir / f"ppl-{k}" / "report.json").read_text()) for k in ("base", "tuned")}
    assert ppl["base"]["tokens_scored"] == ppl["tuned"]["tokens_scored"] > 10000
    assert ppl["tuned"]["ppl"] < ppl["base"]["ppl"] / 2, (ppl["base"]["ppl"], ppl["tuned"]["ppl"])
    assert len((run_dir / "heldout.jsonl").read_text().splitlines()) == json.loads(
        (data / "data_report.json").read_text())["splits"]["validation"]
    printed = summary_value(out, "perplexity on held-out GSM8K answers")
    assert f"base {ppl['base']['ppl']:.2f} -> tuned {ppl['tuned']['ppl']:.2f}" in printed, printed

    # Then the merged model is quantized (GPTQ 4-bit), generated from and served; the report's delta is printed.
    gptq = run_dir / "gptq"
    quant = json.loads((gptq / "quant_report.json").read_text())
    assert json.loads((gptq / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert quant["layers_quantized"] == 20 and 0 <= quant["delta_ppl"] < 0.2 * quant["ppl_before"]
    printed = summary_value(out, "GPTQ 4-bit")
    assert f"{quant['ppl_before']:.3f} -> {quant['ppl_after']:.3f}" in printed, printed
    quant_answer = summary_value(out, "quantized model:")
    assert quant_answer and "(empty)" != quant_answer and f"quantized generation: {quant_answer}" in out
    assert summary_value(out, "served quantized model gives the same answer:") == "yes"

    # Where everything is, and what to run next.
    for path in (data, run_dir / "base_eval.json", lora, lora / "loss.png", run_dir / "answers.jsonl", merged):
        assert path.exists() and f" {path}\n" in out, path
    assert (lora / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"python generate.py --lora_weights {lora}" in out

    # Re-running is a no-op: two of the demo's own stage commands (the whole demo is not run twice).
    written = {p: p.read_bytes() for p in (data / "pipeline.json", lora / "pipeline.json", lora / "metrics.jsonl")}
    again = subprocess.run(["bash", "scripts/pipeline.sh", "data", "finetune"], cwd=REPO,
                           env={**env, "PY": sys.executable}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"^prepare_data: .*nothing to do$", again.stderr, re.M), again.stderr[-3000:]
    assert re.search(r"^finetune: .*nothing to do$", again.stderr, re.M), again.stderr[-3000:]
    assert {p: p.read_bytes() for p in written} == written
    assert "== what " not in again.stdout  # a stage list runs those stages only, without the summary
