#!/usr/bin/env bash
# The one-call GPU check (about 8 minutes on one H100/H200). Prepared entirely on the CPU; run
# on a lent GPU machine from the repository root:
#     bash benchmarks/device_check.sh
# Wheels the GPU image lacks (webdataset, braceexpand) are carried in .whl/ (pip download
# --no-deps -d .whl webdataset braceexpand). Results: a short table last, JSON and logs in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD BENCH_OUT=$OUT BENCH_CACHE=${BENCH_CACHE:-/tmp/resnet-shards-bench}
PY=${PY:-python3}
WORKERS=${WORKERS:-$(nproc)}
step() { echo "== $* ($(date +%T))"; }

step setup
if [ -d .whl ]; then $PY -m pip install -q --no-index --find-links .whl webdataset braceexpand > "$OUT/pip.log" 2>&1 || true; fi
$PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || echo "note: kernels._jpeg not built here (Pillow fallback); see $OUT/build.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"

step "GPU tests"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"

step "dataset: 6,000 ImageNet-like JPEGs, converted"
timeout 240 $PY -m benchmarks.loader --device cuda --classes 100 --per-class 60 --batch-size 256 \
    --workers "$WORKERS" --backends nvjpeg cpu --repeats 3 > "$OUT/loader.log" 2>&1
tail -5 "$OUT/loader.log"

step "ResNet-152 train step, synthetic data"
timeout 420 $PY -m benchmarks.train_step --device cuda --arch resnet152 --batch-size 256 --image-size 224 \
    --levels O2:bf16 O1:bf16 --optimizers fused --channels-last on --compile both --steps 20 \
    > "$OUT/train_step.log" 2>&1
tail -6 "$OUT/train_step.log"

SHARDS=$(ls -d "$BENCH_CACHE"/imagenet_like_100x60_500_shards_full 2>/dev/null)
for backend in synthetic nvjpeg cpu; do
    step "end to end, ResNet-152 O2 bf16, backend $backend"
    timeout 300 $PY -m train.run --shards "$SHARDS" --device cuda --amp --opt-level O2 --amp-dtype bf16 -b 256 \
        -j "$WORKERS" --epochs 1 --max-steps 60 --print-freq 20 --eval-every 0 --backend "$backend" \
        --output "$OUT/e2e_$backend" > "$OUT/e2e_$backend.log" 2>&1
    grep -a "FPS@all" "$OUT/e2e_$backend.log" | tail -1
done

step summary
$PY -m benchmarks.device_summary "$OUT" | tee "$OUT/summary.txt"
