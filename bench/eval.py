"""Evaluation speed and agreement (P7, P7b), on CPU.

P7, perplexity: ``utils.evaluation.perplexity.perplexity`` (the core of eval/perplexity.py, in this process) against
a bare batched forward over the same windows, on two models: a randomly initialised Llama of 58M parameters
(bench/generate.py's ``random_llama``: vocabulary 32000, d=512, 8 layers) with its locally trained 32000-token
byte-level BPE tokenizer, and the real stories260K. The text: GSM8K answers (../shared/data/alpaca/gsm8k_train.json,
``output`` field) joined with blank lines, cut to about --ppl_tokens tokens; windows of 512 tokens every 256.
  ours   ``perplexity(model, tok, texts, max_length=512, stride=256, batch_size=B)``: tokenization, windows,
         scoring, exact summation;
  bare   the same windows stacked into batches of B (the last, shorter window alone) through ``model(input_ids)``
         under ``torch.inference_mode()``: full logits, no loss, no bookkeeping;
  naive  Hugging Face's guide written out one window at a time (full logits, cross-entropy on each window's new
         tokens), for the agreement figure ``ppl_rel_diff_vs_naive`` only (not timed).
Both timed methods run twice, alternating; each figure is the faster run. Target: ours >= 0.9x bare tokens/s.

P7b, multiple choice against lm-eval: ``eval/multiple_choice.py`` against ``lm_eval --model hf`` (lm-eval 0.4.13), each
in its own process, timed end to end (start-up, load, scoring) as a user times them, on the same model and task:
a randomly initialised Llama of 19.5M parameters (vocabulary 32000 with the BPE tokenizer above, d=256, 4 layers,
2048 positions: a real vocabulary's output head, with room for 5-shot prompts), fp32 on CPU, the same
--batch_size. The task is written here from real text: --mc_questions GSM8K questions (in file order) in 4
subjects, each with its true answer (the last number of its worked answer) and, as distractors, the answers of
three other questions, at a seeded random position; 5 dev rows per subject are the shots (5-shot). For us as
MMLU's CSV layout; for lm-eval as two local YAML tasks per subject (``dataset_path: json``, ``--include_path``),
both with MMLU's prompt: the letters (``acc``) and the choice texts (``acc_norm``; the shots keep their letter
answers through ``fewshot_config``), the two things one run of ours scores. Compared per question: every
log-likelihood (letters and texts), and the picks (``acc`` / ``acc_norm``). Target: questions/s >= 1.5x
lm-eval's, log-likelihoods within 1e-4, equal accuracy.

Run: .venv/bin/python bench/eval.py [--ppl_tokens 65536] [--batch_size 8] [--mc_questions 404] [--threads 0]
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

GSM8K = SHARED / "data" / "alpaca" / "gsm8k_train.json"
MAX_LENGTH, STRIDE = 512, 256


def gsm8k_texts(tok, tokens: int) -> list[str]:
    """GSM8K answers, in file order, until their joined text holds about ``tokens`` tokens."""
    texts, total = [], 0
    for row in json.loads(GSM8K.read_text(encoding="utf-8")):
        texts.append(row["output"])
        total += len(tok(row["output"], add_special_tokens=False)["input_ids"]) + 1
        if total >= tokens:
            break
    return texts


def bare_forward(model, ids: list[int], batch_size: int) -> float:
    """Seconds for the windows of ``ids`` through ``model(input_ids)``, batched, nothing else."""
    import torch

    from utils.evaluation.perplexity import plan_windows

    windows = [ids[w.start:w.end] for w in plan_windows(len(ids), MAX_LENGTH, STRIDE)]
    full = [w for w in windows if len(w) == MAX_LENGTH]
    rest = [w for w in windows if len(w) != MAX_LENGTH]
    started = time.perf_counter()
    with torch.inference_mode():
        for at in range(0, len(full), batch_size):
            model(input_ids=torch.tensor(full[at:at + batch_size]))
        for w in rest:
            model(input_ids=torch.tensor([w]))
    return time.perf_counter() - started


def naive_ppl(model, ids: list[int]) -> float:
    """Hugging Face's perplexity guide with exact counting, one window at a time."""
    import torch
    import torch.nn.functional as F

    total, count, prev_end = 0.0, 0, 1
    with torch.inference_mode():
        for begin in range(0, len(ids), STRIDE):
            end = min(begin + MAX_LENGTH, len(ids))
            window = ids[begin:end]
            logits = model(input_ids=torch.tensor([window])).logits[0].float()
            first = prev_end - begin
            total += float(F.cross_entropy(logits[first - 1:-1], torch.tensor(window[first:]), reduction="sum"))
            count += len(window) - first
            prev_end = end
            if end == len(ids):
                break
    return math.exp(total / count)


def bench_perplexity(name: str, model, tok, tokens: int, batch_size: int) -> dict:
    from utils.evaluation.perplexity import encode_documents, perplexity

    texts = gsm8k_texts(tok, tokens)
    ids = encode_documents(tok, ["\n\n".join(texts)], add_bos=True)[0]
    ours_s, bare_s, report = [], [], None
    for _ in range(2):
        started = time.perf_counter()
        report = perplexity(model, tok, texts, max_length=MAX_LENGTH, stride=STRIDE, batch_size=batch_size,
                            add_bos=True, progress=False)
        ours_s.append(time.perf_counter() - started)
        bare_s.append(bare_forward(model, ids, batch_size))
    scored = report["tokens_scored"]
    naive = naive_ppl(model, ids)
    figures = {
        "tokens_scored": scored, "windows": report["windows"], "ppl": report["ppl"],
        "eval_tokens_per_s": round(scored / min(ours_s), 1), "bare_forward_tokens_per_s": round(scored / min(bare_s), 1),
        "throughput_ratio": round(min(bare_s) / min(ours_s), 3),
        "ppl_rel_diff_vs_naive": abs(report["ppl"] - naive) / naive,
    }
    print(f"{name}: {json.dumps(figures)}", file=sys.stderr)
    return figures


SUBJECTS = ("gsm8k_money", "gsm8k_time", "gsm8k_counting", "gsm8k_measures")  # names only: file-order chunks
LM_EVAL_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def final_number(answer: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", answer)
    return found[-1].replace(",", "") if found else None


def mc_questions(n_test: int, shots: int = 5) -> dict[str, dict[str, list[dict]]]:
    """subject -> {"dev": rows, "test": rows}, rows {question, choices, answer}: GSM8K questions with the true
    answer and three other questions' answers (distinct numbers) as distractors."""
    rows = [(r["instruction"], final_number(r["output"])) for r in json.loads(GSM8K.read_text(encoding="utf-8"))]
    rows = [(q, a) for q, a in rows if a is not None]
    rng = random.Random(0)
    per = -(-n_test // len(SUBJECTS))
    out, at = {}, 0
    for subject in SUBJECTS:
        out[subject] = {"dev": [], "test": []}
        for split, count in (("dev", shots), ("test", per)):
            for _ in range(count):
                question, answer = rows[at]
                at += 1
                others = []
                for _, other in rows[at:] + rows[:at]:
                    if other != answer and other not in others:
                        others.append(other)
                    if len(others) == 3:
                        break
                rng.shuffle(others)
                pos = rng.randrange(4)
                choices = others[:pos] + [answer] + others[pos:]
                out[subject][split].append({"question": question, "choices": choices, "answer": pos})
    return out


def write_mc_task(root: Path, questions: dict) -> tuple[Path, Path, list[str]]:
    """(MMLU CSV folder for us, lm-eval --include_path folder, lm-eval task names)."""
    import yaml

    csv_dir, tasks = root / "mmlu", root / "tasks"
    csv_dir.mkdir(parents=True)
    tasks.mkdir()
    names = []
    for subject, splits in questions.items():
        files = {}
        for split, rows in splits.items():
            with open(csv_dir / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(
                    [r["question"], *r["choices"], "ABCD"[r["answer"]]] for r in rows)
            files[split] = tasks / f"{subject}_{split}.jsonl"
            files[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        base = {"dataset_path": "json", "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                "test_split": "test", "fewshot_split": "dev", "output_type": "multiple_choice",
                "description": f"The following are multiple choice questions (with answers) about "
                               f"{subject.replace('_', ' ')}.\n\n",
                "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                               "D. {{choices[3]}}\nAnswer:",
                "doc_to_target": "answer"}
        for kind, choice, extra in (
                ("letters", ["A", "B", "C", "D"], {"fewshot_config": {"sampler": "first_n"},
                                                   "metric_list": [{"metric": "acc"}]}),
                ("texts", "{{choices}}", {"fewshot_config": {"sampler": "first_n", "doc_to_choice": ["A", "B", "C", "D"]},
                                          "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]})):
            name = f"bench_{subject}_{kind}"
            (tasks / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **base, "doc_to_choice": choice, **extra},
                                                               sort_keys=False), encoding="utf-8")
            names.append(name)
    return csv_dir, tasks, names


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return took


def bench_multiple_choice(n_questions: int, batch_size: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.generate import bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = bpe_tokenizer(32000)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        model.save_pretrained(str(root / "model"))
        tok.save_pretrained(str(root / "model"))
        questions = mc_questions(n_questions)
        csv_dir, tasks, names = write_mc_task(root, questions)
        env = {**os.environ, **LM_EVAL_ENV, "HF_DATASETS_CACHE": str(root / "datasets_cache")}
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
        ours_s = timed([sys.executable, str(REPO / "eval" / "multiple_choice.py"), "--base_model", str(root / "model"),
                        "--data_dir", str(csv_dir), "--k_shot", "5", "--batch_size", str(batch_size), "--dtype", "fp32",
                        "--device", "cpu", "--output_dir", str(root / "ours"), "--noprogress"], REPO, env)
        theirs_s = timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={root / 'model'},dtype=float32", "--tasks", ",".join(names), "--include_path",
                          str(tasks), "--num_fewshot", "5", "--batch_size", str(batch_size), "--device", "cpu",
                          "--output_path", str(root / "lm_eval"), "--log_samples"], root, env)
        ours = [json.loads(line) for line in (root / "ours" / "predictions.jsonl").read_text().splitlines()]
        samples = {}
        for name in names:
            [path] = (root / "lm_eval").rglob(f"samples_{name}_*.jsonl")
            samples[name] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    by_subject: dict[str, list[dict]] = {}
    for row in ours:
        by_subject.setdefault(row["subject"], []).append(row)
    diff, same_acc, same_norm, n = 0.0, True, True, 0
    for subject, rows in by_subject.items():
        letters, texts = samples[f"bench_{subject}_letters"], samples[f"bench_{subject}_texts"]
        assert len(rows) == len(letters) == len(texts)
        for ours_row, lt, tx in zip(rows, letters, texts):
            their_letters = [float(ll) for ll, _ in lt["filtered_resps"]]
            their_texts = [float(ll) for ll, _ in tx["filtered_resps"]]
            diff = max(diff, *(abs(a - b) for a, b in zip(ours_row["loglik_letters"], their_letters)),
                       *(abs(a - b) for a, b in zip(ours_row["loglik_choices"], their_texts)))
            same_acc &= float(ours_row["correct"]) == float(lt["acc"])
            same_norm &= float(ours_row["correct_norm"]) == float(tx["acc_norm"])
            n += 1
    figures = {"mc_questions": n, "mc_model_params_m": round(params, 1),
               "mc_ours_s": round(ours_s, 2), "mc_lm_eval_s": round(theirs_s, 2),
               "mc_ours_questions_per_s": round(n / ours_s, 2), "mc_lm_eval_questions_per_s": round(n / theirs_s, 2),
               "mc_speedup_vs_lm_eval": round(theirs_s / ours_s, 2), "mc_max_loglik_diff_vs_lm_eval": diff,
               "mc_acc_equal": bool(same_acc and same_norm),
               "mc_acc": sum(r["correct"] for r in ours) / n, "mc_acc_norm": sum(r["correct_norm"] for r in ours) / n}
    print(f"multiple choice: {json.dumps(figures)}", file=sys.stderr)
    return figures


def main(ppl_tokens: int = 65536, batch_size: int = 8, mc_questions: int = 404, threads: int = 0,
         perplexity: bool = True, multiple_choice: bool = True) -> None:
    """Run the benchmark.

    Args:
        ppl_tokens: About how many tokens of GSM8K text the perplexity part scores.
        batch_size: Windows (P7) and questions (P7b) per forward pass, ours and the baselines'.
        mc_questions: Questions of the multiple-choice task (P7b), over 4 subjects.
        threads: torch threads (0: torch's default).
        perplexity: Run P7.
        multiple_choice: Run P7b.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    from bench.generate import bpe_tokenizer, random_llama

    summary: dict = {}
    if perplexity:
        tok = bpe_tokenizer(32000)
        results = {"llama58M": bench_perplexity("llama58M", random_llama(tok), tok, ppl_tokens, batch_size)}
        stories = SHARED / "models" / "stories260K" / "hf"
        s_tok = AutoTokenizer.from_pretrained(str(stories), local_files_only=True)
        s_model = AutoModelForCausalLM.from_pretrained(str(stories), local_files_only=True, dtype=torch.float32).eval()
        results["stories260K"] = bench_perplexity("stories260K", s_model, s_tok, ppl_tokens, batch_size)
        head = results["llama58M"]
        summary.update({
            "throughput_ratio": head["throughput_ratio"],
            "eval_tokens_per_s": head["eval_tokens_per_s"],
            "bare_forward_tokens_per_s": head["bare_forward_tokens_per_s"],
            "ppl": head["ppl"],
            "ppl_rel_diff_vs_naive": max(r["ppl_rel_diff_vs_naive"] for r in results.values()),
            "stories260K_throughput_ratio": results["stories260K"]["throughput_ratio"],
            "stories260K_ppl": results["stories260K"]["ppl"],
        })
    if multiple_choice:
        summary.update(bench_multiple_choice(mc_questions, batch_size, threads))
    summary.update({"batch_size": batch_size, "threads": torch.get_num_threads()})
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    from utils.cli import run

    run(main)
