#!/bin/bash
# ResNet-152 on 8 devices with the seed's hyperparameters: global batch 2048 (256 per process),
# lr 0.8, warmup 5, cosine, 137 epochs, AMP O2. Usage: bash test/train_full_8p.sh --data_path=DIR
source "$(dirname "$0")/_common.sh"
run_np --arch=resnet152 --seed=49 --workers=$(( cores / nproc > 0 ? cores / nproc : 1 )) --lr=0.8 --mom=0.9 \
    --wd=1.0e-04 --print-freq=10 --epochs=137 --batch-size=$(( 2048 / nproc )) --amp --opt-level=O2 \
    --loss-scale=1024 --warm_up_epochs=5 --output="$out_dir/full_8p"
