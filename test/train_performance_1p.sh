#!/bin/bash
# Throughput of ResNet-152 on 1 device: the seed's settings for 2 epochs, capped at 500 steps.
# Usage: bash test/train_performance_1p.sh --data_path=DIR
source "$(dirname "$0")/_common.sh"
run_1p --arch=resnet152 --seed=49 --workers="$cores" --lr=0.1 --mom=0.9 --wd=1.0e-04 --print-freq=10 \
    --epochs=2 --max-steps=500 --batch-size=256 --amp --opt-level=O2 --loss-scale=1024 --warm_up_epochs=5 \
    --eval-every=0 --output="$out_dir/perf_1p"
