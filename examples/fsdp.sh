#!/usr/bin/env bash
# Full fine-tune with weights, gradients and optimizer state sharded over N processes (torch FSDP).
#   bash examples/fsdp.sh MODEL_DIR DATA [N]
set -euo pipefail
model=$1 data=$2 n=${3:-2}
torchrun --standalone --nproc_per_node "$n" finetune.py \
    --base_model "$model" --data_path "$data" --output_dir runs/fsdp-full \
    --method full --fsdp --learning_rate 2e-5 --batch_size 64 --micro_batch_size 2 --num_epochs 1 \
    --gradient_checkpointing --max_shard_size 2GB
