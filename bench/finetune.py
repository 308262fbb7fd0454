"""Benchmark: LoRA fine-tuning throughput and memory of finetune.py against the alpaca-lora recipe.

Both runs, each in its own process, train the same randomly initialised Llama (58.1M parameters: the
vocabulary-32000, d=512, 8-layer model of ../shared/reference/perf.md §B.3, with a 32000-token
byte-level BPE trained here on the shared data, about 3.9 characters per token on GSM8K, as LLaMA's
own) with the same LoRA (r 8, alpha 16, q_proj/v_proj, dropout 0.05) for one epoch over the same 512
GSM8K examples prepared once by prepare_data.py (cutoff 256, same masking), fp32 on CPU, effective
batch 128:

* ours:      ``finetune.py`` with its defaults (rows sorted by length within each step, cut into
  micro-batches of 4; the output head only at trained positions);
* reference: Hugging Face ``Trainer`` with ``DataCollatorForSeq2Seq`` padding to the longest row of each
  micro-batch of 4 (pad_to_multiple_of 8, as alpaca-lora), no length grouping.

Reported: real (non-padding) tokens per second (wall time, model load and save included in both),
the same ratio in CPU seconds (steadier on a shared machine), peak resident memory, our model FLOP/s
(4 x non-embedding parameters per token, output head included) as a fraction of torch's fp32 matmul
peak measured in the same run, and the fraction the hardware really did (the head counted only at
trained positions). Ends with ``RESULT {json}``.

    .venv/bin/python bench/finetune.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
N_EXAMPLES, CUTOFF, MICRO, BATCH, VOCAB = 512, 256, 4, 128, 32000
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])

CHILD_OURS = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import finetune
from utils.cli import run
t0 = time.perf_counter()
run(finetune.main, ["--base_model", sys.argv[2], "--data_path", sys.argv[3], "--output_dir", sys.argv[4],
    "--method", "lora", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
    "--lora_target_modules", "q_proj", "v_proj", "--batch_size", "128", "--micro_batch_size", "4",
    "--num_epochs", "1", "--logging_steps", "0", "--save_steps", "0", "--learning_rate", "3e-4", "--notensorboard"])
usage = resource.getrusage(resource.RUSAGE_SELF)
print("CHILD " + json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                             "peak_rss_mib": usage.ru_maxrss / 1024}))
"""

CHILD_REF = r"""
import json, resource, sys, time
import torch
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments)
lora = json.loads(sys.argv[5])
t0 = time.perf_counter()
torch.manual_seed(42)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[2]), LoraConfig(task_type="CAUSAL_LM", **lora))
tok = AutoTokenizer.from_pretrained(sys.argv[2])
tok.pad_token_id = 0
data = load_from_disk(sys.argv[3] + "/dataset")["train"].remove_columns(["length", "source", "line"])
data = data.map(lambda r: {"attention_mask": [1] * len(r["input_ids"])})
args = TrainingArguments(output_dir=sys.argv[4], per_device_train_batch_size=4, gradient_accumulation_steps=32,
                         num_train_epochs=1, learning_rate=3e-4, logging_steps=1000, save_strategy="no",
                         report_to=[], use_cpu=True, dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=data,
                  data_collator=DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, return_tensors="pt", padding=True))
trainer.train()
model.save_pretrained(sys.argv[4])
usage = resource.getrusage(resource.RUSAGE_SELF)
print("CHILD " + json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                             "peak_rss_mib": usage.ru_maxrss / 1024}))
"""


def matmul_peak_flops(n: int = 1024, seconds: float = 3.0) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def train_tokenizer(out: Path):
    """A LLaMA-sized (32000) byte-level BPE tokenizer that adds BOS, trained on the shared English data.

    stories260K's 512-piece tokenizer would make GSM8K twice as long in tokens and the output head
    negligible, which is not the workload alpaca-lora's recipe was written for."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alpaca = [json.loads((SHARED / "data/alpaca" / f).read_text(encoding="utf-8"))
              for f in ("gsm8k_train.json", "gpteacher_roleplay.json")]
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for rows in alpaca for r in rows]
    with open(SHARED / "data/tinystories/valid_sample.jsonl", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))
    return fast


def child(code: str, *argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("CHILD "))
    return json.loads(line[len("CHILD "):])


def main() -> None:
    import torch
    from datasets import load_from_disk
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    import prepare_data
    from utils.cli import run

    work = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    base = work / "base"
    tok = train_tokenizer(base)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(base))
    n_params = sum(p.numel() for p in model.parameters())
    non_embedding = n_params - model.get_input_embeddings().weight.numel()  # the output head included
    head = model.get_output_embeddings().weight.numel()
    del model

    rows = json.loads((SHARED / "data/alpaca/gsm8k_train.json").read_text(encoding="utf-8"))[:N_EXAMPLES]
    src = work / "gsm.json"
    src.write_text(json.dumps(rows))
    data = work / "data"
    run(prepare_data.main, ["--base_model", str(base), "--data_path", str(src), "--output_dir", str(data),
                            "--cutoff_len", str(CUTOFF), "--val_set_size", "0", "--on_overlength", "truncate"])
    train = load_from_disk(str(data / "dataset"))["train"]
    real_tokens = sum(train["length"])
    trained_tokens = sum(sum(1 for t in labels[1:] if t != -100) for labels in train["labels"])

    peak = matmul_peak_flops()
    ref = child(CHILD_REF, str(REPO), str(base), str(data), str(work / "ref"), json.dumps(LORA))
    ours = child(CHILD_OURS, str(REPO), str(base), str(data), str(work / "ours"))
    ours_tps, ref_tps = real_tokens / ours["seconds"], real_tokens / ref["seconds"]
    result = {
        "parameters": n_params, "non_embedding_parameters": non_embedding, "examples": len(train),
        "real_tokens": real_tokens, "trained_tokens": trained_tokens,
        "ours_tokens_per_s": round(ours_tps, 1), "reference_tokens_per_s": round(ref_tps, 1),
        "ours_peak_rss_mib": round(ours["peak_rss_mib"]), "reference_peak_rss_mib": round(ref["peak_rss_mib"]),
        "speedup_vs_reference": round(ours_tps / ref_tps, 3),
        "peak_mem_ratio_vs_reference": round(ours["peak_rss_mib"] / ref["peak_rss_mib"], 3),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_fraction": round(4 * non_embedding * ours_tps / peak, 3),
        # What the hardware really did: the output head runs only at trained positions in our loop.
        "hardware_flop_fraction": round(4 * (non_embedding - head) * ours_tps / peak
                                        + 4 * head * trained_tokens / ours["seconds"] / peak, 3),
        # CPU seconds are less sensitive than wall time to other work on a shared machine.
        "cpu_time_speedup_vs_reference": round(ref["cpu_seconds"] / ours["cpu_seconds"], 3),
        "note": "seconds include model load and save in both runs",
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
