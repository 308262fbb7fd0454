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

P7b, multiple choice against lm-eval: see ``bench_multiple_choice`` (added with eval/multiple_choice.py).

Run: .venv/bin/python bench/eval.py [--ppl_tokens 65536] [--batch_size 8] [--threads 0]
"""

from __future__ import annotations

import json
import math
import sys
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


def main(ppl_tokens: int = 65536, batch_size: int = 8, threads: int = 0) -> None:
    """Run the benchmark.

    Args:
        ppl_tokens: About how many tokens of GSM8K text the perplexity part scores.
        batch_size: Windows (P7) and questions (P7b) per forward pass, ours and the baselines'.
        threads: torch threads (0: torch's default).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    from bench.generate import bpe_tokenizer, random_llama

    tok = bpe_tokenizer(32000)
    results = {"llama58M": bench_perplexity("llama58M", random_llama(tok), tok, ppl_tokens, batch_size)}
    stories = SHARED / "models" / "stories260K" / "hf"
    s_tok = AutoTokenizer.from_pretrained(str(stories), local_files_only=True)
    s_model = AutoModelForCausalLM.from_pretrained(str(stories), local_files_only=True, dtype=torch.float32).eval()
    results["stories260K"] = bench_perplexity("stories260K", s_model, s_tok, ppl_tokens, batch_size)
    head = results["llama58M"]
    summary = {
        "throughput_ratio": head["throughput_ratio"],
        "eval_tokens_per_s": head["eval_tokens_per_s"],
        "bare_forward_tokens_per_s": head["bare_forward_tokens_per_s"],
        "ppl": head["ppl"],
        "ppl_rel_diff_vs_naive": max(r["ppl_rel_diff_vs_naive"] for r in results.values()),
        "stories260K_throughput_ratio": results["stories260K"]["throughput_ratio"],
        "stories260K_ppl": results["stories260K"]["ppl"],
        "batch_size": batch_size, "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    from utils.cli import run

    run(main)
