"""The core (genfast.nn, genfast.ops, the RNN and attention C++) imports and includes nothing from
generation (genfast.generation, csrc/generation/), and generation's schemas stay out of the core's
registration. Checked on the source text, and on what importing the core actually loads."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_PYTHON = [ROOT / "genfast" / "nn", ROOT / "genfast" / "ops"]
CORE_MODULES = [ROOT / "genfast" / name for name in ("__init__.py", "_extension.py", "_info.py", "reference.py")]
GENERATION_OPS = ("sampling_filter", "sampling_draw", "decode_attention", "decode_linear", "gpt2_decode_block")


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _core_python_files() -> list[Path]:
    files = [p for folder in CORE_PYTHON for p in sorted(folder.rglob("*.py"))] + CORE_MODULES
    assert len(files) > 6, files  # the scan found the core
    return files


def test_core_python_imports_nothing_from_generation():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p)
                                                   if m.startswith(("genfast.generation", "genfast.models")))
                 for p in _core_python_files()}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_scan_sees_an_import_from_generation(tmp_path):
    # The check above can fail: a core-like file importing generation is caught (both import forms).
    sample = tmp_path / "sample.py"
    sample.write_text("import genfast.generation.gpt2\nfrom genfast.generation import sampling\n")
    assert {"genfast.generation.gpt2", "genfast.generation"} <= _imported_modules(sample)


def test_importing_the_core_loads_no_generation_module():
    code = ("import sys, genfast, genfast.nn, genfast.ops, genfast.nn.functional, genfast.ops.attention\n"
            "print(sorted(m for m in sys.modules if m.startswith('genfast.generation')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _includes(path: Path) -> list[str]:
    return re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), flags=re.M)


def test_core_cpp_includes_nothing_from_generation():
    sources = [p for p in sorted((ROOT / "csrc").rglob("*"))
               if p.suffix in {".cpp", ".h", ".cu", ".cuh", ".inc"} and "generation" not in p.relative_to(ROOT).parts]
    assert any(p.name == "registration.cpp" for p in sources)
    offenders = {str(p.relative_to(ROOT)): [i for i in _includes(p) if i.startswith("generation/")] for p in sources}
    assert not {k: v for k, v in offenders.items() if v}


def test_generation_schemas_are_declared_apart_from_the_core():
    core = (ROOT / "csrc" / "registration.cpp").read_text()
    generation = (ROOT / "csrc" / "generation" / "registration.cpp").read_text()
    assert "TORCH_LIBRARY(genfast" in core and "TORCH_LIBRARY_FRAGMENT(genfast" in generation
    for op in GENERATION_OPS:
        assert f'"{op}(' not in core, op
        assert f'"{op}(' in generation, op


def test_generation_kernels_live_in_their_own_folder():
    names = {p.stem for p in (ROOT / "csrc" / "cpu").glob("*.cpp")}
    assert not names & {"sampling", "decode_attention", "decode_linear", "gpt2_decode"}
    assert {p.stem for p in (ROOT / "csrc" / "generation").glob("*.cpp")} >= {
        "registration", "sampling", "decode_attention", "decode_linear", "gpt2_decode"}
