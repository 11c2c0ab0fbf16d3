#!/usr/bin/env bash
# The GPU check of issue 5 in one run. From the repository root, on a machine with a CUDA GPU:
#
#   OUT=/path/to/folder bash benchmarks/gpu_check.sh
#
# It prints the machine, then runs, each into its own log under $OUT, in order of value:
#   1. the CUDA tests (pytest -m cuda)                  -> cuda_tests.log
#   2. the GPU benchmark (benchmarks/gpu.py)            -> gpu_bench.md, gpu.json
#   3. the rest of the suite, which sees no GPU, as CI  -> full_tests.log
# A failing step does not stop the next; each is capped in time, and all of them together end
# DEADLINE seconds (default 400) after the start, so the summary of exit codes that ends the
# output (and $OUT/summary.txt) is written even when a step hangs. Typically about 5 minutes.
# The exit code is the worst of the steps'.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHON=${PYTHON:-python3}
DEADLINE=${DEADLINE:-400}
summary=()
worst=0

run_step() {  # run_step NAME LOG LIMIT_S COMMAND...: tee to $OUT/LOG
    local name=$1 log=$2 limit=$3 start=$SECONDS code left
    shift 3
    left=$((DEADLINE - SECONDS - 5))
    if ((left < 20)); then
        summary+=("$(printf '%-16s skipped: out of time (DEADLINE=%s s)' "$name" "$DEADLINE")")
        if ((worst == 0)); then worst=1; fi
        return
    fi
    ((limit > left)) && limit=$left
    echo
    echo "=== $name (at most ${limit} s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
    code=${PIPESTATUS[0]}
    echo "=== $name: exit $code after $((SECONDS - start)) s"
    local line
    line=$(printf '%-16s exit %3s  %4s s  %s' "$name" "$code" "$((SECONDS - start))" "$OUT/$log")
    ((code == 124 || code == 137)) && line+="  (stopped: over ${limit} s)"
    summary+=("$line")
    if ((code > worst)); then worst=$code; fi
}

machine() {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu \
        --format=csv
    echo "cpus: $(nproc), memory: $(free -g | awk '/^Mem:/ {print $2}') GiB"
    "$PYTHON" - <<'EOF'
import importlib.util, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0), "| capability",
          torch.cuda.get_device_capability(0), "| bf16:", torch.cuda.is_bf16_supported())
    print("TF32 matmul:", torch.backends.cuda.matmul.allow_tf32, "| TF32 cuDNN:",
          torch.backends.cudnn.allow_tf32)
print("pytest-timeout:", importlib.util.find_spec("pytest_timeout") is not None)
EOF
    sha256sum loopy.py test_loopy.py benchmarks/gpu.py
    git log -1 --oneline 2>/dev/null || true
}
export -f machine

timeout_option=""  # pytest-timeout's, where it is installed: one hung test fails alone
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    timeout_option="--timeout=180"
fi
parallel=""  # pytest-xdist's, where it is installed: the suite's subprocesses import CUDA torch
if "$PYTHON" -c "import xdist" 2>/dev/null; then
    parallel="-n 6"
fi

run_step machine machine.log 60 bash -c machine

run_step cuda-tests cuda_tests.log 150 \
    "$PYTHON" -m pytest -q -ra -m cuda -p no:cacheprovider $timeout_option \
    test_loopy.py

run_step gpu-benchmark gpu_bench.md 150 "$PYTHON" benchmarks/gpu.py --save "$OUT/gpu.json"

run_step full-suite full_tests.log 300 \
    "$PYTHON" -m pytest -q -ra -m "not cuda" -p no:cacheprovider $timeout_option $parallel \
    --durations=10 test_loopy.py

{
    echo
    echo "=== summary ($SECONDS s in all)"
    printf '%s\n' "${summary[@]}"
    for log in cuda_tests.log full_tests.log; do
        [[ -f "$OUT/$log" ]] || continue
        echo "--- $log: $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT/$log" | tail -n 1)"
        grep -E '^(FAILED|ERROR) ' "$OUT/$log" | head -n 30
    done
    if [[ -f "$OUT/cuda_tests.log" ]] && grep -Eq '[0-9]+ skipped' "$OUT/cuda_tests.log"; then
        echo "WARNING: CUDA tests were skipped: does torch see the GPU? (machine.log)"
    fi
} | tee "$OUT/summary.txt"
exit "$worst"
