#!/usr/bin/env bash
# One command on a GPU machine: build the extension for this card, run the CUDA
# and Triton tests, the op benchmarks and the training-step benchmark, and write
# everything under bench/results/<device>/ (or $DEST).
#
#   bash bench/gpu_suite.sh            # everything
#   STAGES="build tests" bash bench/gpu_suite.sh
#
# Uses the python3 on PATH (PYTHON to override) and the torch installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=${STAGES:-"build tests ops training"}
export PYTHONUNBUFFERED=1

device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || {
    echo "no CUDA device visible to $PY" >&2; exit 1; }
DEST=${DEST:-bench/results/$device}
mkdir -p "$DEST"
echo "gpu_suite: $device -> $DEST (stages: $STAGES)"

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
status=0

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
fi

if has_stage tests; then
    $PY -m pytest -q -p no:cacheprovider -rfE tests ${PYTEST_ARGS:-} 2>&1 | tee "$DEST/tests.log" | tail -40
    [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi

if has_stage ops; then
    $PY bench/bench_mode_distance.py --device cuda --out "$DEST/mode_distance" ${BENCH_ARGS:-} || status=1
    $PY bench/bench_drsl_losses.py --device cuda --out "$DEST/drsl_losses" ${BENCH_ARGS:-} || status=1
    $PY bench/bench_pseudo_labels.py --device cuda --out "$DEST/pseudo_labels" || status=1
fi

if has_stage training && [[ -f bench/bench_training_step.py ]]; then
    $PY bench/bench_training_step.py --device cuda --out "$DEST/training_step" || status=1
fi
exit $status
