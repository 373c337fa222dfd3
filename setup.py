"""Build genfast and its one compiled extension, ``genfast._C``.

CPU kernels are always built. CUDA kernels (csrc/cuda/) are built only when the
installed torch is a CUDA build *and* CUDA_HOME points at a toolkit; set
GENFAST_NO_CUDA=1 to force a CPU-only build. Install with
``pip install --no-build-isolation .`` so the extension compiles against the torch
you already have.

SIMD: the CPU kernels are compiled for the baseline x86-64 ISA, and their hot
functions carry extra copies compiled for AVX2+FMA and AVX-512 (GCC target
attributes), selected at run time from CPUID. No -march=native: the wheel runs on
any x86-64 CPU and uses the widest vectors the CPU it lands on has.
"""
import glob
import os
import subprocess

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("GENFAST_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _cuda_arch_flags() -> list[str]:
    # "80;90" -> -gencode for each, plus PTX of the newest for forward compatibility.
    archs = os.environ.get("GENFAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    archs = [a.strip() for a in archs if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def _shared_cxx_runtime() -> list[str]:
    """The C++ runtime to link, named explicitly as the shared libstdc++.so.6 torch itself uses.

    One GPU image (Ubuntu 24.04's g++ 13, benchmarks/results/gpu-h200-2026-11-28/) resolved the
    compiler's implicit -lstdc++ to the static archive: genfast._C then carried a second, never
    initialised copy of libstdc++'s locale, and every error message that formatted an integer
    crashed the process. An object named on the command line is linked before the driver's
    -lstdc++, so the archive contributes nothing; elsewhere this names the library the
    linker would have picked anyway. tests/test_package.py checks the result.
    """
    compiler = os.environ.get("CXX", "c++")
    try:
        path = subprocess.run([compiler, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [path] if os.path.isabs(path) and os.path.isfile(path) else []


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/generation/*.cpp")
    # -fno-trapping-math: lets GCC if-convert the clamps in the polynomial exp, so the gate
    # loops vectorise on AVX2 too (genfast does not rely on floating-point exceptions).
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DGENFAST_BUILD"]
    define_macros = []
    include_dirs = [os.path.join(HERE, "csrc")]
    if os.environ.get("GENFAST_EMULATE_AVX512", "0") == "1":
        # Test build (tests/test_simd_emulated_avx512.py): runs the AVX-512 code paths on an AVX2 CPU.
        import simde_py

        define_macros.append(("GENFAST_EMULATE_AVX512", None))
        include_dirs.append(simde_py.get_include())
    if _want_cuda():
        archs = os.environ.get("GENFAST_CUDA_ARCHS", "80;90")
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        define_macros += [("GENFAST_WITH_CUDA", None), ("GENFAST_CUDA_ARCHS", f'"{archs}"')]
        return CUDAExtension(
            "genfast._C",
            sources,
            define_macros=define_macros,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", *_cuda_arch_flags()]},
            extra_link_args=["-fopenmp", *_shared_cxx_runtime()],
        )
    return CppExtension(
        "genfast._C",
        sources,
        define_macros=define_macros,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp", *_shared_cxx_runtime()],
    )


def _probe_extension():
    """genfast._probe: the benchmark's GEMM peak probe (csrc/probe/), a debug module apart from _C.

    It compiles genfast's packed GEMM again (csrc/probe/gemm_copy.cpp includes csrc/cpu/gemm.cpp),
    with hidden symbols so that its copies never bind to genfast._C's. CPU only.
    """
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    return CppExtension(
        "genfast._probe",
        rel("csrc/probe/*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                                    "-fvisibility=hidden", "-DGENFAST_BUILD"]},
        extra_link_args=["-fopenmp", *_shared_cxx_runtime()],
    )


setup(
    # Every package under genfast/ (found, so a new subpackage can't be left out of a wheel).
    packages=find_packages(include=["genfast", "genfast.*"]) + ["genfast.kernels"],
    # Triton kernels live at the top level (kernels/) but install as genfast.kernels.
    package_dir={"genfast": "genfast", "genfast.kernels": "kernels"},
    ext_modules=[_extension(), _probe_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
