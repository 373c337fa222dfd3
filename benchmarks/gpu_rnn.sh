#!/usr/bin/env bash
# Prepared check for a GPU session: build genfast with its CUDA kernels, run the CUDA
# tests, and time genfast's LSTM/GRU against cuDNN (torch.nn) side by side in one run.
#
#   OUT=/some/dir bash benchmarks/gpu_rnn.sh          # from the repository root
#
# Needs a CUDA build of torch and nvcc (CUDA_HOME). Writes under $OUT: environment,
# build log, genfast.info(), test log, and the benchmark table (txt) + raw numbers (json).
# Cases: T=100, N=64, I=H=512 in fp32 and bf16 (inference and training step), and
# N=1 decode (one step at a time, state carried; the latency case).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
mkdir -p "$OUT"

{ nvidia-smi; nvcc --version; $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; } \
  > "$OUT/env.txt" 2>&1
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)"; then
  echo "gpu_rnn.sh: needs a CUDA build of torch and a visible GPU (see $OUT/env.txt)" | tee "$OUT/FAILED"
  exit 1
fi

# Build only for this GPU's architecture: a full "80;90" build is for wheels.
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
export GENFAST_CUDA_ARCHS=${GENFAST_CUDA_ARCHS:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"; echo "build failed" | tee "$OUT/FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s for arch $GENFAST_CUDA_ARCHS" | tee "$OUT/build_time.txt"
$PY -c "import genfast; genfast.info()" 2>&1 | tee "$OUT/info.txt"

status=0
$PY -m pytest tests/test_cuda_compile.py tests/test_rnn_cuda.py -q -rs -x --tb=short > "$OUT/tests.txt" 2>&1 || status=1
tail -5 "$OUT/tests.txt"

$PY - "$OUT" <<'EOF' 2>&1 | tee "$OUT/bench.txt"
"""Median time per call (CUDA events) of cuDNN (torch.nn) and genfast on the same module and inputs."""
import copy
import json
import statistics
import sys

import torch

import genfast.nn

out_dir = sys.argv[1]
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def time_ms(fn, warmup=5, repeats=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def providers(kind, dtype, size):
    torch.manual_seed(0)
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    theirs = cls(size, size).to("cuda", dtype)
    ours_cls = genfast.nn.LSTM if kind == "lstm" else genfast.nn.GRU
    return {"cudnn": theirs, "genfast": ours_cls.from_torch(copy.deepcopy(theirs)).to("cuda", dtype)}


def sequence_case(kind, dtype, steps=100, batch=64, size=512):
    x = torch.randn(steps, batch, size, device="cuda", dtype=dtype)
    results = {}
    for name, module in providers(kind, dtype, size).items():
        def inference():
            with torch.no_grad():
                module(x)

        def train_step():
            xg = x.detach().requires_grad_()
            out, _ = module(xg)
            out.sum().backward()

        results[name] = {"inference_ms": time_ms(inference), "train_ms": time_ms(train_step)}
    return results


def decode_case(kind, dtype, tokens=100, size=512):
    # N=1, one time step per call, state carried: what autoregressive generation does.
    x = torch.randn(tokens, 1, 1, size, device="cuda", dtype=dtype)
    results = {}
    for name, module in providers(kind, dtype, size).items():
        def decode():
            with torch.no_grad():
                state = None
                for t in range(tokens):
                    _, state = module(x[t], state)

        results[name] = {"decode_ms_per_token": time_ms(decode, warmup=2, repeats=5) / tokens}
    return results


rows = []
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": []}
for kind in ("lstm", "gru"):
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).replace("torch.", "")
        for case_name, fn in (("T=100 N=64 I=H=512", sequence_case), ("decode N=1 H=512", decode_case)):
            try:
                result = fn(kind, dtype)
            except Exception as err:  # report and continue: one failing case must not hide the rest
                result = {"error": f"{type(err).__name__}: {err}"}
            report["cases"].append({"op": kind, "dtype": label, "case": case_name, "result": result})
            if "error" in result:
                rows.append(f"{kind:4} {label:8} {case_name:20} ERROR {result['error']}")
                continue
            for metric in result["cudnn"]:
                base, ours = result["cudnn"][metric], result["genfast"][metric]
                rows.append(f"{kind:4} {label:8} {case_name:20} {metric:20} cudnn {base:9.4f}  "
                            f"genfast {ours:9.4f}  genfast/cudnn {ours / base:6.2f}x")
print(f"device: {report['device']}   torch {report['torch']}   (median ms; lower is better)")
print("\n".join(rows))
with open(f"{out_dir}/bench.json", "w") as f:
    json.dump(report, f, indent=2)
EOF
exit $status
