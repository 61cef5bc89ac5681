#!/usr/bin/env bash
# The GPU check, in one call on a lent GPU machine (run from the repository root):
# build with the CUDA backend, run the GPU tests, benchmark every rule against
# torch idioms and the device copy bandwidth. Full logs go to $OUT (or
# /tmp/fedagg-gpu); the short table is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/fedagg-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
export FEDAGG_CUDA=ON
if ! $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import fedagg; print(fedagg.backends())" | tee "$OUT/backends.txt"
$PY -m pytest tests/test_gpu.py tests/test_gpu_plumbing.py -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -25 "$OUT/tests.log"
$PY bench/gpu_bench.py --n 64 --d 16000000 --json "$OUT/gpu_bench.json" > "$OUT/bench.txt" 2>&1
bench_rc=$?
cat "$OUT/bench.txt" | tail -30
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
