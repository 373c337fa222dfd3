#!/usr/bin/env bash
# One GPU session for the generation kernels (Triton sampling and flash-decoding): install, CUDA tests,
# and a timing of each against the plain-PyTorch reference, side by side in one run. From the repo root:
#     OUT=/some/dir bash benchmarks/gpu_generation.sh [all|test|bench]      (default all)
# Needs a Python whose torch is a CUDA build with triton (PYTHON, default python3). Writes under $OUT
# (default ./gpu-generation-results): install.log, tests.log, bench.txt, bench.json.
# Budget: ~2 min install (CPU-only build), ~3 min tests (first-call compiles), ~2 min bench.
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-generation-results}
mkdir -p "$OUT"
STAGE=${1:-all}
unset TRITON_INTERPRET   # the compiled kernels are what this session is for
tests_rc=0
bench_rc=0

"$PYTHON" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())" || exit 1

echo "== install"
GENFAST_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; echo "install failed"; exit 1; }

if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
    echo "== CUDA tests"
    timeout 300 "$PYTHON" -m pytest tests/test_generation_cuda.py -q -rs -x --durations=10 2>&1 \
        | tee "$OUT/tests.log" | tail -30
    tests_rc=${PIPESTATUS[0]}
fi

if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
    echo "== benchmark"
    timeout 300 "$PYTHON" - "$OUT" <<'PY' 2>&1 | tee "$OUT/bench.txt"
"""Median ms per call (CUDA events): genfast's Triton ops vs the plain-PyTorch reference, same inputs."""
import json
import math
import statistics
import sys

import torch

import genfast.ops  # noqa: F401  (registers the CUDA kernels)
from genfast import reference
from genfast.bench.timing import CudaTimer
import torch.nn.functional as F

torch.backends.cuda.matmul.allow_tf32 = False


def time_ms(fn, warmup=5, repeats=30):
    """Median of `repeats` single calls, each bracketed by CUDA events (genfast.bench's timer)."""
    timer = CudaTimer()
    for _ in range(warmup):
        fn()
    return statistics.median(timer.time_calls(fn, 1) for _ in range(repeats)) * 1e3


rows, report = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}


def record(op, case, providers):
    try:
        result = {name: time_ms(fn) for name, fn in providers.items()}
    except Exception as err:  # one failing case must not hide the rest
        result = {"error": f"{type(err).__name__}: {err}"}
    report["cases"].append({"op": op, "case": case, "ms": result})
    if "error" in result:
        rows.append(f"{op:16} {case:34} ERROR {result['error']}")
        return
    base = result["reference"]
    rows.append(f"{op:16} {case:34} " + "  ".join(f"{k} {v:8.4f}" for k, v in result.items())
                + f"  genfast/reference {result['genfast'] / base:6.2f}x")


for dtype in (torch.float16, torch.float32):
    for batch, heads_q, heads_kv, dim, length in [(1, 12, 12, 64, 1024), (1, 12, 12, 64, 16384),
                                                  (8, 32, 8, 128, 4096), (1, 32, 8, 128, 32768)]:
        q = torch.randn(batch, heads_q, dim, device="cuda", dtype=dtype)
        k = torch.randn(batch, heads_kv, length, dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        scale = 1 / math.sqrt(dim)
        record("decode_attention", f"{str(dtype)[6:]} B{batch} H{heads_q}/{heads_kv} D{dim} L{length}", {
            "genfast": lambda: torch.ops.genfast.decode_attention(q, k, v, length, scale),
            "reference": lambda: reference.attention(q[:, :, None], k, v, scale=scale, enable_gqa=True),
            "torch_sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale,
                                                                 enable_gqa=heads_q != heads_kv),
        })

for batch, vocab in [(1, 50257), (32, 50257), (1, 151936)]:
    logits = torch.randn(batch, vocab, device="cuda") * 3
    uniforms = torch.rand(batch, device="cuda", dtype=torch.float64)
    for settings in [(0.8, 0, 1.0), (1.0, 50, 0.9), (1.0, 0, 0.9)]:
        record("sampling_draw", f"B{batch} V{vocab} t/k/p={settings}", {
            "genfast": lambda: torch.ops.genfast.sampling_draw(logits, uniforms, *settings),
            "reference": lambda: reference.draw_from_scores(reference.process_logits(logits, *settings), uniforms),
        })

print(f"device: {report['device']}   torch {report['torch']}   (median ms; lower is better)")
print("\n".join(rows))
with open(f"{sys.argv[1]}/bench.json", "w") as f:
    json.dump(report, f, indent=2)
PY
    bench_rc=${PIPESTATUS[0]}
fi

echo "tests rc=$tests_rc bench rc=$bench_rc" | tee "$OUT/status.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
