"""eval/multiple_choice.py on a 12-question, 3-subject set written here in MMLU's, C-Eval's and the JSONL layout,
with few-shot: every per-choice log-likelihood equals a separate plain forward of prompt + choice, the accuracy
per subject is what those log-likelihoods imply, the three layouts agree, the batch size changes nothing,
adapters (LoRA unmerged, prefix, prompt tuning) score as the PEFT model does, malformed rows are counted, a
prompt too long for the context loses its oldest shots, and a re-run is a no-op."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from choice_sets import twelve_questions, write_ceval, write_jsonl, write_mmlu
from conftest import REPO, peft_adapters, tiny_model
from utils.cli import run
from utils.evaluation.choice_data import LETTERS, build_prompt, pick_shots, read_questions, subject_title


def evaluate(out: Path, *flags: str) -> tuple[dict, list[dict]]:
    """eval/multiple_choice.py in this process, as its command line would run it: (report, predictions)."""
    multiple_choice = importlib.import_module("eval.multiple_choice")  # eval/ is a namespace package of the root
    run(multiple_choice.main, [*flags, "--output_dir", str(out), "--noprogress"])
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return report, rows


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc_sets")
    qs = twelve_questions()
    write_jsonl(root / "dev.jsonl", [q for q in qs if q["split"] == "dev"])
    write_jsonl(root / "test.jsonl", [q for q in qs if q["split"] == "test"])
    return {"mmlu": ["--data_dir", str(write_mmlu(root / "mmlu", qs))],
            "ceval": ["--data_dir", str(write_ceval(root / "ceval", qs)), "--lang", "en"],
            "jsonl": ["--data_file", str(root / "test.jsonl"), "--dev_file", str(root / "dev.jsonl")]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("mc") / "tiny", positions=1024, width=64)


def load(base: Path, adapter: Path | None = None):
    from utils.inference.loading import load_for_inference

    loaded = load_for_inference(str(base), str(adapter) if adapter else None, log=lambda m: None)
    return loaded.model, loaded.tokenizer


def reference_logliks(model, tok, data_flags: list[str], k: int = 5) -> dict[tuple, tuple[list[float], list[float]]]:
    """(subject, question id) -> (letter log-likelihoods, choice-text log-likelihoods), each from its own plain forward of
    prompt + continuation through the model's own forward, the continuation's tokens split as lm-eval does."""
    kind, path = data_flags[0], data_flags[1]
    qs = read_questions(data_dir=path) if kind == "--data_dir" else read_questions(data_file=path,
                                                                                    dev_file=data_flags[3])
    out = {}
    for subject, items in qs.evaluated.items():
        for q in items:
            prompt, _ = build_prompt(q, pick_shots(q, qs.shots[subject], k), "en", subject_title(subject),
                                     lambda t: True)
            context = tok(prompt)["input_ids"]

            def loglik(cont: str) -> float:
                ids = tok(prompt + cont)["input_ids"]
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -len(ids):].float(), -1)
                return sum(float(logp[j - 1, ids[j]]) for j in range(len(context), len(ids)))

            out[subject, q.id] = ([loglik(" " + LETTERS[i]) for i in range(len(q.choices))],
                         [loglik(" " + c) for c in q.choices])
    return out


def implied(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """subject -> (acc, acc_norm) recomputed from the predictions' own log-likelihoods."""
    by: dict[str, list[tuple[bool, bool]]] = {}
    for r in rows:
        letters, texts, chars = r["loglik_letters"], r["loglik_choices"], r["choice_chars"]
        pick = max(range(len(letters)), key=lambda i: (letters[i], -i))
        pick_norm = max(range(len(texts)), key=lambda i: (texts[i] / chars[i], -i))
        by.setdefault(r["subject"], []).append((LETTERS[pick] == r["answer"], LETTERS[pick_norm] == r["answer"]))
    return {s: (sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)) for s, v in by.items()}


@pytest.mark.parametrize("kind", ["mmlu", "ceval", "jsonl"])
def test_logliks_equal_a_separate_forward_per_choice_in_every_layout(tmp_path, tiny, sets, kind):
    report, rows = evaluate(tmp_path / "out", "--base_model", str(tiny), *sets[kind])
    model, tok = load(tiny)
    ref = reference_logliks(model, tok, sets[kind])
    assert len(rows) == report["questions"] == 6 and {(r["subject"], r["id"]) for r in rows} == set(ref)
    for r in rows:
        letters, texts = ref[r["subject"], r["id"]]
        assert r["loglik_letters"] == pytest.approx(letters, abs=1e-4)
        assert r["loglik_choices"] == pytest.approx(texts, abs=1e-4)
        assert r["shots"] == 2  # both dev rows of the subject (k_shot 5, two offered)
    for subject, (acc, acc_norm) in implied(rows).items():
        assert report["subjects"][subject] == {"n": 2, "acc": acc, "acc_norm": acc_norm}
    assert report["macro_acc"] == pytest.approx(sum(a for a, _ in implied(rows).values()) / 3)
    assert report["acc"] == sum(r["correct"] for r in rows) / 6


def test_layouts_agree_and_the_batch_size_changes_nothing(tmp_path, tiny, sets):
    runs = {kind: evaluate(tmp_path / kind, "--base_model", str(tiny), *sets[kind])[1] for kind in sets}
    _, one = evaluate(tmp_path / "b1", "--base_model", str(tiny), *sets["mmlu"], "--batch_size", "1")

    def by_text(rows):
        return sorted((r["subject"], r["answer"], r["pred"], r["pred_norm"]) for r in rows)

    assert by_text(runs["mmlu"]) == by_text(runs["ceval"]) == by_text(runs["jsonl"]) == by_text(one)
    for a, b in zip(runs["mmlu"], one):
        assert a["loglik_letters"] == pytest.approx(b["loglik_letters"], abs=1e-5)
        assert a["loglik_choices"] == pytest.approx(b["loglik_choices"], abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_unmerged_adapters_score_as_the_peft_model_does(tmp_path, tiny, sets, method):
    adapter = peft_adapters(tiny, tmp_path / "adapters")[method]
    _, rows = evaluate(tmp_path / "out", "--lora_weights", str(adapter), *sets["jsonl"])
    model, tok = load(tiny, adapter)
    ref = reference_logliks(model, tok, sets["jsonl"])
    base = reference_logliks(*load(tiny), sets["jsonl"])
    moved = 0.0
    for r in rows:
        key = r["subject"], r["id"]
        assert r["loglik_choices"] == pytest.approx(ref[key][1], abs=1e-4)
        assert r["loglik_letters"] == pytest.approx(ref[key][0], abs=1e-4)
        moved = max(moved, max(abs(a - b) for a, b in zip(r["loglik_choices"], base[key][1])))
    assert moved > 1e-3  # the adapter is really applied


def test_malformed_rows_are_counted_and_strict_stops(tmp_path, tiny):
    qs = twelve_questions()
    folder = write_mmlu(tmp_path / "mmlu", qs)
    bad = folder / "abstract_algebra_test.csv"
    bad.write_text(bad.read_text(encoding="utf-8") + "only,three,columns\nQ?,a,b,c,d,E\n", encoding="utf-8")
    report, rows = evaluate(tmp_path / "out", "--base_model", str(tiny), "--data_dir", str(folder))
    assert len(rows) == 6 and sum(report["malformed"].values()) == 2
    flat = [where for v in report["malformed_rows"].values() for where in v]
    assert any(w.endswith("abstract_algebra_test.csv:3") for w in flat)
    assert any(w.endswith("abstract_algebra_test.csv:4") for w in flat)
    proc = subprocess.run([sys.executable, "eval/multiple_choice.py", "--base_model", str(tiny), "--data_dir",
                           str(folder), "--strict"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "abstract_algebra_test.csv:3" in proc.stderr and "Traceback" not in proc.stderr


def test_a_long_prompt_loses_its_oldest_shots_and_reruns_are_no_ops(tmp_path):
    short = tiny_model("llama", tmp_path / "short", positions=200, width=64)
    qs = twelve_questions()
    folder = write_mmlu(tmp_path / "mmlu", qs)
    out = tmp_path / "out"
    report, rows = evaluate(out, "--base_model", str(short), "--data_dir", str(folder))
    assert report["shots_cut"] > 0 and all(r["context_tokens"] < 200 for r in rows)
    assert any(r["shots"] == 1 for r in rows)
    # The kept shot is the newest: the second dev row of the subject.
    model, tok = load(short)
    questions = read_questions(data_dir=str(folder))
    row = next(r for r in rows if r["shots"] == 1)
    q = next(q for q in questions.evaluated[row["subject"]] if q.id == row["id"])
    newest = questions.shots[row["subject"]][1]
    context = tok(build_prompt(q, [newest], "en", subject_title(q.subject), lambda t: True)[0])["input_ids"]
    assert row["context_tokens"] == len(context)
    mtime = (out / "predictions.jsonl").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "eval/multiple_choice.py", "--base_model", str(short), "--data_dir",
                           str(folder), "--output_dir", str(out), "--batch_size", "3"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to do" in proc.stderr and json.loads(proc.stdout)["acc"] == report["acc"]
    assert (out / "predictions.jsonl").stat().st_mtime_ns == mtime


def test_chat_template_wraps_the_prompt_and_is_recorded(tmp_path, tiny, sets):
    report, rows = evaluate(tmp_path / "out", "--base_model", str(tiny), *sets["mmlu"], "--chat_template",
                            "--prompt_template", "alpaca")
    plain, plain_rows = evaluate(tmp_path / "plain", "--base_model", str(tiny), *sets["mmlu"])
    assert report["chat_template"] is True and report["template"] == "alpaca"
    assert plain["chat_template"] is False and plain["template"] is None
    assert all(a["context_tokens"] > b["context_tokens"] for a, b in zip(rows, plain_rows))


def test_bad_arguments_are_reported_together(tmp_path, tiny):
    proc = subprocess.run([sys.executable, "eval/multiple_choice.py", "--base_model", str(tiny), "--data_dir",
                           str(tmp_path / "nope"), "--k_shot", "-1", "--batch_size", "0"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    for word in ("nope", "--k_shot", "--batch_size"):
        assert word in proc.stderr
