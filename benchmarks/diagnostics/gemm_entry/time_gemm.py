"""Times the GEMM candidates for genfast's non-fused products (ATen's mm, genfast's packed kernel with B
packed or in place, ATen's cpublas::brgemm); prints a markdown table (GFLOP/s, best of rounds).
The measurement behind the rule in csrc/cpu/gemm_entry.cpp (docs/performance.md, section 4.1).

    ROUNDS=3 THREADS=1 python benchmarks/diagnostics/gemm_entry/time_gemm.py
"""
import sys, time, itertools, os, tempfile
from pathlib import Path
import torch
from torch.utils.cpp_extension import load
HERE = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("GENFAST_ROOT", HERE.parents[2]))
BUILD = Path(tempfile.gettempdir()) / "genfast_gemm_entry_bench"
BUILD.mkdir(exist_ok=True)
mod = load("gemmbench", [str(HERE / "bench.cpp"), str(ROOT / "csrc/cpu/simd.cpp")],
           extra_include_paths=[str(ROOT / "csrc")],
           extra_cflags=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
           build_directory=str(BUILD), verbose=False)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
QUICK = os.environ.get("QUICK", "0") == "1"

def products(T, N, I, H, dtype):
    S = T * N
    g = torch.Generator().manual_seed(0)
    X = torch.randn(S, I, dtype=dtype, generator=g)
    W = torch.randn(4 * H, I, dtype=dtype, generator=g)
    dG = torch.randn(S, 4 * H, dtype=dtype, generator=g)
    h = torch.randn(S, H, dtype=dtype, generator=g)
    return {
        "proj X W^T": (X, W.t()),
        "dX dG W": (dG, W),
        "dW_ih dG^T X": (dG.t(), X),
        "dW_hh dG^T h": (dG.t(), h),
    }

def candidates(A, B, dtype):
    c = {"aten mm": lambda C: mod.aten_mm(C, A, B),
         "packed B packed": lambda C: mod.packed(C, A, B, False, 256, False)}
    if B.stride(1) == 1 and B.size(1) % (16 if dtype == torch.float32 else 8) == 0:
        c["packed B in place"] = lambda C: mod.packed(C, A, B, True, 256, False)
    if os.environ.get("KB0") == "1":
        c["packed B packed, K whole"] = lambda C: mod.packed(C, A, B, False, 0, False)
    if dtype == torch.float32:
        c["brgemm"] = lambda C: mod.brgemm(C, A, B, 96, 64, 256)
    return c

def time_one(fn, C, flops):
    fn(C)
    reps = max(1, int(0.05 / max(flops / 50e9, 1e-6)))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(C)
    return (time.perf_counter() - t0) / reps

def main():
    threads_list = [int(t) for t in os.environ.get("THREADS", "1,2").split(",")]
    shapes = [(100, n, i, i) for n in (1, 32, 64) for i in (64, 256, 512)] + [(100, 32, 256, 64)]
    if QUICK:
        shapes = [(100, 32, 256, 256), (100, 32, 256, 64)]
    dtypes = [torch.float32, torch.float64]
    if os.environ.get("DTYPES") == "f32": dtypes = [torch.float32]
    print(f"simd={mod.simd()} torch={torch.__version__}")
    for threads in threads_list:
        torch.set_num_threads(threads)
        for dtype in dtypes:
            for (T, N, I, H) in shapes:
                for name, (A, B) in products(T, N, I, H, dtype).items():
                    M, K = A.shape; Nn = B.shape[1]
                    flops = 2 * M * K * Nn
                    ref = (A.double() @ B.double())
                    cands = candidates(A, B, dtype)
                    best = {k: float("inf") for k in cands}
                    for _ in range(ROUNDS):
                        for k, fn in cands.items():
                            C = torch.empty(M, Nn, dtype=dtype)
                            best[k] = min(best[k], time_one(fn, C, flops))
                    for k, fn in cands.items():
                        C = torch.empty(M, Nn, dtype=dtype); fn(C)
                        err = ((C.double() - ref).abs().max() / ref.abs().max()).item()
                        assert err < (1e-5 if dtype == torch.float32 else 1e-12), (k, err)
                    gf = {k: flops / v / 1e9 for k, v in best.items()}
                    win = max(gf, key=gf.get)
                    row = " ".join(f"{k}={v:.0f}" for k, v in gf.items())
                    print(f"| {threads} | {str(dtype)[6:]} | T{T} N{N} I{I} H{H} | {name} | {M}x{K}x{Nn} | {row} | **{win}** |", flush=True)

main()
