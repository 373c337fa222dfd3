"""The AVX-512 copies of the CPU kernels, run on a CPU without AVX-512.

Every CPU kernel has a copy per SIMD level (csrc/cpu/simd.h), chosen from CPUID at run
time. On an AVX2 machine the AVX-512 copies never run, yet they differ from the AVX2
ones in more than instruction encoding: 64-byte vectors, 12-row GEMM tiles, 16-lane
softmax loops and __m512 intrinsics. This module builds genfast a second time with
GENFAST_EMULATE_AVX512=1 (setup.py): the AVX-512 copies keep all of that but are
compiled for AVX2, GCC splitting the wide vectors and SIMDe (the simde-py package)
implementing the _mm512_* intrinsics. Then it runs the kernel test files against that
build in a subprocess (a second genfast._C cannot be loaded into this process: both
register the `genfast` op namespace).

The build is cached under build/avx512-emulated/ (ninja rebuilds what changed); the
first one takes about two minutes on two cores.
"""
from __future__ import annotations

import os
import pathlib
import platform
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "avx512-emulated"
# The test files that exercise CPU kernels with a per-ISA copy (GEMM tiles, gate loops,
# attention softmax, decode dot products, sampling).
KERNEL_TEST_FILES = [
    "test_rnn.py",
    "test_attention.py",
    "test_attention_varlen.py",
    "test_decode_attention.py",
    "test_decode_linear.py",
    "test_sampling.py",
    "test_gpt2_decode.py",
    "test_buffer_cache.py",
]


def _cpu_has_avx2() -> bool:
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _require_simde() -> None:
    try:
        import simde_py  # noqa: F401
    except ImportError:
        message = "simde-py is not installed (pip install -r requirements-dev.txt)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run the AVX-512 copies")
        pytest.skip(message)


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 SIMD copies only"),
    pytest.mark.skipif(not _cpu_has_avx2(), reason="the emulated AVX-512 copies need AVX2 + FMA"),
]


def _build() -> pathlib.Path:
    env = dict(os.environ, GENFAST_EMULATE_AVX512="1", GENFAST_NO_CUDA="1")
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(BUILD / "lib"), "--build-temp",
           str(BUILD / "temp")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"emulated AVX-512 build failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    built = sorted((BUILD / "lib" / "genfast").glob("_C*.so"))
    assert len(built) == 1, built
    return built[0]


@pytest.fixture(scope="module")
def emulated_tree(tmp_path_factory) -> pathlib.Path:
    """A copy of the package and tests whose genfast._C is the emulated-AVX-512 build."""
    _require_simde()
    library = _build()
    tree = tmp_path_factory.mktemp("avx512-emulated")
    ignore = shutil.ignore_patterns("_C*.so", "_probe*.so", "__pycache__")
    # genfast/kernels may be a link to kernels/ in a development checkout: the copy below replaces it.
    shutil.copytree(ROOT / "genfast", tree / "genfast", ignore=shutil.ignore_patterns("_C*.so", "_probe*.so",
                                                                                        "__pycache__", "kernels"))
    shutil.copytree(ROOT / "kernels", tree / "genfast" / "kernels", ignore=ignore)  # as installed
    shutil.copytree(ROOT / "tests", tree / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")  # pytest markers
    shutil.copy(library, tree / "genfast" / library.name)
    return tree


def _run(tree: pathlib.Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GENFAST_SIMD", "PYTHONPATH")}
    # Run from the tree: `-c` and `-m` put the working directory first on sys.path, so its
    # genfast is imported, not an installed or editable one (the first test checks).
    return subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=1200)


def test_emulated_build_dispatches_to_its_avx512_copies(emulated_tree):
    code = "import torch, genfast, genfast._C as C; print(genfast.__file__, C.simd_level())"
    done = _run(emulated_tree, ["-c", code])
    assert done.returncode == 0, done.stderr
    path, level = done.stdout.split()
    assert pathlib.Path(path).is_relative_to(emulated_tree)
    assert level == "avx512-emulated"


@pytest.mark.parametrize("test_file", KERNEL_TEST_FILES)
def test_kernel_tests_pass_on_the_avx512_copies(emulated_tree, test_file):
    done = _run(emulated_tree, ["-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/{test_file}"])
    tail = (done.stdout + done.stderr)[-8000:]
    assert done.returncode == 0, f"{test_file} under emulated AVX-512:\n{tail}"
    assert " passed" in done.stdout, tail
