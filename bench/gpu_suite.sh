#!/usr/bin/env bash
# One command on a GPU machine: build the extension for this card, run the CUDA
# and Triton tests, the op microbenchmarks (realistic sizes, medians of many
# runs on rotated inputs, achieved bandwidth), the training-step benchmark with
# the memory model's predictions, and the performance report; everything is
# written under bench/results/<device>/ (or $DEST), with a log per stage and
# stage timings in $DEST/timings.txt. 13 minutes on an H100 before the
# training-step variants of a crop shared one process (about 11 s of start-up
# saved per variant, 20 variants). Where a command may run 10 minutes at most,
# run it in two parts: STAGES="build tests", then STAGES="build ops training report".
#
#   bash bench/gpu_suite.sh            # everything
#   STAGES="build tests" bash bench/gpu_suite.sh
#   tar czf results.tgz -C bench/results <device>   # to carry the results away
#
# Uses the python3 on PATH (PYTHON to override) and the torch installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=${STAGES:-"build tests ops training report"}
export PYTHONUNBUFFERED=1

device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || {
    echo "no CUDA device visible to $PY" >&2; exit 1; }
DEST=${DEST:-bench/results/$device}
mkdir -p "$DEST"
echo "gpu_suite: $device -> $DEST (stages: $STAGES)"

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
status=0
: > "$DEST/timings.txt"
timed() {  # timed NAME command...: runs it, logs to $DEST/NAME.log, records its seconds
    local name=$1; shift
    local start=$SECONDS
    "$@" 2>&1 | tee "$DEST/$name.log" | grep -v -i warn | tail -${TAIL:-25}
    local rc=${PIPESTATUS[0]}
    echo "$name $((SECONDS - start)) s rc=$rc" | tee -a "$DEST/timings.txt"
    [[ $rc == 0 ]] || status=1
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch, triton, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
} > "$DEST/environment.txt" 2>&1

if has_stage build; then
    capability=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$capability}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    start=$SECONDS
    $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$DEST/build.log" 2>&1 || {
        echo "build failed, see $DEST/build.log" >&2; tail -30 "$DEST/build.log"; exit 1; }
    echo "built for sm_$capability in $((SECONDS - start)) s"
    echo "build $((SECONDS - start)) s" >> "$DEST/timings.txt"
fi

if has_stage tests; then
    start=$SECONDS
    $PY -m pytest -q -p no:cacheprovider -rfE tests ${PYTEST_ARGS:-} 2>&1 | tee "$DEST/tests.log" | tail -40
    [[ ${PIPESTATUS[0]} == 0 ]] || status=1
    echo "tests $((SECONDS - start)) s" >> "$DEST/timings.txt"
fi

if has_stage ops; then
    timed mode_distance $PY bench/bench_mode_distance.py --device cuda --sizes realistic --out "$DEST/mode_distance" ${BENCH_ARGS:-}
    timed mmdl_losses $PY bench/bench_mmdl_losses.py --device cuda --out "$DEST/mmdl_losses" ${BENCH_ARGS:-}
    timed pseudo_labels $PY bench/bench_pseudo_labels.py --device cuda --images ${PSEUDO_LABEL_IMAGES:-100} --out "$DEST/pseudo_labels" ${BENCH_ARGS:-}
fi

if has_stage training; then
    timed training_step $PY bench/bench_training_step.py --device cuda --out "$DEST/training_step" ${TRAINING_ARGS:-}
    TAIL=20 timed memory_model_1080ti $PY -m drsl_fast.memory_model --out "$DEST/gtx_1080ti_verdict.md"
fi

if has_stage report; then
    timed report $PY bench/report.py --results bench/results "$DEST" --out "$DEST/PERFORMANCE.md"
fi
echo "gpu_suite: done in $SECONDS s -> $DEST (status $status)"
exit $status
