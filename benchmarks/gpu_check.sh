#!/usr/bin/env bash
# The one script of a GPU visit: build the CUDA extension, check every GPU path (smoke), run the
# GPU tests and the benchmarks, and leave every result and log in OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR            (from the repository root)
#
# Made for a bare CUDA machine (torch + triton + nvcc preinstalled, no network) and a hard time
# limit: the whole run stays within GPU_CHECK_BUDGET_S seconds (default 345), every stage runs
# under `timeout` with its own cap, a stage that fails or hangs does not stop the next, and later
# stages keep a reserved share of the budget. OUTDIR/summary.txt lists each stage's status, exit
# code and duration, then the smoke verdicts, the test counts and the latency targets. Knobs:
#   GPU_CHECK_BUDGET_S   total seconds (default 345)
#   LATENCY_ARGS         extra arguments for benchmarks/latency.py (e.g. "--skip B2")
#   LATENCY_MODE         its mode flag (default --quick; --smoke checks this script on a CPU machine)
#   GPU_CHECK_LATENCY_S  the latency stage's cap in seconds (default 150; e.g. 240 for a second call
#                        that measures batch 64 alone, the other stages skipped)
#   GPU_CHECK_SKIP_BUILD 1 = keep the installed build (a re-run on the same machine)
#   GPU_CHECK_SKIP       comma-separated stages to skip (e.g. "smoke,step,latency" to re-run the tests)
#   GPU_CHECK_TESTS_S    the tests stage's cap in seconds (default 90)
#   GPU_CHECK_XDIST      pytest-xdist worker processes for the tests, if it is installed (default 4; 0 = off)
#   GPU_CHECK_TEST_TIMEOUT_S  with xdist and pytest-timeout: seconds after which a hung test's worker ends
#                        (default: half the tests stage's limit, at least 60, at most the limit - 10)
#   PRECOMPILE_GRACE_S   how long the background precompilation may outlast the tests (default 20)
#   GPU_CHECK_TESTS      test files run in full besides `-m gpu` (default: none; on a GPU the
#                        conftest marks the Triton test files `gpu`, so `-m gpu` runs them too)
#   PYTHON               interpreter (default: the first of python3, python that imports torch)
#   BENCH_COMMIT         commit recorded in the CSV when the tree has no .git (pass it: a copy of the
#                        tree without .git records commit "unknown", and the summary says so loudly)
set -u

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
# The interpreter that holds torch: on the GPU image that is the plain `python3`; a `python` on the
# PATH may be another interpreter without it.
if [ -z "${PYTHON:-}" ]; then
    for cand in python3 python; do
        if command -v "$cand" >/dev/null && "$cand" -c "import torch" 2>/dev/null; then PYTHON=$(command -v "$cand"); break; fi
    done
fi
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------------------------
# Internal subcommand: the test stage (run under `timeout` by the main script).
if [ "${1:-}" = "__tests" ]; then
    out=$2
    stage_limit=${3:-90}
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        echo "pytest is not installed for $PY: no tests run (install it or put it on PYTHONPATH)"
        exit 127
    fi
    # The stage's time limit arrives as SIGINT: pytest stops, reports what ran and still writes its
    # junit file; this script then starts no further run.
    stopped=0
    trap 'stopped=1' INT TERM
    # pytest exits 5 when nothing is selected: not a failure here.
    norm() { if [ "$1" = 5 ]; then echo 0; else echo "$1"; fi; }
    # -v: one line per test as it finishes, so a log cut short still says what passed.
    # --continue-on-collection-errors: a test file that cannot be imported on the card is reported
    # (and fails the stage) without stopping every other file's tests.
    opts=(-v --tb=short --durations=10 -p no:cacheprovider --continue-on-collection-errors)
    # Tests in GPU_CHECK_XDIST processes (default 4) when pytest-xdist is there: the first uses of
    # CUDA, cuBLAS/cuDNN and the Triton compilations (CPU-bound) then proceed side by side. Every
    # test measures its own process only (memory counters are per process); 0 = one process.
    workers=${GPU_CHECK_XDIST:-4}
    if [ "$workers" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
        opts+=(-n "$workers" --dist load)
        echo "== pytest-xdist: $workers worker processes"
        # A test that hangs (a deadlock, a stuck kernel) ends its worker after this many seconds
        # (pytest-timeout, thread method: works while the main thread waits in CUDA); xdist reports
        # it failed and starts a new worker, so the other tests still run. Half the stage's limit,
        # at least 60 s (a worker's first test also starts CUDA, and a torch.compile test compiles
        # from cold while the precompilation loads the CPUs) but 10 s under the limit, so it fires
        # before the stage ends; faulthandler prints the hung test's stacks to the log just before
        # (the timeout's own report goes to the worker's stdout, which xdist discards).
        if "$PY" -c "import pytest_timeout" 2>/dev/null; then
            per_test=$(( stage_limit / 2 > 60 ? stage_limit / 2 : 60 ))
            per_test=${GPU_CHECK_TEST_TIMEOUT_S:-$(( per_test < stage_limit - 10 ? per_test : stage_limit - 10 ))}
            opts+=(--timeout "$per_test" --timeout-method thread -o "faulthandler_timeout=$(( per_test > 10 ? per_test - 5 : per_test ))")
            echo "== pytest-timeout: $per_test s per test"
        fi
    fi
    # The kernel test files first (collection order is the order xdist hands tests out in): if the
    # stage's limit stops the run, the fused kernels have been checked on the card.
    first=(tests/test_cuda_backend.py tests/test_triton_step.py tests/test_triton_philox.py
           tests/test_triton_device_scalars.py tests/test_noise.py)
    ordered=()
    for f in "${first[@]}"; do [ -f "$f" ] && ordered+=("$f"); done
    for f in tests/test_*.py; do
        case " ${first[*]} " in *" $f "*) ;; *) ordered+=("$f") ;; esac
    done
    echo "== python -m pytest -m gpu tests (kernel files first: ${first[*]})"
    "$PY" -m pytest "${opts[@]}" -m gpu --junitxml="$out/pytest_gpu.xml" "${ordered[@]}"
    rc_gpu=$(norm $?)
    if [ "$stopped" = 1 ]; then
        echo "== stopped by the time limit: the other test files were not run"
        exit 124
    fi
    # The CPU-only tests (C++ kernels, the CUDA kernels' host emulation) ran before the visit; the
    # Triton test files are `gpu` on a GPU (tests/conftest.py), in the run above.
    files=${GPU_CHECK_TESTS:-}
    rc_fused=0
    if [ -n "$files" ]; then
        echo "== python -m pytest -m 'not gpu' $files"
        # shellcheck disable=SC2086  # word splitting of the file list is intended
        "$PY" -m pytest "${opts[@]}" -m "not gpu" --junitxml="$out/pytest_fused.xml" $files
        rc_fused=$(norm $?)
    else
        echo "== no further test files"
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
    printf '%-13s %-8s %4s %7s %7s  %s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$STAGES"
    say "$1: $2 (exit $3, $4 s of $5 s) $6"
    case $2 in failed|timeout) FAILED=1 ;; esac
}

# stage NAME LIMIT LOG COMMAND...: run COMMAND under timeout, output to LOG. At the limit the
# command gets STAGE_SIGNAL (default TERM), and KILL 10 s later. Sets LAST_STATUS.
LAST_STATUS=""
stage() {
    local name=$1 lim=$2 logfile=$3; shift 3
    if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
        record "$name" skipped - 0 0 "GPU_CHECK_SKIP"
        LAST_STATUS=skipped
        return 0
    fi
    if (( lim < 10 )); then
        record "$name" skipped - 0 "$(( lim > 0 ? lim : 0 ))" "no time left in the budget"
        LAST_STATUS=skipped
        return 0
    fi
    say "stage $name (limit $lim s) -> $(basename "$logfile")"
    local start rc status
    start=$(date +%s)
    timeout -s "${STAGE_SIGNAL:-TERM}" -k 10 "$lim" "$@" >"$logfile" 2>&1
    rc=$?
    status=ok
    if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=failed; fi
    record "$name" "$status" "$rc" "$(( $(date +%s) - start ))" "$lim" ""
    LAST_STATUS=$status
    tail -n 4 "$logfile" | sed 's/^/        /'
}

say "GPU check -> $OUT (budget $BUDGET s, python $PY)"

# 0. Environment (also finds the GPU's compute capability for the build).
stage env "$(limit 60 280)" "$OUT/env.txt" bash -c '
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "host cores: $(nproc)"; uname -a
    "$0" -c "import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None); print(\"capability\", \"%d.%d\" % torch.cuda.get_device_capability() if torch.cuda.is_available() else None)"
    "$0" -c "import triton; print(\"triton\", triton.__version__)" || true
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
    for m in pytest numpy matplotlib ninja setuptools; do "$0" -c "import $m" 2>/dev/null && echo "$m: yes" || echo "$m: NO"; done
    command -v ninja >/dev/null && echo "ninja binary: yes" || echo "ninja binary: NO (the build compiles one file at a time)"
    "$0" -m pip --version || echo "pip: NO"
' "$PY"
ARCH=$(sed -n 's/^capability \([0-9][0-9]*\.[0-9][0-9]*\)$/\1/p' "$OUT/env.txt" 2>/dev/null | head -n 1)
say "compute capability: ${ARCH:-unknown}"

# 1. Build (compiles csrc/ for the visible GPU only).
# With a card visible the CUDA part is required (AUTOGUIDE_FAST_CUDA=1): setup.py's "auto" would
# quietly build without it when it finds no toolkit, and every CUDA test would then skip, not fail.
BUILD_ENV=(env ${ARCH:+TORCH_CUDA_ARCH_LIST=$ARCH} ${ARCH:+AUTOGUIDE_FAST_CUDA=${AUTOGUIDE_FAST_CUDA:-1}}
           MAX_JOBS="$(nproc)")
# A compiler's own error message (gcc/clang "file.cpp:12:3: error", nvcc "file.cu(12): error").
COMPILE_ERROR='\.(c|cc|cpp|cu|cuh|h|hpp)(:[0-9]+:[0-9]+: (fatal )?error|\([0-9]+\): error)|nvcc fatal'
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    record build skipped - 0 0 "GPU_CHECK_SKIP_BUILD=1: using the installed build"
else
    # PIP_BREAK_SYSTEM_PACKAGES: a system interpreter marked "externally managed" (PEP 668) would
    # otherwise refuse the install outright.
    stage build "$(limit 150 200)" "$OUT/build.log" "${BUILD_ENV[@]}" PIP_BREAK_SYSTEM_PACKAGES=1 \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -v -e .
    if [ "$LAST_STATUS" = failed ] && ! grep -qE "$COMPILE_ERROR" "$OUT/build.log"; then
        # pip itself failed (absent, a read-only site-packages, no editable support), not the
        # compiler: build the extension next to the sources. Tests and benchmarks run from the
        # checkout, so `import autoguide_fast` finds it there.
        stage build-inplace "$(limit 150 200)" "$OUT/build_inplace.log" "${BUILD_ENV[@]}" \
            "$PY" setup.py build_ext --inplace
    fi
    if [ "$LAST_STATUS" = failed ] || [ "$LAST_STATUS" = timeout ]; then
        # No build with the CUDA part (a compiler error, the CUDA set-up refused, e.g. an nvcc whose
        # major version is not torch's, or out of time; the logs above say which): build the CPU part
        # alone, next to the sources (about 30 s), so the Triton path, the engine and the benchmarks
        # still run; it may take 30 s of the later stages' reserve.
        stage build-cpu "$(limit 90 170)" "$OUT/build_cpu.log" "${BUILD_ENV[@]}" AUTOGUIDE_FAST_CUDA=0 \
            "$PY" setup.py build_ext --inplace
    fi
fi

# 2. The compiled baseline's networks compile in the background during the smoke check and the
#    tests (no timing runs meanwhile), so the timed run below finds warm Inductor/Triton caches.
PRE_LIMIT=$(limit 150 120)
PRE_PID=""
COMPILE_EST=90  # Seconds the timed run's B2 expects to compile from scratch (it is skipped unless they are left).
if [[ ",${GPU_CHECK_SKIP:-}," == *",latency,"* || ",${GPU_CHECK_SKIP:-}," == *",precompile,"* ]]; then
    record precompile skipped - 0 0 "GPU_CHECK_SKIP"
elif (( PRE_LIMIT >= 10 )); then
    say "background: precompile of B2 (limit $PRE_LIMIT s) -> precompile.log"
    PRE_START=$(date +%s)
    # shellcheck disable=SC2086  # LATENCY_ARGS is a list of arguments
    timeout -k 10 "$PRE_LIMIT" "$PY" benchmarks/latency.py "$LATENCY_MODE" --precompile $LATENCY_ARGS \
        >"$OUT/precompile.log" 2>&1 &
    PRE_PID=$!
fi

# 3. What is here (the card, the extension, the backends), in the background during the smoke check.
INFO=("$PY" -m autoguide_fast.cli info)  # the console script may belong to another interpreter
INFO_START=$(date +%s)
(
    if command -v nvidia-smi >/dev/null; then timeout 30 nvidia-smi; else echo "nvidia-smi: not found"; fi \
        >"$OUT/nvidia-smi.txt" 2>&1
    timeout -k 5 30 "${INFO[@]}" >"$OUT/info.txt" 2>&1
) &
INFO_PID=$!

# 4. Smoke: one verdict per backend x graph mode x streams on a tiny network (and EDM2-XS), each
#    group in its own process, in well under a minute: whatever fails later, this says what works.
SMOKE_LIMIT=$(limit 60 175)
stage smoke "$SMOKE_LIMIT" "$OUT/smoke.log" "$PY" benchmarks/gpu_smoke.py --out "$OUT" \
    --timeout "$(( SMOKE_LIMIT > 15 ? SMOKE_LIMIT - 5 : SMOKE_LIMIT ))"
wait "$INFO_PID"
rc=$?
record info "$( (( rc == 0 )) && echo ok || echo failed)" "$rc" "$(( $(date +%s) - INFO_START ))" 30 \
    "(background, during the smoke check)"

# 5. Tests (stopped with SIGINT at the limit, so pytest still reports and writes its junit file).
# Its reserve covers the precompile's grace period below, the step benchmark, the latency run and the plot.
# (The step stage keeps 110 s for the latency run and the plot, or 10 s when latency is skipped.)
STEP_RESERVE=110
if [[ ",${GPU_CHECK_SKIP:-}," == *",latency,"* ]]; then STEP_RESERVE=10; fi
TESTS_RESERVE=$(( 30 + STEP_RESERVE + ${PRECOMPILE_GRACE_S:-20} ))
TESTS_LIMIT=$(limit "${GPU_CHECK_TESTS_S:-90}" "$TESTS_RESERVE")
STAGE_SIGNAL=INT stage tests "$TESTS_LIMIT" "$OUT/pytest_gpu.log" bash "$SELF" __tests "$OUT" "$TESTS_LIMIT"
if [ -n "$PRE_PID" ]; then
    # Give it at most PRECOMPILE_GRACE_S more seconds: every kernel it has compiled by then is
    # cached already, and the timed run compiles the rest.
    deadline=$(( $(date +%s) + ${PRECOMPILE_GRACE_S:-20} ))
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
    # The timed run's compiled arm (B2) then loads from warm caches.
    if [ "$status" = ok ]; then COMPILE_EST=30; fi
fi

# 6. Step-kernel benchmark (if this tree has it): rows are written op by op; at the limit (SIGINT)
#    it still judges what it measured.
if [ -f benchmarks/bench_step.py ]; then
    STAGE_SIGNAL=INT stage step "$(limit 30 "$STEP_RESERVE")" "$OUT/step.log" "$PY" benchmarks/bench_step.py --quick \
        --out "$OUT/step.csv" --report "$OUT/step_targets.txt"
else
    record step skipped - 0 0 "benchmarks/bench_step.py is not in this tree"
fi

# 7. End-to-end latency, its targets and its plot.
LAT_LIMIT=$(limit "${GPU_CHECK_LATENCY_S:-150}" 20)
# The harness's own budget leaves room for a 10 s overrun and the final report; the 20 s kept after
# the stage let the targets and plot stages run even when it is stopped at its limit. At the limit it
# gets SIGINT and still writes the rows of the batch in progress (what was measured) and the targets.
# shellcheck disable=SC2086  # LATENCY_ARGS is a list of arguments
STAGE_SIGNAL=INT stage latency "$LAT_LIMIT" "$OUT/latency.log" "$PY" benchmarks/latency.py "$LATENCY_MODE" \
    --out "$OUT/latency.csv" --report "$OUT/targets.txt" --compile-estimate "$COMPILE_EST" \
    --time-budget "$(( LAT_LIMIT > 60 ? LAT_LIMIT - 20 : LAT_LIMIT / 2 ))" $LATENCY_ARGS
if [ -s "$OUT/latency.csv" ]; then
    if [ ! -s "$OUT/targets.txt" ]; then  # The run was cut short: judge what it wrote.
        stage targets "$(limit 30 0)" "$OUT/targets.log" "$PY" benchmarks/latency.py \
            --targets-from "$OUT/latency.csv" --report "$OUT/targets.txt"
    fi
    # performance.md: the README's results block for this run (an error text on a CPU run).
    stage plot "$(limit 40 0)" "$OUT/plot.log" bash -c '
        "$0" benchmarks/performance_table.py --csv "$1/latency.csv" >"$1/performance.md" 2>&1
        if ! "$0" -c "import matplotlib" 2>/dev/null; then echo "matplotlib is not installed: no plot"; exit 0; fi
        "$0" benchmarks/plot_latency.py --csv "$1/latency.csv" --out "$1/latency.png" &&
        "$0" benchmarks/plot_latency.py --csv "$1/latency.csv" --out "$1/latency_speedup.png" --metric speedup' \
        "$PY" "$OUT"
else
    record plot skipped - 0 0 "no latency.csv"
fi

# The commit the results record: read back from latency.csv when it exists, else asked of
# benchmarks/common.py (BENCH_COMMIT, else git when the tree has its own .git).
COMMIT="" SOURCES=""
if [ -s "$OUT/latency.csv" ]; then
    read -r COMMIT SOURCES < <("$PY" -c '
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
print(",".join(sorted({r.get("commit") or "unknown" for r in rows})) or "unknown",
      ",".join(sorted({r.get("source_hash") or "" for r in rows} - {""})) or "-")' "$OUT/latency.csv" 2>/dev/null)
fi
if [ -z "$COMMIT" ]; then
    read -r COMMIT SOURCES < <("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import common
print(common.git_commit(), common.source_hash())' 2>/dev/null)
    COMMIT=${COMMIT:-unknown}
fi
commit_lines() {
    if [[ ",$COMMIT," == *",unknown,"* ]]; then
        echo "!!! COMMIT UNKNOWN: the results record commit=unknown (this copy of the tree has no .git and"
        echo "!!! BENCH_COMMIT was not set). Note the commit by hand, or re-run with BENCH_COMMIT=<hash> (the"
        echo "!!! output of git rev-parse HEAD on the machine that has git). source_hash: ${SOURCES:--}"
    else
        echo "commit: $COMMIT (source_hash: ${SOURCES:--})"
    fi
}

# Summary.
{
    echo "GPU check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    grep -m1 '^gpu' "$OUT/env.txt" 2>/dev/null
    grep -m1 '^torch' "$OUT/env.txt" 2>/dev/null
    commit_lines
    echo
    printf '%-13s %-8s %4s %7s %7s  %s\n' stage status exit seconds limit note
    cat "$STAGES"
    echo
    echo "total: $(elapsed) s of a $BUDGET s budget"
    if [ -s "$OUT/smoke.txt" ]; then echo; echo "Smoke (benchmarks/gpu_smoke.py):"; cat "$OUT/smoke.txt"; fi
    if [ -s "$OUT/pytest_gpu.log" ]; then
        echo; echo "Tests (pytest_gpu.log): failures and totals"
        grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|error|skipped|no tests ran).* =+$|^== stopped' \
            "$OUT/pytest_gpu.log" | head -n 60
    fi
    if [ -s "$OUT/step_targets.txt" ]; then echo; cat "$OUT/step_targets.txt"; fi
    if [ -s "$OUT/targets.txt" ]; then echo; cat "$OUT/targets.txt"; fi
} >"$OUT/summary.txt"
rm -f "$STAGES"
echo
cat "$OUT/summary.txt"
exit "$FAILED"
