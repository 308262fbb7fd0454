#!/usr/bin/env bash
# The pipeline end to end, as a user's shell script would chain it: teach the real pretrained stories260K
# (a 260K-parameter Llama that writes children's stories) to answer GSM8K arithmetic questions with LoRA,
# then show what it learned: validation loss before -> after and the base model's answer next to the
# tuned one's. Each stage is a separate process reading the previous stage's output folder; re-running
# is a no-op. Diagnostics go to stderr, the answers and the closing summary to stdout.
# Environment: PY (python), RUN_DIR (outputs, default runs/demo), SHARED (default ../shared).
# Usage: scripts/pipeline.sh [STAGE ...]: given stage names (data, score, finetune, generate, export, serve, eval,
# quantize), runs
# only those, in that order, without the summary; e.g. `scripts/pipeline.sh finetune` re-runs one stage.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/demo}
SHARED=${SHARED:-../shared}
BASE="$SHARED/models/stories260K/hf"
QUESTION="Tom has 3 apples and buys 2 more. How many apples does he have?"
# 40 steps of 16 examples (640 of the 5,291 training examples) take about two minutes on 2 CPU cores and
# move the model from stories to worked arithmetic; the validation loss flattens after about 100 steps.
STEPS=40
STAGES=(data score finetune generate export serve eval quantize)

stage_data() {
    echo "== 1. prepare data: GSM8K (alpaca format) -> tokenized, masked train/validation split" >&2
    # stories260K reads 512 tokens and its 512-piece vocabulary spells numbers digit by digit: the short
    # alpaca template leaves room for the answer, and the 27% of examples longer than 384 tokens are
    # dropped (counted in the report) rather than cut mid-answer.
    "$PY" prepare_data.py --base_model "$BASE" --data_path "$SHARED/data/alpaca/gsm8k_train.json" \
        --output_dir "$RUN_DIR/data" --prompt_template_name alpaca_short --cutoff_len 384 --on_overlength drop \
        --val_set_size 128 --inspect 2
    echo "== data report: $RUN_DIR/data/data_report.json" >&2
    "$PY" - "$RUN_DIR/data/data_report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["totals"]
print(f"examples {t['kept']}/{t['rows']} (train {r['splits']['train']}, validation {r['splits']['validation']}), "
      f"bad {t['bad']}, dropped {t['dropped']}, truncated {t['truncated']}, "
      f"trained-token ratio {t['trained_tokens'] / t['tokens']:.3f}, lengths {r['length_percentiles']}")
PY
}

stage_score() {
    echo "== 2. score the base model on the validation split (the 'before' of the fine-tune)" >&2
    "$PY" scripts/score_validation.py --model "$BASE" --data_path "$RUN_DIR/data" \
        --output_file "$RUN_DIR/base_eval.json"
}

stage_finetune() {
    echo "== 3. fine-tune stories260K with LoRA on the prepared data ($STEPS steps, evaluated every 10)" >&2
    "$PY" finetune.py --base_model "$BASE" --data_path "$RUN_DIR/data" --output_dir "$RUN_DIR/lora" \
        --method lora --max_steps "$STEPS" --batch_size 16 --micro_batch_size 8 --learning_rate 1e-2 \
        --eval_steps 10 --logging_steps 10
}

stage_generate() {
    echo "== 4. generate: the base model and the tuned adapter answer the same question," \
        "then the tuned adapter answers the 80 Vicuna questions as a batch" >&2
    # The base gets the template the adapter was trained with: the two answers differ only by the training.
    BASE_ANSWER=$("$PY" generate.py --base_model "$BASE" --prompt_template alpaca_short --max_new_tokens 40 \
        --instruction "$QUESTION")
    echo "base generation: $BASE_ANSWER"
    TUNED_ANSWER=$("$PY" generate.py --lora_weights "$RUN_DIR/lora" --max_new_tokens 40 --instruction "$QUESTION")
    echo "generation: $TUNED_ANSWER"
    "$PY" generate.py --lora_weights "$RUN_DIR/lora" --input_file "$SHARED/data/vicuna_question_80.jsonl" \
        --output_file "$RUN_DIR/answers.jsonl" --max_new_tokens 64 --batch_size 16
}

stage_export() {
    echo "== 5. export: merge the tuned adapter into the base (verified against base + adapter)," \
        "generate from the merged model" >&2
    "$PY" export_hf.py --lora_weights "$RUN_DIR/lora" --output_dir "$RUN_DIR/merged" --max_shard_size 200MB
    MERGED_ANSWER=$("$PY" generate.py --base_model "$RUN_DIR/merged" --max_new_tokens 40 --instruction "$QUESTION")
    echo "merged generation: $MERGED_ANSWER"
}

# ask_served LOG MODEL_FLAGS...: start serve.py on the model, ask QUESTION through the official openai client, stop
# the server (SIGTERM: it drains and exits 0); the answer goes to stdout.
ask_served() {
    local log="$1" port="" pid
    shift
    "$PY" serve.py "$@" --model_name tuned --port 0 > "$log" 2>&1 &  # not into the caller's $(...)
    pid=$!
    for _ in $(seq 1 600); do  # the port is announced once the model is loaded
        port=$(sed -n 's/^serve: serving .* at http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log")
        if [ -n "$port" ] || ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.2
    done
    if [ -z "$port" ]; then cat "$log" >&2; echo "pipeline.sh: serve.py did not start" >&2; exit 1; fi
    "$PY" - "$port" "$QUESTION" <<'PY'
import sys
from openai import OpenAI
client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none")
reply = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": sys.argv[2]}],
                                       max_tokens=40, temperature=0)
print(reply.choices[0].message.content)
PY
    kill -TERM "$pid"
    wait "$pid"  # drains and exits 0
}

stage_serve() {
    echo "== 6. serve: the tuned adapter behind the OpenAI API (serve.py), asked the same question through the" \
        "official openai client" >&2
    SERVED_ANSWER=$(ask_served "$RUN_DIR/serve.log" --lora_weights "$RUN_DIR/lora")
    echo "served generation: $SERVED_ANSWER"
}

stage_eval() {
    echo "== 7. evaluate: perplexity of the base model and of the tuned adapter (unmerged) on held-out text," \
        "the answers of the validation split's GSM8K rows (never trained on)" >&2
    # The validation rows' answers, taken from the data file by the line numbers the prepared split records.
    "$PY" - "$RUN_DIR/data" "$RUN_DIR/heldout.jsonl" <<'PY'
import json, sys
from pathlib import Path
from datasets import load_from_disk
sys.path.insert(0, ".")
from utils.data.records import Record, read_records
from utils.jsonl import write_jsonl

data = Path(sys.argv[1])
validation = load_from_disk(str(data / "dataset" / "validation"))
files = [i["path"] for i in json.loads((data / "pipeline.json").read_text(encoding="utf-8"))["inputs"]]
wanted = {(files[s], n) for s, n in zip(validation["source"], validation["line"])}  # source: an index into inputs
rows = [{"text": r.value["output"]} for path in sorted({p for p, _ in wanted}) for r in read_records(path)
        if isinstance(r, Record) and (path, r.line) in wanted]
if Path(sys.argv[2]).exists() and Path(sys.argv[2]).read_text(encoding="utf-8") == "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in rows):
    sys.exit(0)  # unchanged: the evaluations below stay no-ops
write_jsonl(sys.argv[2], rows)
print(f"held-out text: {len(rows)} GSM8K answers -> {sys.argv[2]}", file=sys.stderr)
PY
    "$PY" eval/perplexity.py --base_model "$BASE" --data_file "$RUN_DIR/heldout.jsonl" \
        --output_dir "$RUN_DIR/ppl-base" > /dev/null
    "$PY" eval/perplexity.py --lora_weights "$RUN_DIR/lora" --data_file "$RUN_DIR/heldout.jsonl" \
        --output_dir "$RUN_DIR/ppl-tuned" > /dev/null
}

stage_quantize() {
    echo "== 8. quantize: the merged model to GPTQ 4-bit (group 32, act-order; calibrated on the training rows," \
        "scored on the validation split), then generate from it and serve it" >&2
    "$PY" quantize.py --base_model "$RUN_DIR/merged" --output_dir "$RUN_DIR/gptq" --bits 4 --group_size 32 \
        --act_order --data_path "$RUN_DIR/data" --nsamples 64 --seqlen 256
    QUANT_ANSWER=$("$PY" generate.py --base_model "$RUN_DIR/gptq" --max_new_tokens 40 --instruction "$QUESTION")
    echo "quantized generation: $QUANT_ANSWER"
    QUANT_SERVED=$(ask_served "$RUN_DIR/serve-gptq.log" --base_model "$RUN_DIR/gptq")
    echo "served quantized generation: $QUANT_SERVED"
}

if [ $# -gt 0 ]; then
    for stage in "$@"; do  # every name checked before any work
        if [[ ! "$stage" =~ ^[a-z]+$ || ! " ${STAGES[*]} " == *" $stage "* ]]; then
            echo "pipeline.sh: unknown stage '$stage'; stages: ${STAGES[*]}" >&2
            exit 2
        fi
    done
    for stage in "$@"; do
        "stage_$stage"
    done
    exit 0
fi
for stage in "${STAGES[@]}"; do
    "stage_$stage"
done

echo "== summary" >&2
"$PY" - "$RUN_DIR" "$BASE" "$QUESTION" "$BASE_ANSWER" "$TUNED_ANSWER" "$MERGED_ANSWER" "$SERVED_ANSWER" \
    "$QUANT_ANSWER" "$QUANT_SERVED" <<'PY'
"""What the run learned, read from the stages' own output files, and where everything is."""
import json, sys
from pathlib import Path

run, base, question, base_answer, tuned_answer, merged_answer, served_answer, quant_answer, quant_served = sys.argv[1:]
run = Path(run)
before = json.loads((run / "base_eval.json").read_text(encoding="utf-8"))
records = [json.loads(line) for line in (run / "lora" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
           if line.strip()]
after = next(r for r in reversed(records) if r.get("final"))
rows = json.loads((run / "data" / "data_report.json").read_text(encoding="utf-8"))["splits"]["validation"]


def show(text):
    return "\n      ".join(text.strip().splitlines()) or "(empty)"


print()
print(f"== what {after['step']} LoRA steps on GSM8K taught stories260K")
print(f"validation loss ({rows} held-out GSM8K answers, {after['eval_tokens']} tokens): "
      f"{before['eval_loss']:.2f} -> {after['eval_loss']:.2f} (token accuracy "
      f"{before['eval_token_accuracy']:.0%} -> {after['eval_token_accuracy']:.0%})")
print(f"question: {question}")
print(f"  base model:  {show(base_answer)}")
print(f"  tuned model: {show(tuned_answer)}")
print(f"  merged model gives the same answer as base + adapter: {'yes' if merged_answer == tuned_answer else 'NO'}")
print(f"  served (serve.py, OpenAI API) gives the same answer: {'yes' if served_answer == tuned_answer else 'NO'}")
print("(a 260K-parameter model learns the form of a worked answer, not arithmetic)")
ppl = {k: json.loads((run / f"ppl-{k}" / "report.json").read_text(encoding="utf-8")) for k in ("base", "tuned")}
print(f"perplexity on held-out GSM8K answers ({ppl['base']['tokens_scored']} tokens, eval/perplexity.py): "
      f"base {ppl['base']['ppl']:.2f} -> tuned {ppl['tuned']['ppl']:.2f} "
      f"(bits per byte {ppl['base']['bits_per_byte']:.3f} -> {ppl['tuned']['bits_per_byte']:.3f})")
quant = json.loads((run / "gptq" / "quant_report.json").read_text(encoding="utf-8"))
print(f"GPTQ 4-bit (quantize.py, {quant['layers_quantized']} layers; {quant['layers_kept']} the layout cannot pack "
      f"kept): validation perplexity {quant['ppl_before']:.3f} -> {quant['ppl_after']:.3f} "
      f"(delta {quant['delta_ppl']:+.3f})")
print(f"  quantized model:  {show(quant_answer)}")
print(f"  served quantized model gives the same answer: {'yes' if quant_served == quant_answer else 'NO'}")
print("artifacts:")
for what, path in [("prepared data and its report", run / "data"), ("base model's validation score", run / "base_eval.json"),
                   ("LoRA adapter, metrics.jsonl", run / "lora"), ("training curve", run / "lora" / "loss.png"),
                   ("Vicuna-80 answers", run / "answers.jsonl"), ("merged model", run / "merged"),
                   ("perplexity reports", run / "ppl-tuned"), ("GPTQ 4-bit model", run / "gptq")]:
    if path.exists():
        print(f"  {what + ':':32} {path}")
print("next:")
print(f"  {'chat with the tuned model:':32} python generate.py --lora_weights {run / 'lora'}")
print(f"  {'serve it (OpenAI API, web UI):':32} python serve.py --lora_weights {run / 'lora'} --ui")
print(f"  {'train longer (200 steps):':32} python finetune.py --base_model {base} --data_path {run / 'data'} "
      f"--output_dir {run / 'lora-200'} --max_steps 200 --batch_size 16 --micro_batch_size 8 --learning_rate 1e-2 "
      "--eval_steps 20")
print(f"  {'run the test suite:':32} make test")
PY
