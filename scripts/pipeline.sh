#!/usr/bin/env bash
# The pipeline end to end on a small model built locally, as a user's shell script would chain it.
# Each stage is a separate process reading the previous stage's output folder; re-running is a no-op.
# Environment: PY (python), RUN_DIR (outputs, default runs/demo), SHARED (default ../shared).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/demo}
SHARED=${SHARED:-../shared}

echo "== 1. build a small Llama locally (random init, stories260K tokenizer)" >&2
"$PY" scripts/make_tiny_model.py --output_dir "$RUN_DIR/base" --tokenizer "$SHARED/models/stories260K/hf"

echo "== 2. prepare data: GSM8K (alpaca format) -> tokenized, masked train/validation split" >&2
"$PY" prepare_data.py --base_model "$RUN_DIR/base" --data_path "$SHARED/data/alpaca/gsm8k_train.json" \
    --output_dir "$RUN_DIR/data" --cutoff_len 512 --inspect 2

echo "== data report: $RUN_DIR/data/data_report.json" >&2
"$PY" - "$RUN_DIR/data/data_report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["totals"]
print(f"examples {t['kept']}/{t['rows']} (train {r['splits']['train']}, validation {r['splits']['validation']}), "
      f"bad {t['bad']}, dropped {t['dropped']}, truncated {t['truncated']}, "
      f"trained-token ratio {t['trained_tokens'] / t['tokens']:.3f}, lengths {r['length_percentiles']}")
PY

echo "== 3. fine-tune the small model with LoRA on the prepared data" >&2
"$PY" finetune.py --base_model "$RUN_DIR/base" --data_path "$RUN_DIR/data" --output_dir "$RUN_DIR/lora" \
    --method lora --max_steps 30 --batch_size 16 --micro_batch_size 8 --learning_rate 3e-3 --logging_steps 10

echo "== 4. generate with the tuned adapter: one answer, then the 80 Vicuna questions as a batch" >&2
echo "generation: $("$PY" generate.py --lora_weights "$RUN_DIR/lora" --max_new_tokens 40 \
    --instruction "Tom has 3 apples and buys 2 more. How many apples does he have?")"
"$PY" generate.py --lora_weights "$RUN_DIR/lora" --input_file "$SHARED/data/vicuna_question_80.jsonl" \
    --output_file "$RUN_DIR/answers.jsonl" --max_new_tokens 64 --batch_size 16

echo "== 5. export: merge the tuned adapter into the base (verified against base + adapter), generate from the merged model" >&2
"$PY" export_hf.py --lora_weights "$RUN_DIR/lora" --output_dir "$RUN_DIR/merged" --max_shard_size 200MB
echo "merged generation: $("$PY" generate.py --base_model "$RUN_DIR/merged" --max_new_tokens 40 \
    --instruction "Tom has 3 apples and buys 2 more. How many apples does he have?")"
