"""Benchmark: label construction speed of utils/data/encode.py against the seed projects' recipes.

Baselines, run in the same process on the same rendered text and tokenizer (stories260K's):
* alpaca-lora (finetune.py): per example, tokenize prompt+output and the prompt alone (unbatched
  ``datasets.map``), mask the prompt length.
* LLMZoo (datasets.preprocess): tokenize the whole conversation, then for every assistant turn
  re-tokenize the growing prefix twice (O(turns^2) text).

Data: ``../shared/data/alpaca/gsm8k_train.json`` (7,473 rows) and ``../shared/data/moss/moss_sft_sample.jsonl``
(1,120 multi-turn conversations, rendered with the ``moss`` template). Ends with ``RESULT {json}``:
tokens per second of each method and our speedup over each baseline.

    .venv/bin/python bench/prepare_data.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def encode_in_batches(encoder, examples, size: int = 512):
    """What prepare_data.py does: the encoder over batches of 512 examples."""
    out = []
    for i in range(0, len(examples), size):
        out += encoder.encode_batch(examples[i:i + size])
    return out


def main() -> None:
    from transformers import AutoTokenizer

    from utils.data.records import Columns, Example, load_examples
    from utils.data.encode import Encoder
    from utils.data.templates import load_template

    tok = AutoTokenizer.from_pretrained(str(SHARED / "models/stories260K/hf"), local_files_only=True)
    results = {}

    # Instruction data vs alpaca-lora.
    _, rows = load_examples(str(SHARED / "data/alpaca/gsm8k_train.json"), "auto", Columns())
    alpaca = [r for r in rows if isinstance(r, Example)]
    tpl = load_template("alpaca")
    ours = Encoder(tok, tpl, cutoff_len=10**6, on_overlength="truncate", mask_mode="assistant")
    prompts = [(tpl.generate_prompt(e.messages[0].content, e.input), e.messages[1].content) for e in alpaca]

    def run_ours():
        return encode_in_batches(ours, alpaca)

    def run_alpaca_lora():
        out = []
        for prompt, output in prompts:
            full = tok(prompt + output)["input_ids"] + [tok.eos_token_id]
            n = len(tok(prompt)["input_ids"])
            out.append((full, [-100] * n + full[n:]))
        return out

    n_tokens = sum(len(e.input_ids) for e in run_ours())
    t_ours, t_ref = best_of(run_ours), best_of(run_alpaca_lora)
    results["alpaca_tokens_per_s"] = round(n_tokens / t_ours)
    results["alpaca_lora_tokens_per_s"] = round(n_tokens / t_ref)
    results["speedup_vs_alpaca_lora"] = round(t_ref / t_ours, 2)

    # Multi-turn conversations vs LLMZoo.
    _, rows = load_examples(str(SHARED / "data/moss/moss_sft_sample.jsonl"), "auto", Columns())
    convs = [r for r in rows if isinstance(r, Example)]
    tpl = load_template("moss")
    ours = Encoder(tok, tpl, cutoff_len=10**6, on_overlength="truncate", mask_mode="assistant")
    rendered = [tpl.render(e.messages) for e in convs]

    def run_ours_conv():
        return encode_in_batches(ours, convs)

    def run_llmzoo():
        out = []
        for r in rendered:
            ids = tok(r.text)["input_ids"]
            mask = [False] * len(ids)
            for seg in r.segments:
                if seg.role == "assistant":
                    a = len(tok(r.text[:seg.start] + tpl.generation_prompt)["input_ids"])
                    b = len(tok(r.text[:seg.end])["input_ids"])
                    mask[a - 1:b] = [True] * (b - a + 1)
            out.append([t if m else -100 for t, m in zip(ids, mask)])
        return out

    n_tokens = sum(len(e.input_ids) for e in run_ours_conv())
    t_ours, t_ref = best_of(run_ours_conv, 2), best_of(run_llmzoo, 1)
    results["conversation_tokens_per_s"] = round(n_tokens / t_ours)
    results["llmzoo_tokens_per_s"] = round(n_tokens / t_ref)
    results["speedup_vs_llmzoo"] = round(t_ref / t_ours, 2)
    results["conversations"] = len(convs)
    results["conversation_tokens"] = n_tokens
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
