"""Compile a Triton kernel ahead of time for a GPU architecture, on a machine without a GPU (CI).

The triton wheel ships ptxas, so triton.compile can lower a kernel to a cubin for sm_80 / sm_90 here.
That catches what only a GPU build sees (layouts, shared memory, register spills), which the
interpreter cannot. Used by tests/test_flash_attention_cuda.py and tests/test_triton_compile.py.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton


def compile_for(kernel, capability: int, types: dict[str, str], constants: dict, num_warps: int,
                num_stages: int = 1):
    """The CompiledKernel of `kernel` (a JITFunction or an Autotuner over one) for sm_<capability>.

    types: Triton type strings ("*fp32", "i32", ...) of the runtime arguments; every other argument
    must be in constants (constexprs, with their values)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    missing = [name for name in fn.arg_names if name not in constants and name not in types]
    assert not missing, f"{fn.__name__}: no type or constant given for {missing}"
    signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_usage(compiled, capability: int) -> dict[str, int]:
    """Registers per thread and spill bytes, from `ptxas -v` on the compiled PTX (triton's own ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        result = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(ptx),
                                 "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True,
                                timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert registers and spills, report
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}
