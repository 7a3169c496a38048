#!/bin/bash
# ResNet-152 on 1 device with the seed's hyperparameters: batch 256, lr 0.1, warmup 5, cosine,
# 137 epochs, AMP O2 (static loss scale 1024 when fp16). Usage: bash test/train_full_1p.sh --data_path=DIR
source "$(dirname "$0")/_common.sh"
run_1p --arch=resnet152 --seed=49 --workers="$cores" --lr=0.1 --mom=0.9 --wd=1.0e-04 --print-freq=10 \
    --epochs=137 --batch-size=256 --amp --opt-level=O2 --loss-scale=1024 --warm_up_epochs=5 \
    --output="$out_dir/full_1p"
