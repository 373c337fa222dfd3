#!/usr/bin/env bash
# One GPU session for the Triton flash attention: install, CUDA tests, benchmark. Run from the repo root:
#     OUT=/some/dir bash benchmarks/gpu_attention.sh [all|test|bench]      (default all)
# With a 10-minute limit per command, run `test` and `bench` as two commands on the same warm machine.
# Needs a Python whose torch is a CUDA build with triton (PYTHON, default python3). Everything it
# produces goes under $OUT (default ./gpu-attention-results): install.log, tests.log, junit.xml,
# attention_gpu.json, attention_gpu.md, bench.log. Budget: ~2 min install, ~4 min tests, ~6 min bench.
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-attention-results}
mkdir -p "$OUT"
STAGE=${1:-all}
unset TRITON_INTERPRET   # the compiled kernels are what this session is for
tests_rc=0
bench_rc=0

"$PYTHON" - <<'PY' || exit 1
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1

# The Triton kernels need no compiled extension; GENFAST_NO_CUDA=1 keeps the (CPU-only) build short.
echo "== install"
GENFAST_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; echo "install failed"; exit 1; }
"$PYTHON" -c "import genfast.kernels.flash_attention as m; assert not m._INTERPRETED; print('import ok')" || exit 1

# Correctness does not need tuned tiles: one configuration per kernel keeps compile time down.
if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
    echo "== CUDA tests"
    GENFAST_FLASH_AUTOTUNE=0 timeout 300 "$PYTHON" -m pytest tests/test_flash_attention_cuda.py -q -rs \
        --durations=10 --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/tests.log" | tail -40
    tests_rc=${PIPESTATUS[0]}
fi

if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
    echo "== benchmark (autotuned)"
    timeout 420 "$PYTHON" benchmarks/gpu_attention.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
    bench_rc=${PIPESTATUS[0]}
fi

echo "tests rc=$tests_rc bench rc=$bench_rc" | tee "$OUT/status.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
