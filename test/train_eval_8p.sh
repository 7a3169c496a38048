#!/bin/bash
# Evaluate a checkpoint on val across 8 processes (every sample counted once).
# Usage: bash test/train_eval_8p.sh --data_path=DIR --resume=CHECKPOINT
source "$(dirname "$0")/_common.sh"
if [ -z "$resume" ]; then
    echo "error: --resume=CHECKPOINT is required" >&2
    exit 2
fi
run_np --arch=resnet152 --seed=49 --workers=$(( cores / nproc > 0 ? cores / nproc : 1 )) \
    --batch-size=$(( 2048 / nproc )) --amp --opt-level=O2 --evaluate --resume="$resume" --output="$out_dir/eval_8p"
