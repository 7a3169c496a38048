#!/bin/bash
# Throughput of ResNet-152 on 8 devices: the seed's 8p settings for 2 epochs, capped at 500 steps.
# Usage: bash test/train_performance_8p.sh --data_path=DIR
source "$(dirname "$0")/_common.sh"
run_np --arch=resnet152 --seed=49 --workers=$(( cores / nproc > 0 ? cores / nproc : 1 )) --lr=0.8 --mom=0.9 \
    --wd=1.0e-04 --print-freq=10 --epochs=2 --max-steps=500 --batch-size=$(( 2048 / nproc )) --amp \
    --opt-level=O2 --loss-scale=1024 --warm_up_epochs=5 --eval-every=0 --output="$out_dir/perf_8p"
