#!/usr/bin/env bash
# One command for a GPU machine: build the CUDA kernels, run the test suite on
# the GPU, run compute-sanitizer (memcheck over the norm and conv_bn ops' CUDA
# tests, racecheck over the norm ops'), profile the fused ResNet-50 step and
# run the benchmark suite. Results go to $OUT (default
# benchmarks/results/gpu_check): the step profile <card>-conv-bn-profile.md,
# the benchmark reports (<card>.csv/.md/.png, <card>-conv-bn-cuda.csv/.md)
# and logs.tar.gz (env.txt, build.log, tests.log, sanitizer.log,
# sanitizer_conv_bn.log, sanitizer_sequence.log, racecheck.log, packed into one file so that the
# reports and logs stay few). Commit them, logs unpacked, under
# benchmarks/results/gpu_check/.
#
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Each step's time limit can be set to fit a short lease (seconds; 0 skips the
# step): TESTS_TIMEOUT (900), MEMCHECK_TIMEOUT (420), RACECHECK_TIMEOUT (300),
# PROFILE_TIMEOUT (240), BENCH_TIMEOUT (3600). TESTS_ARGS passes options to
# pytest (e.g. "-m cuda", the GPU cases only), BENCH_ARGS to the benchmark
# (e.g. "--suite conv_bn").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TORCHNORM_CUDA=1 PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
status=0
step() { echo "== $1 ($(date +%T))"; }

step env
{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$OUT/env.txt" 2>&1
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")

step build
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "build failed"; exit 1
fi

# Runs "$@" under a time limit of $1 seconds, or skips it where that is 0.
limited() {
  local seconds=$1; shift
  if [ "$seconds" = 0 ]; then echo "skipped"; return 0; fi
  timeout "$seconds" "$@"
}

step tests
limited "${TESTS_TIMEOUT:-900}" $PY -m pytest tests -q -x -p no:cacheprovider ${TESTS_ARGS:-} > "$OUT/tests.log" 2>&1 \
  || status=1
tail -5 "$OUT/tests.log"

step sanitizer
# memcheck over the CUDA tests that call the ops directly (every dtype,
# layout, activation and output mask, small shapes), then racecheck (shared
# memory hazards of the block reductions) over their float32 cases; each kept
# to a few minutes.
NORM_TESTS="tests/test_batch_norm.py tests/test_layer_norm.py tests/test_group_norm.py tests/test_instance_norm.py"
limited "${MEMCHECK_TIMEOUT:-420}" compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest $NORM_TESTS -q -x -p no:cacheprovider \
  -k "cuda and (test_op_ or test_empty_batch)" \
  > "$OUT/sanitizer.log" 2>&1 || status=1
tail -5 "$OUT/sanitizer.log"
# memcheck over the conv_bn ops' CUDA tests (the internal per-channel ops,
# the frozen op and its blocks).
limited "${MEMCHECK_TIMEOUT:-420}" compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest tests/test_conv_bn_internal_ops.py tests/test_conv_bn_frozen.py -q -x -p no:cacheprovider -k cuda \
  > "$OUT/sanitizer_conv_bn.log" 2>&1 || status=1
tail -5 "$OUT/sanitizer_conv_bn.log"
# The sequence norms' CUDA kernels (masked BatchNorm, the BN-LSTM step) and
# Online Normalization's.
limited "${MEMCHECK_TIMEOUT:-420}" compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest tests/test_sequence_ops.py tests/test_online_norm.py -q -x -p no:cacheprovider \
  -k "cuda and not gradcheck" \
  > "$OUT/sanitizer_sequence.log" 2>&1 || status=1
tail -5 "$OUT/sanitizer_sequence.log"
# The kernels added since: Streaming Normalization, weight and cosine
# normalization, SyncBatchNorm's per-rank ops (never run on a GPU before this
# script).
limited "${MEMCHECK_TIMEOUT:-420}" compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest tests/test_streaming_norm.py tests/test_weight_norm.py tests/test_cosine_norm.py \
  tests/test_sync_batch_norm.py -q -x \
  -p no:cacheprovider -k "cuda and not gradcheck and not compile" \
  > "$OUT/sanitizer_weight_side.log" 2>&1 || status=1
tail -5 "$OUT/sanitizer_weight_side.log"
limited "${RACECHECK_TIMEOUT:-300}" compute-sanitizer --tool racecheck --error-exitcode 9 \
  $PY -m pytest $NORM_TESTS -q -x -p no:cacheprovider \
  -k "cuda and test_op_ and f32 and not f64" \
  > "$OUT/racecheck.log" 2>&1 || status=1
tail -5 "$OUT/racecheck.log"

step profile
# Where the fused ResNet-50 step's time goes against the plain one's:
# device time per kernel, host time, launches (benchmarks/profile_conv_bn.py).
limited "${PROFILE_TIMEOUT:-240}" $PY -m benchmarks.profile_conv_bn --device cuda \
  --out "$OUT/$card-conv-bn-profile.md" 2>&1 | tail -3 || status=1

step benchmarks
limited "${BENCH_TIMEOUT:-3600}" $PY -m benchmarks --device cuda ${BENCH_ARGS:-} --out "$OUT/$card.csv" 2>&1 | tail -40 \
  || status=1

step done
# The logs as one file (see the header).
logs=$(cd "$OUT" && ls env.txt build.log tests.log sanitizer.log sanitizer_conv_bn.log sanitizer_sequence.log racecheck.log 2>/dev/null)
(cd "$OUT" && tar czf logs.tar.gz $logs && rm -f $logs)
exit $status
