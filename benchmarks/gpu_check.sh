#!/usr/bin/env bash
# The one script of a GPU visit: build the CUDA extension, run the GPU tests and the benchmarks,
# and leave every result and log in OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR            (from the repository root)
#
# Made for a bare CUDA machine (torch + triton + nvcc preinstalled, no network) and a hard time
# limit: the whole run stays within GPU_CHECK_BUDGET_S seconds (default 345), every stage runs
# under `timeout` with its own cap, a stage that fails or hangs does not stop the next, and later
# stages keep a reserved share of the budget. OUTDIR/summary.txt lists each stage's status, exit
# code and duration, then the latency targets. Environment knobs:
#   GPU_CHECK_BUDGET_S   total seconds (default 345)
#   LATENCY_ARGS         extra arguments for benchmarks/latency.py (e.g. "--skip B2")
#   LATENCY_MODE         its mode flag (default --quick; --smoke checks this script on a CPU machine)
#   GPU_CHECK_SKIP_BUILD 1 = keep the installed build (a re-run on the same machine)
#   PRECOMPILE_GRACE_S   how long the background precompilation may outlast the tests (default 30)
#   GPU_CHECK_TESTS      test files run in full besides `-m gpu` (default: the fused-backend tests)
#   PYTHON               interpreter (default: python, else python3)
#   BENCH_COMMIT         commit recorded in the CSV when the tree has no .git
set -u

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------------------------
# Internal subcommand: the test stage (run under `timeout` by the main script).
if [ "${1:-}" = "__tests" ]; then
    out=$2
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        echo "pytest is not installed for $PY: no tests run (install it or put it on PYTHONPATH)"
        exit 127
    fi
    # pytest exits 5 when nothing is selected: not a failure here.
    norm() { if [ "$1" = 5 ]; then echo 0; else echo "$1"; fi; }
    echo "== python -m pytest -m gpu tests"
    "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml="$out/pytest_gpu.xml" tests
    rc_gpu=$(norm $?)
    if [ -n "${GPU_CHECK_TESTS:-}" ]; then
        files=$GPU_CHECK_TESTS
    else
        files=$(ls tests/test_*triton*.py tests/test_*cuda*.py tests/test_*fused*.py tests/test_*kernel*.py \
                   tests/test_*backend*.py 2>/dev/null | sort -u | tr '\n' ' ')
    fi
    rc_fused=0
    if [ -n "$files" ]; then
        echo "== python -m pytest -m 'not gpu' $files"
        # shellcheck disable=SC2086  # word splitting of the file list is intended
        "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" --junitxml="$out/pytest_fused.xml" $files
        rc_fused=$(norm $?)
    else
        echo "== no fused-backend test files found"
    fi
    echo "exit codes: gpu=$rc_gpu fused=$rc_fused"
    [ "$rc_gpu" = 0 ] && [ "$rc_fused" = 0 ]
    exit $?
fi

# ---------------------------------------------------------------------------------------------
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$SELF")/.." || exit 2
BUDGET=${GPU_CHECK_BUDGET_S:-345}
LATENCY_ARGS=${LATENCY_ARGS:-}
LATENCY_MODE=${LATENCY_MODE:---quick}
T0=$(date +%s)
STAGES=$OUT/.stages
: >"$STAGES"
FAILED=0
# Compile caches shared by the background precompilation and the timed latency run.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/autoguide_fast_inductor}

elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(printf '%4d' "$(elapsed)") s] $*"; }

# limit CAP RESERVE: seconds a stage may take: its cap, or what the budget leaves after keeping
# RESERVE seconds for the stages after it.
limit() {
    local left=$(( BUDGET - $(elapsed) - $2 ))
    if (( $1 < left )); then echo "$1"; else echo "$left"; fi
}

record() {  # name status rc seconds limit note
    printf '%-11s %-8s %4s %7s %7s  %s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$STAGES"
    say "$1: $2 (exit $3, $4 s of $5 s) $6"
    case $2 in failed|timeout) FAILED=1 ;; esac
}

# stage NAME LIMIT LOG COMMAND...: run COMMAND under timeout, output to LOG.
stage() {
    local name=$1 lim=$2 logfile=$3; shift 3
    if (( lim < 10 )); then
        record "$name" skipped - 0 "$(( lim > 0 ? lim : 0 ))" "no time left in the budget"
        return 0
    fi
    say "stage $name (limit $lim s) -> $(basename "$logfile")"
    local start rc status
    start=$(date +%s)
    timeout -k 10 "$lim" "$@" >"$logfile" 2>&1
    rc=$?
    status=ok
    if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=failed; fi
    record "$name" "$status" "$rc" "$(( $(date +%s) - start ))" "$lim" ""
    tail -n 4 "$logfile" | sed 's/^/        /'
}

say "GPU check -> $OUT (budget $BUDGET s, python $PY)"

# 0. Environment (also finds the GPU's compute capability for the build).
ARCH=$(timeout 60 "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
stage env "$(limit 60 250)" "$OUT/env.txt" bash -c '
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "host cores: $(nproc)"; uname -a
    "$0" -c "import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    "$0" -c "import triton; print(\"triton\", triton.__version__)" || true
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
    for m in pytest numpy matplotlib ninja; do "$0" -c "import $m" 2>/dev/null && echo "$m: yes" || echo "$m: NO"; done
' "$PY"
say "compute capability: ${ARCH:-unknown}"

# 1. Build (compiles csrc/ for the visible GPU only).
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    record build skipped - 0 0 "GPU_CHECK_SKIP_BUILD=1: using the installed build"
else
    stage build "$(limit 150 185)" "$OUT/build.log" env ${ARCH:+TORCH_CUDA_ARCH_LIST=$ARCH} MAX_JOBS="$(nproc)" \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -v -e .
fi

# 2. What is here: the card, the extension, the backends.
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
else
    echo "nvidia-smi: not found" >"$OUT/nvidia-smi.txt"
fi
if command -v autoguide-fast >/dev/null; then INFO=(autoguide-fast info); else INFO=("$PY" -m autoguide_fast.cli info); fi
stage info "$(limit 30 185)" "$OUT/info.txt" "${INFO[@]}"

# 3. Tests, while the compiled baseline's networks compile in the background (no timing runs
#    meanwhile; the timed run below then finds warm Inductor/Triton caches).
PRE_LIMIT=$(limit 130 145)
PRE_PID=""
if (( PRE_LIMIT >= 10 )); then
    say "background: precompile of B2 (limit $PRE_LIMIT s) -> precompile.log"
    PRE_START=$(date +%s)
    # shellcheck disable=SC2086  # LATENCY_ARGS is a list of arguments
    timeout -k 10 "$PRE_LIMIT" "$PY" benchmarks/latency.py "$LATENCY_MODE" --precompile $LATENCY_ARGS \
        >"$OUT/precompile.log" 2>&1 &
    PRE_PID=$!
fi
stage tests "$(limit 90 145)" "$OUT/pytest_gpu.log" bash "$SELF" __tests "$OUT"
if [ -n "$PRE_PID" ]; then
    # Give it at most PRECOMPILE_GRACE_S more seconds: every kernel it has compiled by then is
    # cached already, and the timed run compiles the rest.
    deadline=$(( $(date +%s) + ${PRECOMPILE_GRACE_S:-30} ))
    while kill -0 "$PRE_PID" 2>/dev/null && (( $(date +%s) < deadline )); do sleep 1; done
    kill -TERM "$PRE_PID" 2>/dev/null  # timeout passes the signal on to the compiler process
    wait "$PRE_PID"
    rc=$?
    status=ok note="(background, during the tests)"
    if (( rc == 143 )); then
        status=stopped note="(stopped after the tests; what it compiled stays cached)"
    elif (( rc == 124 || rc == 137 )); then
        status=timeout
    elif (( rc != 0 )); then
        status=failed
    fi
    record precompile "$status" "$rc" "$(( $(date +%s) - PRE_START ))" "$PRE_LIMIT" "$note"
fi

# 4. Step-kernel benchmark (if this tree has it).
if [ -f benchmarks/bench_step.py ]; then
    stage step "$(limit 40 125)" "$OUT/step.log" "$PY" benchmarks/bench_step.py --quick --out "$OUT/step.csv"
else
    record step skipped - 0 0 "benchmarks/bench_step.py is not in this tree"
fi

# 5. End-to-end latency, its targets and its plot.
LAT_LIMIT=$(limit 150 15)
# The harness's own budget leaves room for its start-up, a 10 s overrun and the final report.
# shellcheck disable=SC2086  # LATENCY_ARGS is a list of arguments
stage latency "$LAT_LIMIT" "$OUT/latency.log" "$PY" benchmarks/latency.py "$LATENCY_MODE" --out "$OUT/latency.csv" \
    --report "$OUT/targets.txt" --time-budget "$(( LAT_LIMIT > 60 ? LAT_LIMIT - 25 : LAT_LIMIT / 2 ))" $LATENCY_ARGS
if [ -s "$OUT/latency.csv" ]; then
    if [ ! -s "$OUT/targets.txt" ]; then  # The run was cut short: judge what it wrote.
        stage targets "$(limit 30 0)" "$OUT/targets.log" "$PY" benchmarks/latency.py \
            --targets-from "$OUT/latency.csv" --report "$OUT/targets.txt"
    fi
    stage plot "$(limit 40 0)" "$OUT/plot.log" bash -c '
        "$0" benchmarks/plot_latency.py --csv "$1/latency.csv" --out "$1/latency.png" &&
        "$0" benchmarks/plot_latency.py --csv "$1/latency.csv" --out "$1/latency_speedup.png" --metric speedup' \
        "$PY" "$OUT"
else
    record plot skipped - 0 0 "no latency.csv"
fi

# Summary.
{
    echo "GPU check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    grep -m1 '^gpu' "$OUT/env.txt" 2>/dev/null
    grep -m1 '^torch' "$OUT/env.txt" 2>/dev/null
    echo
    printf '%-11s %-8s %4s %7s %7s  %s\n' stage status exit seconds limit note
    cat "$STAGES"
    echo
    echo "total: $(elapsed) s of a $BUDGET s budget"
    if [ -s "$OUT/targets.txt" ]; then echo; cat "$OUT/targets.txt"; fi
} >"$OUT/summary.txt"
rm -f "$STAGES"
echo
cat "$OUT/summary.txt"
exit "$FAILED"
