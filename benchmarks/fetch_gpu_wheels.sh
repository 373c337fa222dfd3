#!/usr/bin/env bash
# Fetches, on a machine that reaches a package index, the wheels benchmarks/gpu_session.sh installs on a GPU
# machine that does not: expecttest (torch.library.opcheck imports it) and FlashRNN, issue 20's second
# baseline (Python and CUDA sources that torch compiles on first use), with its one dependency the GPU image
# lacks. They go to .whl/ (git-ignored), which the device tool carries: carry=[".whl"].
#
#     bash benchmarks/fetch_gpu_wheels.sh                   # from the repository root
set -euo pipefail
PY=${PYTHON:-python3}
$PY -m pip download --no-deps --dest .whl expecttest==0.3.0 flashrnn==1.0.8 einops==0.8.1
ls .whl
