#!/usr/bin/env bash
# The one-call GPU check, about 8 minutes on one H100/H200. Run it from the repository root on a
# lent GPU machine:
#     bash benchmarks/device_check.sh
# Rehearse it on a CPU (tiny sizes, same steps, same outputs) before spending GPU time:
#     DRY=1 bash benchmarks/device_check.sh
#
# What the GPU image lacks is carried in .whl/ (git ignores it): the webdataset and braceexpand
# wheels, and the ROI JPEG decoder built here for the stable ABI with the libjpeg-turbo it links,
# used when the image has no libjpeg headers to build it:
#     pip download --no-deps -d .whl webdataset braceexpand
#     python setup.py build_ext --inplace && mkdir -p .whl/jpeg
#     cp kernels/_jpeg.abi3.so "$(ldconfig -p | awk '/libjpeg.so.62 /{print $NF; exit}')" .whl/jpeg/
# Logs and run folders go to $WORK. $OUT receives three files: summary.txt (the table, also
# printed last), device_check.json (every figure, with the machine: benchmarks.machine's CPU, ISA,
# torch build, torchvision and GPU) and logs.tar.gz.
# Each step is cut to the time left of $BUDGET seconds, so the check ends inside one call.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-benchmarks/out/device}
WORK=${WORK:-/tmp/resnet-shards-device}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-$(nproc)}
ARCH=${ARCH:-resnet152} BATCH=${BATCH:-256} IMAGE=${IMAGE:-224}
CLASSES=${CLASSES:-100} PER_CLASS=${PER_CLASS:-60} STEPS=${STEPS:-20} E2E_EPOCHS=${E2E_EPOCHS:-3}
COMPILE=${COMPILE:-both}
# The fast recipe (--recipe fast: BlurPool, progressive sizes 160 -> 192 -> 224): its step rates.
FAST_ARCHS=${FAST_ARCHS:-resnet50 resnet152} FAST_SIZES=${FAST_SIZES:-160 192 224}
if [ "${DRY:-0}" = 1 ]; then  # a CPU rehearsal: every step and output, at sizes a laptop runs in minutes
    # One epoch of 6 steps (the FPS line's minimum) at 48 px (the ImageNet stem): on a CPU without
    # bf16 units every bf16 step is emulated, several times slower than an fp32 one.
    DEVICE=cpu ARCH=resnet18 BATCH=8 IMAGE=48 CLASSES=4 PER_CLASS=12 STEPS=1 E2E_EPOCHS=1 COMPILE=off
    FAST_ARCHS=resnet18 FAST_SIZES=32
    WORK=${WORK}-dry
fi
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
export BENCH_OUT=$WORK BENCH_CACHE=$WORK/cache PYTHONUNBUFFERED=1
END=$(( $(date +%s) + BUDGET ))
step() { echo "== $* ($(date +%T), $(( END - $(date +%s) )) s left)"; }
# limit SECONDS: the step's own cap, or what is left of the budget if that is less.
limit() { local left=$(( END - $(date +%s) - 15 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

step setup
if [ -d .whl ] && ! $PY -c "import webdataset" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        > "$WORK/pip.log" 2>&1 || echo "note: wheels in .whl did not install; see pip.log"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}:$WORK/site
$PY setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1
if ! $PY -c "import kernels._jpeg" 2>/dev/null && [ -f .whl/jpeg/_jpeg.abi3.so ]; then
    cp .whl/jpeg/_jpeg.abi3.so kernels/ && export LD_LIBRARY_PATH=$ROOT/.whl/jpeg${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
$PY -c "import kernels._jpeg" 2>/dev/null || echo "note: kernels._jpeg unavailable (cpu backend uses Pillow); see build.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -m benchmarks.machine --device "$DEVICE" --json "$WORK/machine.json"
  # python and torchvision as benchmarks.machine recorded them (importing torchvision costs seconds)
  $PY -c "import json, sys; m = json.load(open(sys.argv[1]))
print('python', m['python'], 'torchvision', m['torchvision'])" "$WORK/machine.json"
  echo "device $DEVICE, $WORKERS workers, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} | tee "$WORK/machine.txt"

step "GPU tests"
# In one process, whatever pytest.ini asks: the GPU image has no pytest-xdist, and one GPU is shared.
timeout "$(limit 150)" $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_kernels.py > "$WORK/tests.log" 2>&1
tail -1 "$WORK/tests.log"

step "loader alone, $(( CLASSES * PER_CLASS )) ImageNet-like JPEGs, per backend"
timeout "$(limit 150)" $PY -m benchmarks.loader --per-backend --device "$DEVICE" --classes "$CLASSES" \
    --per-class "$PER_CLASS" --batch-size "$BATCH" --image-size "$IMAGE" --workers "$WORKERS" \
    --backends nvjpeg cpu --repeats 3 > "$WORK/loader.log" 2>&1
tail -4 "$WORK/loader.log"

SHARDS=$WORK/cache/imagenet_like_${CLASSES}x${PER_CLASS}_500_shards_full
for backend in synthetic nvjpeg cpu; do
    step "end to end, $ARCH O2 bf16, backend $backend"
    timeout "$(limit 90)" $PY -m train.run --shards "$SHARDS" --arch "$ARCH" --device "$DEVICE" --amp \
        --opt-level O2 --amp-dtype bf16 -b "$BATCH" --image-size "$IMAGE" -j "$WORKERS" --epochs "$E2E_EPOCHS" \
        --print-freq 10 --backend "$backend" --output "$WORK/e2e_$backend" > "$WORK/e2e_$backend.log" 2>&1
    grep -a "FPS@all" "$WORK/e2e_$backend.log" | tail -1 || tail -2 "$WORK/e2e_$backend.log"
done

step "fast recipe train step: $FAST_ARCHS with BlurPool at $FAST_SIZES px, synthetic data"
# shellcheck disable=SC2086  # the lists split into arguments
timeout "$(limit 120)" $PY -m benchmarks.train_step --device "$DEVICE" --arch $FAST_ARCHS --batch-size "$BATCH" \
    --image-size $FAST_SIZES --blurpool --levels O2:bf16 --optimizers fused --channels-last on --compile off \
    --steps "$STEPS" --name fast_step > "$WORK/fast_step.log" 2>&1
tail -"$(( $(echo $FAST_ARCHS | wc -w) * $(echo $FAST_SIZES | wc -w) + 2 ))" "$WORK/fast_step.log"

# Last: the compiled rows take minutes to compile, and the goals above matter more.
step "$ARCH train step, synthetic data"
timeout "$(limit 270)" $PY -m benchmarks.train_step --device "$DEVICE" --arch "$ARCH" --batch-size "$BATCH" \
    --image-size "$IMAGE" --levels O2:bf16 O1:bf16 --optimizers fused --channels-last on --compile "$COMPILE" \
    --full-grid --steps "$STEPS" > "$WORK/train_step.log" 2>&1
tail -5 "$WORK/train_step.log"

step summary
$PY -m benchmarks.device_summary "$WORK" --json "$OUT/device_check.json" --check | tee "$OUT/summary.txt"
status=$?  # non-zero when a test or a measurement failed
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.pth.tar' --exclude=cache --exclude=site . 2>/dev/null
echo "wrote $OUT/summary.txt, $OUT/device_check.json, $OUT/logs.tar.gz"
exit $status
