# Shared by the seed-compatible launch scripts (sourced, not run).
# Accepts the seed's --data_path=DIR, plus --device=cuda|npu|cpu, --nproc=N (processes of the
# 8p scripts), --resume=CKPT (eval script); every other argument is passed on to train.run,
# where a later flag overrides the script's own (e.g. --epochs 1 --arch resnet18).
data_path=""
device=""
nproc=8
resume=""
extra=()
for para in "$@"; do
    case "$para" in
        --data_path=*) data_path="${para#*=}" ;;
        --device=*) device="${para#*=}" ;;
        --nproc=*) nproc="${para#*=}" ;;
        --resume=*|--pth_path=*) resume="${para#*=}" ;;
        *) extra+=("$para") ;;
    esac
done
if [ -z "$data_path" ]; then
    echo "error: --data_path=DIR is required" >&2
    exit 2
fi
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root" || exit 2
if [ -z "$device" ]; then
    device=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi
ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
out_dir="$repo_root/test/output/$ASCEND_DEVICE_ID"
mkdir -p "$out_dir"
log="$out_dir/train_${ASCEND_DEVICE_ID}.log"
cores=$(nproc)

# The seed's end-of-run lines, extracted from the log as its scripts do.
report() {
    local fps acc
    fps=$(grep -a 'FPS@all' "$log" | tail -1 | awk -F 'FPS@all' '{print $NF}' | awk '{print $1}')
    acc=$(grep -a '\* Acc@1' "$log" | tail -1 | awk -F 'Acc@1' '{print $NF}' | awk '{print $1}')
    echo "Final Performance images/sec : ${fps}"
    echo "Final Train Accuracy : ${acc}"
    echo "E2E Training Duration sec : $((end_time - start_time))"
    echo "Log : ${log}"
}

# run_1p ARGS...: one process. run_np ARGS...: $nproc processes through torchrun.
run_1p() {
    timed_run python3 -m train.run --data="$data_path" --device="$device" "$@" "${extra[@]}"
}

run_np() {
    timed_run python3 -m torch.distributed.run --nproc_per_node="$nproc" --master_port="${MASTER_PORT:-29688}" \
        -m train.run --data="$data_path" --device="$device" "$@" "${extra[@]}"
}

# timed_run COMMAND...: run it into the log, then print the seed's report; keeps its status.
timed_run() {
    start_time=$(date +%s)
    "$@" > "$log" 2>&1
    rc=$?
    end_time=$(date +%s)
    report
    return $rc
}
