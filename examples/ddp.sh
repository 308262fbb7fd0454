#!/usr/bin/env bash
# Data-parallel LoRA over N processes on one machine (gloo on CPU, nccl on GPUs).
# The losses equal a single-process run with the same --batch_size.
#   bash examples/ddp.sh MODEL_DIR DATA [N]
set -euo pipefail
model=$1 data=$2 n=${3:-2}
torchrun --standalone --nproc_per_node "$n" finetune.py \
    --base_model "$model" --data_path "$data" --output_dir runs/ddp-lora \
    --method lora --batch_size 128 --micro_batch_size 4 --num_epochs 3
