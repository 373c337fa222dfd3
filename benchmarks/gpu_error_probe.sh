#!/usr/bin/env bash
# Why did genfast's error messages crash on the first GPU image? (benchmarks/results/gpu-h200-2026-11-28/)
# There, every TORCH_CHECK message that formatted an integer died with SIGSEGV inside
# std::ostream::_M_insert<long>. This probe prints, for gpu_session.sh's summary:
#   1. torch's own error message with integers (torch's build, no genfast code),
#   2. the same kind of message from genfast's setup.py build (a CPU op, the decode_attention length check),
#   3. a ten-line extension built by torch.utils.cpp_extension.load_inline, which links with ninja and
#      the compiler directly instead of Python's LDSHARED (setuptools); 3b. the same with setup.py's fix
#      (libstdc++.so.6 named at link time), and the toolchain's view of libstdc++,
#   4. where the dynamic linker binds _M_insert / locale symbols for genfast, and which libstdc++ is mapped.
# Each probe runs in its own process; "rc=-11" (or 139) is the crash, "rc=0 ... message" is a clean error.
set -uo pipefail
PY=${PYTHON:-python3}
probe() {  # NAME CODE: run CODE in a fresh interpreter, print its exit status and first line of output
  local name=$1 code=$2 output rc
  output=$(timeout 300 "$PY" -X faulthandler -c "$code" 2>&1); rc=$?
  echo "probe $name: rc=$rc | $(echo "$output" | grep -v '^ *File\|^Current thread\|^Fatal Python' | head -2 | tr '\n' ' ')"
}
probe torch_message "import torch
try: torch.empty(6).view(7)
except RuntimeError as e: print('clean error:', e)"

GENFAST_CALL="import torch, genfast.ops
q = torch.zeros(1, 2, 8); k = torch.zeros(1, 2, 4, 8)
try: torch.ops.genfast.decode_attention(q, k, k, 0, 1.0)
except RuntimeError as e: print('clean error:', str(e).splitlines()[0])"
probe genfast_setup_build "$GENFAST_CALL"

probe load_inline_build "import tempfile, torch
from torch.utils.cpp_extension import load_inline
source = '''
#include <torch/extension.h>
void fail(int64_t n) { TORCH_CHECK(n < 0, \"probe: n must be negative, got \", n); }
'''
module = load_inline('genfast_error_probe', source, functions=['fail'], build_directory=tempfile.mkdtemp(),
                     extra_cflags=['-O1'])
try: module.fail(3)
except RuntimeError as e: print('clean error:', str(e).splitlines()[0])"

# 3b. The same extension with the fix setup.py applies: the shared libstdc++.so.6 named at link time.
probe load_inline_build_shared_runtime "import subprocess, tempfile, torch
from torch.utils.cpp_extension import load_inline
runtime = subprocess.run(['c++', '-print-file-name=libstdc++.so.6'], capture_output=True, text=True).stdout.strip()
source = '''
#include <torch/extension.h>
void fail(int64_t n) { TORCH_CHECK(n < 0, \"probe: n must be negative, got \", n); }
'''
module = load_inline('genfast_error_probe_shared', source, functions=['fail'], build_directory=tempfile.mkdtemp(),
                     extra_cflags=['-O1'], extra_ldflags=[runtime])
try: module.fail(3)
except RuntimeError as e: print('clean error:', str(e).splitlines()[0])"
runtime_so=$(c++ -print-file-name=libstdc++.so)
echo "== toolchain: c++ is $(readlink -f "$(command -v c++)"); libstdc++.so: $runtime_so -> $(readlink -f "$runtime_so" 2>&1)"
echo "   libstdc++.so.6: $(c++ -print-file-name=libstdc++.so.6); libstdc++.a: $(c++ -print-file-name=libstdc++.a)"
echo "   specs lines mentioning static-libstdc++: $(c++ -dumpspecs | grep -c 'static-libstdc++')"
echo "== dynamic-linker bindings of ostream/locale symbols for genfast's call (LD_DEBUG=bindings, first 25)"
LD_DEBUG=bindings timeout 120 "$PY" -c "$GENFAST_CALL" 2>&1 \
  | grep -E "_ZNSo9_M_insert|_ZNSt6locale|_ZNSt7codecvt|_ZNSt8ios_base4Init" | grep -E "genfast|_C\." \
  | sed -E 's/^ *[0-9]+: *//' | sort -u | head -25
echo "== C++ runtimes mapped after import genfast"
"$PY" -c "import torch, genfast.ops
print('\n'.join(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l or 'libgcc_s' in l})))"
so=$("$PY" -c "import torch, genfast._C as c; print(c.__file__)")
echo "== defined in genfast's $so: $(nm -D --defined-only "$so" | grep -cE '_ZNSo9_M_insert|_ZNSt6locale') ostream/locale symbols (dynamic table)"
