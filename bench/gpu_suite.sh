#!/usr/bin/env bash
# One command on a GPU machine: measure the card's ceilings, build the
# extension for this card only, run the op tests (CUDA and Triton), the op
# microbenchmarks against their peers (realistic sizes, medians of many runs on
# rotated inputs, achieved bandwidth and FLOP rate), the kernels' stage probe and
# hardware counters (Nsight Compute), the head's convolutions by output
# channels and the shifted sum of its taps, the training-step benchmark with the memory model's predictions,
# the paired step overhead over the floor (eager, and each step one CUDA
# graph), the training-step profile, and the performance report. Everything
# is written under bench/results/<device>/ (or $DEST), with a log per stage
# and stage timings in $DEST/timings.txt.
# Where $OUT is set (a lent GPU machine, which returns only a few files of
# $OUT), the results go to /tmp/gpu_suite/<device> and are packed into
# $OUT/<device>.tgz after every stage. Each stage has a time limit (T_<stage>
# seconds), so a short run still returns every stage that finished.
#
#   bash bench/gpu_suite.sh                       # everything
#   STAGES="build tests" bash bench/gpu_suite.sh  # stages run in the order given
#   PYTEST_ARGS="tests/test_x.py" PYTEST_K="cuda and not emulated"   # what the tests stage runs
#
# Uses the python3 on PATH (PYTHON to override) and the torch installed there.
# Benchmark-only peers (requirements-bench.txt) are installed from .whl/ when
# that folder holds their wheels (machines without a package index); make it
# where there is one, then carry it (it is git-ignored):
#   python -m pip wheel --no-deps -w .whl -r requirements-bench.txt
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=${STAGES:-"ceilings build tests mode_distance kernels probe ncu host mmdl_losses head_convs tap_sum pseudo_labels training overhead overhead_graphs profile report"}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1  # a crash in native code names itself in the results

device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || {
    echo "no CUDA device visible to $PY" >&2; exit 1; }
DEST=${DEST:-${OUT:+/tmp/gpu_suite/$device}}
DEST=${DEST:-bench/results/$device}
mkdir -p "$DEST"
echo "gpu_suite: $device -> $DEST (stages: $STAGES)"

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export KEOPS_CACHE_FOLDER=${KEOPS_CACHE_FOLDER:-/tmp/keops}
fi

status=0
: > "$DEST/timings.txt"
timed() {  # timed NAME command...: runs it (at most T_NAME s), logs to $DEST/NAME.log, records its seconds
    local name=$1; shift
    local start=$SECONDS limit_var="T_$name"
    timeout "${!limit_var:-900}" "$@" 2>&1 | tee "$DEST/$name.log" | grep -v -i warn | tail -"${TAIL:-25}"
    local rc=${PIPESTATUS[0]}
    echo "$name $((SECONDS - start)) s rc=$rc" | tee -a "$DEST/timings.txt"
    [[ $rc == 0 ]] || status=1
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu,power.draw --format=csv
    $PY -c "import torch, triton, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
} > "$DEST/environment.txt" 2>&1

run_stage() {
    case $1 in
    ceilings) TAIL=8 timed ceilings $PY bench/ceilings.py --out "$DEST" ;;
    build)
        capability=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
        TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$capability} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
            TAIL=3 timed build $PY -m pip install --no-build-isolation --no-deps --no-index -e .
        [[ -n $(ls drsl_fast/_C*.so 2>/dev/null) ]] || { echo "build failed, see $DEST/build.log" >&2; exit 1; } ;;
    tests) TAIL=30 timed tests $PY -m pytest -q -p no:cacheprovider -rfE ${PYTEST_ARGS:-tests} ${PYTEST_K:+-k "$PYTEST_K"} ;;
    mode_distance)
        timed mode_distance $PY bench/bench_mode_distance.py --device cuda --sizes realistic \
            --out "$DEST/mode_distance" ${BENCH_ARGS:-} ;;
    kernels) timed kernels $PY bench/bench_mode_distance.py --kernels --out "$DEST/mode_distance" ;;
    probe) timed probe $PY bench/probe_tensor_core_kernels.py --out "$DEST/tensor_core_probe" ;;
    ncu) timed ncu $PY bench/ncu_mode_distance.py --out "$DEST/ncu" ;;
    host) timed host $PY bench/probe_host_time.py --device cuda --out "$DEST/host_time" ;;
    head_convs) timed head_convs $PY bench/bench_head_convs.py --device cuda --out "$DEST/head_convs" ;;
    tap_sum) timed tap_sum $PY bench/bench_tap_sum.py --device cuda --out "$DEST/tap_sum" ;;
    mmdl_losses) timed mmdl_losses $PY bench/bench_mmdl_losses.py --device cuda --out "$DEST/mmdl_losses" ${BENCH_ARGS:-} ;;
    pseudo_labels)
        timed pseudo_labels $PY bench/bench_pseudo_labels.py --device cuda --images ${PSEUDO_LABEL_IMAGES:-100} \
            --out "$DEST/pseudo_labels" ${BENCH_ARGS:-} ;;
    training)
        timed training_step $PY bench/bench_training_step.py --device cuda --out "$DEST/training_step" ${TRAINING_ARGS:-}
        TAIL=20 timed memory_model_1080ti $PY -m drsl_fast.memory_model --out "$DEST/gtx_1080ti_verdict.md" ;;
    overhead) TAIL=16 timed step_overhead $PY bench/bench_step_overhead.py --device cuda --out "$DEST/step_overhead" ;;
    overhead_graphs) TAIL=16 timed step_overhead_graphs $PY bench/bench_step_overhead.py --device cuda --cuda-graphs \
        --out "$DEST/step_overhead_graphs" ;;
    profile)
        timed profile $PY bench/profile_training_step.py --device cuda --out "$DEST/training_step_profile" \
            ${PROFILE_ARGS:-} ;;
    report) timed report $PY bench/report.py --results bench/results "$DEST" --out "$DEST/PERFORMANCE.md" ;;
    *) echo "unknown stage $1" >&2; status=1 ;;
    esac
}

pack() {  # the results so far, as one file of $OUT
    [[ -n ${OUT:-} ]] && tar czf "$OUT/$device.tgz" -C "$(dirname "$DEST")" "$(basename "$DEST")"
}
for stage in $STAGES; do  # in the order given
    run_stage "$stage"
    pack
done
echo "gpu_suite: done in $SECONDS s -> $DEST (status $status)"
cat "$DEST/timings.txt"
exit $status
