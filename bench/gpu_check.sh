#!/usr/bin/env bash
# The GPU check, in one call on a lent GPU machine (run from the repository root):
# build with the CUDA backend, run the GPU tests (and a memcheck pass over a few of
# them), benchmark every rule, codec and the noise against torch idioms and the device
# copy bandwidth. Every step is bounded in time; full logs go to $OUT (or /tmp/fedagg-gpu).
#   FEDAGG_GPU_ARCH  CUDA architectures to build (default: the machine's own, e.g. 90)
# Wheels for a machine without network, fetched here once (its python3 is 3.12):
#   pip download dp-accounting==0.6.0 dm-tree==0.1.10 pyzmq==27.3.0 --python-version 3.12 \
#     --only-binary=:all: --platform manylinux_2_28_x86_64 --no-deps -d .whl
set -uo pipefail
OUT=${OUT:-/tmp/fedagg-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.txt"
# Test dependencies the machine lacks (dp-accounting, dm-tree), carried as wheels in .whl/
# (the device README's recipe); PYTHONPATH, not the image's environment, holds them.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
arch=${FEDAGG_GPU_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
export FEDAGG_CUDA=ON SKBUILD_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${arch}"
start=$SECONDS
if ! timeout 300 $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $((SECONDS - start)) s for sm_${arch}"
$PY -c "import fedagg; print(fedagg.backends())" | tee "$OUT/backends.txt"

start=$SECONDS
timeout 240 $PY -m pytest tests/test_gpu.py tests/test_gpu_plumbing.py tests/test_lora.py -q -rs -p no:cacheprovider \
  > "$OUT/tests.log" 2>&1
tests_rc=$?
grep -E "FAILED|ERROR|Error|passed|failed" "$OUT/tests.log" | tail -30
echo "tests: $((SECONDS - start)) s, rc=$tests_rc"

# Out-of-bounds and uninitialized reads in the kernels, on small inputs (memcheck is slow).
sanitize_rc=0
if command -v compute-sanitizer > /dev/null; then
  start=$SECONDS
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    $PY -m pytest tests/test_gpu.py -q -x -p no:cacheprovider \
    -k "(3-1 or 33-513) or hadamard or majority or gaussian_noise or compressed_mean" > "$OUT/memcheck.log" 2>&1
  sanitize_rc=$?
  grep -E "ERROR SUMMARY|Invalid|passed|failed" "$OUT/memcheck.log" | head -20
  echo "memcheck: $((SECONDS - start)) s, rc=$sanitize_rc"
fi

start=$SECONDS
timeout 180 $PY bench/gpu_bench.py --n 64 --d 16000000 --json "$OUT/gpu_bench.json" > "$OUT/bench.txt" 2>&1
bench_rc=$?
tail -30 "$OUT/bench.txt"
echo "bench: $((SECONDS - start)) s, rc=$bench_rc"
# Where a mean's time goes: kernel, flag, upload, the Python around them, next to torch.
timeout 60 $PY bench/gpu_overhead.py --n 64 --d 16000000 > "$OUT/overhead.txt" 2>&1 || bench_rc=$?
cat "$OUT/overhead.txt"

# The transport on this machine's CPU cores (CI's machine has 2): checksum and copy kernels
# on this CPU, then the loopback benchmark (pyzmq carried in .whl/ like the wheels above).
transport_rc=0
if $PY -c "import zmq" 2> /dev/null; then
  start=$SECONDS
  timeout 90 $PY -m pytest tests/test_transport.py -q -p no:cacheprovider -k "crc32c or copy_crc32c or malloc" \
    > "$OUT/transport_tests.log" 2>&1
  transport_rc=$?
  tail -3 "$OUT/transport_tests.log"
  timeout 150 $PY -m fedagg bench --sections transport --repeat 1 --json "$OUT/transport.json" \
    > "$OUT/transport.txt" 2>&1 || transport_rc=$?
  lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/transport.txt"
  tail -12 "$OUT/transport.txt"
  echo "transport: $((SECONDS - start)) s, rc=$transport_rc"
  # The server on the GPU: loopback rounds of 16 x 25M with --device cuda for every rule, against
  # the CPU server's model (bitwise for mean, median, trimmed mean), receive time vs last byte ->
  # new model, and the state_dir overhead (the server tests on the GPU ran in tests/test_gpu.py).
  start=$SECONDS
  timeout 300 $PY -m fedagg bench --sections server --transport-n 16 --transport-d 25000000 \
    --json "$OUT/server.json" > "$OUT/server.txt" 2>&1 || transport_rc=$?
  tail -40 "$OUT/server.txt"
  echo "server: $((SECONDS - start)) s, rc=$transport_rc"
fi

# Sharded aggregation on this host's CPU cores: K = 1, 2, 4, 8 gloo shards, one thread each, at a
# fixed size per shard (weak: the goal is <= 10% growth from K = 1 to 8) and a fixed total.
start=$SECONDS
timeout 240 $PY -m fedagg bench --sections distributed --n 16 --shards 1 2 4 8 --shard-d 4000000 \
  --repeat 5 --bandwidth-gb 1 --json "$OUT/distributed.json" > "$OUT/distributed.txt" 2>&1
distributed_rc=$?
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/distributed.txt"
tail -70 "$OUT/distributed.txt"
echo "distributed: $((SECONDS - start)) s, rc=$distributed_rc"

# LoRA adapters of 8 Llama-7B layers from 32 participants: LoraAggregator "exact" on the GPU (its
# torch backend) against torch's mean of each factor there (the goal: within 3x), with the
# host rows of the same run for scale.
start=$SECONDS
timeout 240 $PY -m fedagg bench --sections lora --lora-layers 8 --lora-device cuda --json "$OUT/lora.json" \
  > "$OUT/lora.txt" 2>&1
lora_rc=$?
tail -10 "$OUT/lora.txt"
echo "lora: $((SECONDS - start)) s, rc=$lora_rc"
echo "tests rc=$tests_rc memcheck rc=$sanitize_rc bench rc=$bench_rc transport rc=$transport_rc distributed rc=$distributed_rc lora rc=$lora_rc"
exit $(( tests_rc != 0 || sanitize_rc != 0 || bench_rc != 0 || transport_rc != 0 || distributed_rc != 0 || lora_rc != 0 ))
