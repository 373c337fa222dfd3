#!/usr/bin/env bash
# The prepared check for a lent GPU machine, in one command that ends inside a time budget:
# build genfast with its CUDA kernels, run every CUDA/Triton test, then time every GPU path
# against PyTorch side by side with the benchmark command (`python -m genfast.bench --device cuda`,
# its gpu.* cases; one process per group of cases, one group at a time).
#
#     OUT=/some/dir bash benchmarks/gpu_session.sh          # from the repository root
#
# Env: PYTHON (default python3, a CUDA build of torch with triton), GPU_SESSION_BUDGET_S (default
# 540: every stage's timeout is cut to what is left, so the script ends and writes its files even
# when a stage hangs), GPU_SESSION_TESTS (default "rnn rnn_persistent rnn_layernorm attention_low_precision
# attention_rest generation": which test groups run, concurrently; rnn_persistent is issue 20's persistent kernel,
# rnn_layernorm issue 19's LayerNormLSTM/GRU kernels), GPU_SESSION_BENCHES (default "rnn generation attention"; also
# "sampling_sweep", a diagnostic: which groups of cases run, in that order), ATTENTION_FILTER (default
# "gpu.attention.": the --filter of the attention group, e.g. "gpu.attention.b4.h32.n4096." for one length).
# Optional: wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh: expecttest, which torch.library.opcheck imports;
# FlashRNN, issue 20's second baseline) are installed to /tmp/site first. It writes at most eight files under $OUT:
#   summary.txt          environment, genfast.info(), each stage's exit status and time, test totals,
#                        benchmarks/gpu_error_probe.sh (how error messages and the C++ runtime behave)
#   build.log            the extension build
#   tests.log            pytest output of the CUDA test files (four processes at once)
#   bench_rnn.txt        gpu.rnn.*: CUDA LSTM/GRU vs cuDNN, fp32 and bf16, sequences and decoding
#   bench_generation.txt gpu.decode_attention.*, gpu.sampling_draw.*, gpu.gpt2.*: decode attention,
#                        sampling, GPT-2 greedy vs transformers
#   bench_attention.txt  gpu.attention.*: Triton flash attention vs SDPA flash, bf16 (do_bench, autotuned)
#                        and masked / dropout / packed-varlen calls vs SDPA's default backend (issue 23)
#   results_json.tar.gz  the benchmark command's JSON (one per group, written after every case) and CSV
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-results}
BUDGET_S=${GPU_SESSION_BUDGET_S:-540}
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/json"
SUMMARY=$OUT/summary.txt
START=$(date +%s)
unset TRITON_INTERPRET            # the compiled kernels are what this session is for
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[$(elapsed) s] $*" | tee -a "$SUMMARY"; }
# Timeout for a stage: its cap, or what is left of the budget less 20 s for the summary.
cap() { local left=$(( BUDGET_S - $(elapsed) - 20 )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
stage() {  # stage NAME CAP LOGFILE CMD...: run with a timeout, append to LOGFILE, record status and time
  local name=$1 limit; limit=$(cap "$2"); local logfile=$3; shift 3
  local began; began=$(date +%s)
  timeout "$limit" "$@" >> "$logfile" 2>&1
  local rc=$?
  log "$name: rc=$rc$( ((rc == 124)) && echo ' (timed out)') in $(( $(date +%s) - began )) s (limit $limit s)"
  return $rc
}

log "gpu_session.sh: budget $BUDGET_S s"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  echo "cpus: $(nproc)"
  nvcc --version | tail -2
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(), \
torch.cuda.get_device_capability())"
} >> "$SUMMARY" 2>&1
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)"; then
  log "needs a CUDA build of torch and a visible GPU"; exit 1
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$SUMMARY" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  log "installed carried wheels: $(ls .whl)"
fi

# Build for this GPU's architecture only (a wheel's "80;90" build is what CI compile-checks).
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
export GENFAST_CUDA_ARCHS=${GENFAST_CUDA_ARCHS:-$ARCH} MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! stage "build (CUDA, sm_$GENFAST_CUDA_ARCHS)" 360 "$OUT/build.log" \
    $PY -m pip install --no-build-isolation --no-deps -e .; then
  tail -30 "$OUT/build.log" | tee -a "$SUMMARY"
  # Without the CUDA RNN kernels the Triton kernels can still be checked: build the CPU part alone.
  export GENFAST_NO_CUDA=1
  stage "build (CPU only, after the CUDA build failed)" 240 "$OUT/build.log" \
    $PY -m pip install --no-build-isolation --no-deps -e . || exit 1
fi
$PY -c "import genfast; genfast.info()" >> "$SUMMARY" 2>&1
# How the extension links the C++ runtime: on one image (benchmarks/results/gpu-h200-2026-11-28/README.md)
# every error message that formatted an integer crashed inside libstdc++ code that the backtrace placed in _C.so.
{
  so=$($PY -c "import torch, genfast._C as c; print(c.__file__)")
  echo "== $so"; readelf -d "$so" | grep -E "NEEDED|RPATH|RUNPATH"
  echo "libstdc++ locale/codecvt symbols defined inside it: $(nm -C --defined-only "$so" | grep -cE 'std::locale::|std::codecvt<')"
  $PY -c "import sysconfig; print('LDSHARED:', sysconfig.get_config_var('LDSHARED'))"
  echo "LDFLAGS=${LDFLAGS:-} CXXFLAGS=${CXXFLAGS:-}"; g++ --version | head -1
} >> "$SUMMARY" 2>&1

# Tests: four processes at once (correctness only; nothing is timed while they run).
# GENFAST_FLASH_AUTOTUNE=0: one tile configuration per kernel keeps Triton's compile time down.
run_tests() {  # NAME FILE...
  local name=$1; shift
  stage "tests $name" 240 "$WORK/tests_$name.log" $PY -m pytest "$@" -q -rfEs --tb=short --durations=5 \
    -p no:cacheprovider
}
# The attention tests are split in two: each new tile/dtype/head-dim combination is a Triton compile,
# and one process for all of them outlasts a stage's time limit.
# The argument-error tests run in a process of their own: on one image every error message that formatted
# an integer crashed the process (gpu_error_probe.sh, run alongside, looks into it), which would take
# the rest of the file down with it.
TEST_GROUPS=" ${GPU_SESSION_TESTS:-rnn rnn_persistent rnn_layernorm attention_low_precision attention_rest generation} "
wanted() { [[ $TEST_GROUPS == *" $1 "* ]]; }
# The CUDA RNN tests: tests/test_rnn.py's cases marked `cuda`.
RNN_TESTS=(tests/test_rnn.py -m cuda)
wanted rnn && (run_tests rnn "${RNN_TESTS[@]}" -k "not argument_errors";
               run_tests rnn_package tests/test_package.py;
               run_tests rnn_argument_errors "${RNN_TESTS[@]}" -k argument_errors) &
# The persistent LSTM/GRU kernel (issue 20, opt-in): against torch.nn, each test checking the kernel ran
# (and the FlashRNN baseline's weight mapping, where its wheel was carried).
wanted rnn_persistent && run_tests rnn_persistent tests/test_rnn_persistent_cuda.py tests/test_rnn_persistent_plan.py \
    tests/test_bench_flashrnn.py &
# The LayerNormLSTM/GRU CUDA kernels (issue 19): against the CPU kernel and genfast.reference.
wanted rnn_layernorm && run_tests rnn_layernorm tests/test_rnn_layernorm_cuda.py &
(PYTHON=$PY timeout "$(cap 240)" bash benchmarks/gpu_error_probe.sh > "$WORK/probe.log" 2>&1) &
wanted attention_low_precision && (export GENFAST_FLASH_AUTOTUNE=0;
  run_tests attention_low_precision tests/test_flash_attention_cuda.py -k low_precision) &
wanted attention_rest && (export GENFAST_FLASH_AUTOTUNE=0;
  run_tests attention_rest tests/test_flash_attention_cuda.py -k "not low_precision") &
wanted generation && run_tests generation tests/test_generation_cuda.py &
wait
{ echo "===== gpu_error_probe.sh"; cat "$WORK/probe.log"; } >> "$SUMMARY"
for name in rnn rnn_package rnn_argument_errors rnn_persistent rnn_layernorm attention_low_precision attention_rest generation; do
  [[ -f $WORK/tests_$name.log ]] || continue
  { echo "===== tests $name"; cat "$WORK/tests_$name.log"; } >> "$OUT/tests.log"
  echo "tests $name: $(grep -E 'passed|failed|error|no tests ran' "$WORK/tests_$name.log" | tail -1)" >> "$SUMMARY"
done

# Benchmarks, one group of cases at a time, each case side by side with its PyTorch baseline
# (genfast.bench: warm-up, interleaved rounds, CUDA events or do_bench; TF32 off).
bench() {  # NAME CAP FILTER [SET]: one benchmark process, its table in bench_NAME.txt
  local name=$1 limit=$2 filter=$3 set=${4:---quick} file=$1
  [[ $name == sampling_sweep ]] && file=generation
  stage "bench $name" "$limit" "$OUT/bench_$file.txt" $PY -m genfast.bench --device cuda "$set" \
    --filter "$filter" --no-progress --json "$WORK/json/bench_$name.json" --csv "$WORK/json/runs.csv"
}
for group in ${GPU_SESSION_BENCHES:-rnn generation attention}; do
  case $group in
    rnn) bench rnn 180 gpu.rnn. ;;  # with issue 20's persistent column and shapes
    generation) bench generation 180 gpu.decode_attention.,gpu.sampling_draw.b,gpu.gpt2. ;;
    attention) bench attention 400 "${ATTENTION_FILTER:-gpu.attention.}" ;;
    sampling_sweep) bench sampling_sweep 150 gpu.sampling_draw.sweep. --full ;;
    *) log "unknown group '$group' in GPU_SESSION_BENCHES (rnn, generation, attention, sampling_sweep)" ;;
  esac
done

# Last, so it never takes time from the measurements: where the image has compute-sanitizer, one small case of
# the persistent kernel per cell under its race and memory checkers.
if wanted rnn_persistent && command -v compute-sanitizer > /dev/null; then
  for tool in racecheck memcheck; do
    stage "compute-sanitizer $tool (persistent RNN)" 90 "$OUT/tests.log" \
      compute-sanitizer --tool "$tool" --error-exitcode 3 $PY -m pytest tests/test_rnn_persistent_cuda.py -q \
      -p no:cacheprovider -k "fp32_matches_torch and t5-n3-i16-h64 and 1layer and inference"
  done
fi

tar -czf "$OUT/results_json.tar.gz" -C "$WORK" json
log "done"
