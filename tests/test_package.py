"""The package itself: genfast.info(), the build layout, and the error when the extension is missing."""
import subprocess
import sys

import pytest

import genfast


def test_info_reports_backends():
    report = genfast.info(print_it=False)
    for key in ("genfast", "torch", "cpu_kernels", "cuda_kernels", "cuda_archs", "triton", "simd_level", "threads", "huge_pages",
                "cpu_buffer_cache"):
        assert key in report
    assert report["cpu_kernels"] is True
    assert report["simd_level"] in ("baseline", "avx2", "avx512")
    assert report["threads"] >= 1


def test_kernels_install_as_subpackage():
    import genfast.kernels

    assert genfast.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")


def test_missing_extension_raises_import_error_with_build_hint():
    # Simulate a checkout where genfast._C was never built: no silent fallback to torch.
    code = (
        "import sys; sys.modules['genfast._C'] = None\n"
        "import genfast\n"
        "assert genfast.info(print_it=False)['cpu_kernels'] is False\n"
        "try:\n"
        "    import genfast.nn\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('genfast.nn imported without its extension')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install --no-build-isolation" in done.stdout


def test_extension_links_the_shared_cxx_runtime():
    # setup.py names libstdc++.so.6 at link time: one GPU image's g++ linked the static libstdc++ into
    # genfast._C, whose private, uninitialised locale crashed every error message that formatted an
    # integer. The crash itself is covered by the bad-input tests; this says why, if it comes back.
    import shutil

    import genfast._C

    if shutil.which("readelf") is None or shutil.which("nm") is None:
        pytest.skip("needs binutils (readelf, nm)")
    dynamic = subprocess.run(["readelf", "-d", genfast._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, f"genfast._C does not load the shared libstdc++:\n{dynamic}"
    exported = subprocess.run(["nm", "-D", "--defined-only", genfast._C.__file__], capture_output=True,
                              text=True, check=True).stdout
    private_runtime = [line for line in exported.splitlines() if "_ZNSt6locale" in line]
    assert not private_runtime, f"genfast._C defines libstdc++'s locale itself: {private_runtime[:3]}"
