"""CI compile check for the CUDA kernels: no GPU needed, only nvcc.

Every .cu file under csrc/ is compiled for sm_80 and sm_90 (the architectures the
wheel targets by default), so a kernel that does not build is caught on CPU-only
CI machines. The files compile in parallel once per session; each file then has
its own test that fails with nvcc's full output.

The torch glue (csrc/cuda/*.cpp) is checked too, with the host compiler against
torch's headers and the CUDA runtime headers (-fsyntax-only: templates are
instantiated and every call type-checked, nothing is linked).
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
GLUE_SOURCES = sorted((CSRC / "cuda").glob("*.cpp"))
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
# The restrictions torch's extension build puts on CUDA code (no implicit half/bfloat16
# conversions or operators), so code that only builds without them fails here too.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = pathlib.Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in /usr/local/cuda/bin")


def _compile(source: pathlib.Path, out_dir: pathlib.Path) -> tuple[list[str], subprocess.CompletedProcess]:
    obj = out_dir / (str(source.relative_to(CSRC)).replace(os.sep, "_") + ".o")
    cmd = [NVCC, "-c", "-std=c++17", "-O2", *ARCH_FLAGS, *TORCH_NVCC_FLAGS, "-I", str(CSRC), str(source),
           "-o", str(obj)]
    return cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[pathlib.Path, tuple[list[str], subprocess.CompletedProcess]]:
    out_dir = tmp_path_factory.mktemp("nvcc")
    workers = max(1, min(len(CUDA_SOURCES), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda src: _compile(src, out_dir), CUDA_SOURCES)
        return dict(zip(CUDA_SOURCES, results))


def test_rnn_kernels_are_present():
    # The compile check must not pass vacuously if the kernels move or vanish.
    names = {p.relative_to(CSRC).as_posix() for p in CUDA_SOURCES}
    assert {"cuda/lstm.cu", "cuda/gru.cu"} <= names, names


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_nvcc_compiles(source, compiled):
    cmd, result = compiled[source]
    assert result.returncode == 0, (
        f"nvcc failed on {source.relative_to(ROOT)} (exit {result.returncode})\n"
        f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}"
    )
    obj = pathlib.Path(cmd[-1])
    assert obj.is_file() and obj.stat().st_size > 0, f"nvcc produced no object for {source}"


def _host_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.parametrize("source", GLUE_SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cuda_glue_type_checks(source, tmp_path):
    from torch.utils import cpp_extension

    cxx = _host_compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    # nvcc on PATH may be a wrapper script, so look where toolkits live as well.
    roots = [os.environ.get("CUDA_HOME"), str(pathlib.Path(NVCC).resolve().parent.parent), "/usr/local/cuda"]
    found = [pathlib.Path(r) / "include" for r in roots if r and (pathlib.Path(r) / "include" / "cuda_runtime_api.h").is_file()]
    if not found:
        pytest.skip(f"CUDA runtime headers (cuda_runtime_api.h) not found under {roots}")
    cuda_include = found[0]
    torch_includes = cpp_extension.include_paths()
    # A CPU-only torch ships c10/cuda headers but not the one CMake generates for CUDA
    # builds; stand in for it (it only sets the shared-library export macro). A CUDA
    # torch's own header comes first in the search path and wins.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    import sysconfig

    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DGENFAST_WITH_CUDA", "-I", str(CSRC)]
    for inc in torch_includes:
        cmd += ["-isystem", inc]
    cmd += ["-isystem", str(tmp_path), "-isystem", str(cuda_include), "-isystem", sysconfig.get_paths()["include"],
            str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}"
