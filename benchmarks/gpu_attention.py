"""genfast flash_attention (Triton) vs torch SDPA's flash backend on one CUDA GPU, bf16.

    python benchmarks/gpu_attention.py --out results/    # writes attention_gpu.json and attention_gpu.md

B=4, H=32, D in {64, 128}, N in {1k, 4k, 16k}, causal and not; forward and forward+backward, timed
with triton.testing.do_bench side by side in one run. FLOPs follow the FlashAttention papers: forward
4*B*H*N^2*D (halved when causal), backward 2.5x the forward. Results are appended case by case, so a
run cut short still leaves what it measured. The first call of each case autotunes (not timed; its
wall time is reported as tune_s).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from genfast.kernels.flash_attention import flash_attention


def _flops(batch, heads, seqlen, head_dim, causal, with_backward):
    forward = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    return forward * (3.5 if with_backward else 1.0)


def _providers(causal):
    def ours(q, k, v):
        return flash_attention(q, k, v, causal=causal)

    def torch_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return {"genfast_triton": ours, "torch_sdpa_flash": torch_flash}


def _time_case(fn, q, k, v, grad_out, with_backward):
    if with_backward:
        def step():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(grad_out)
    else:
        def step():
            with torch.no_grad():
                fn(q, k, v)
    started = time.perf_counter()
    step()  # autotunes on the first call of a shape
    torch.cuda.synchronize()
    tune_s = time.perf_counter() - started
    return do_bench(step, warmup=25, rep=100), tune_s


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for the result files")
    parser.add_argument("--seqlens", default="1024,4096,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_attention.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "attention_gpu.json")
    md_path = os.path.join(args.out, "attention_gpu.md")

    device_name = torch.cuda.get_device_name()
    rows = []
    header = ("| D | N | causal | pass | genfast ms | SDPA flash ms | genfast TFLOP/s | SDPA TFLOP/s "
              "| ratio (SDPA time / genfast time) | max abs diff | tune s |")
    with open(md_path, "w") as md:
        md.write(f"# flash_attention vs SDPA flash, bf16, B={args.batch}, H={args.heads}, {device_name}\n\n")
        md.write(f"torch {torch.__version__}\n\n{header}\n|{'---|' * 11}\n")

    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for seqlen in (int(n) for n in args.seqlens.split(",")):
            for causal in (False, True):
                generator = torch.Generator(device="cuda").manual_seed(0)
                shape = (args.batch, args.heads, seqlen, head_dim)
                q, k, v, grad_out = (torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)
                                     for _ in range(4))
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                providers = _providers(causal)
                with torch.no_grad():
                    diff = (providers["genfast_triton"](q, k, v).float()
                            - providers["torch_sdpa_flash"](q, k, v).float()).abs().max().item()
                for with_backward in (False, True):
                    timings = {name: _time_case(fn, q, k, v, grad_out, with_backward)
                               for name, fn in providers.items()}
                    flops = _flops(args.batch, args.heads, seqlen, head_dim, causal, with_backward)
                    ours_ms, tune_s = timings["genfast_triton"]
                    theirs_ms, _ = timings["torch_sdpa_flash"]
                    row = {
                        "device": device_name, "dtype": "bfloat16", "batch": args.batch, "heads": args.heads,
                        "head_dim": head_dim, "seqlen": seqlen, "causal": causal,
                        "pass": "fwd+bwd" if with_backward else "fwd",
                        "genfast_ms": ours_ms, "sdpa_flash_ms": theirs_ms,
                        "genfast_tflops": flops / ours_ms / 1e9, "sdpa_flash_tflops": flops / theirs_ms / 1e9,
                        "speed_ratio": theirs_ms / ours_ms, "max_abs_diff_fwd": diff, "tune_s": tune_s,
                    }
                    rows.append(row)
                    line = (f"| {head_dim} | {seqlen} | {causal} | {row['pass']} | {ours_ms:.3f} | {theirs_ms:.3f} "
                            f"| {row['genfast_tflops']:.1f} | {row['sdpa_flash_tflops']:.1f} "
                            f"| {row['speed_ratio']:.2f} | {diff:.2e} | {tune_s:.1f} |")
                    print(line, flush=True)
                    with open(md_path, "a") as md:
                        md.write(line + "\n")
                    with open(json_path, "w") as out:
                        json.dump(rows, out, indent=1)
                del q, k, v, grad_out
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
