"""genfast's generation path on one GPU, side by side with PyTorch in one run.

    python benchmarks/gpu_generation.py --out results/    # prints the table, writes generation_gpu.json

1. The Triton ops: decode_attention (split-KV flash-decoding over the KV cache) against the plain
   PyTorch reference and torch SDPA, and sampling_draw (temperature/top-k/top-p + draw) against the
   unfused reference. Median of per-call CUDA-event times.
   decode_attention is also timed through the Triton launcher directly ("launcher"), which shows
   what the torch.ops dispatch to a Python kernel adds per call.
2. GPT-2 124M (random weights, transformers' GPT-2 initialisation), greedy, 16-token prompt,
   128 new tokens, batch 1: genfast.models.gpt2 against transformers' generate on the same weights,
   fp32 (TF32 off) and bf16; best of 3 after a warm-up; whether the tokens are identical. genfast
   runs its default (the decode step as a CUDA graph) and, as "eager", one launch per kernel.
`--device cpu --smoke` runs the same code at tiny sizes on the CPU ops (a check of this script).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
from gpu_common import device_name, finish, median_ms, timer_for

import genfast.ops  # noqa: F401  (registers the genfast ops and their CUDA kernels)
from genfast import reference
from genfast.kernels import load


def _record(rows, report, timer, op, case, providers):
    try:
        result = {name: median_ms(timer, fn, 5, 30) for name, fn in providers.items()}
    except Exception as err:  # one failing case must not hide the rest
        result = {"error": f"{type(err).__name__}: {err}"}
    report["ops"].append({"op": op, "case": case, "ms": result})
    if "error" in result:
        rows.append(f"{op:16} {case:36} ERROR {result['error']}")
        return
    rows.append(f"{op:16} {case:36} " + "  ".join(f"{k} {v:8.4f}" for k, v in result.items())
                + f"  speedup (reference/genfast) {result['reference'] / result['genfast']:6.2f}x")


def op_cases(rows, report, timer, device, smoke):
    launcher = load("decode_attention", "decode_attention").decode_attention if device == "cuda" else None
    sampling = load("sampling", "sampling") if device == "cuda" else None
    attention_shapes = ([(1, 4, 2, 16, 100)] if smoke else
                        [(1, 12, 12, 64, 1024), (1, 12, 12, 64, 16384), (8, 32, 8, 128, 4096), (1, 32, 8, 128, 32768)])
    dtypes = (torch.float32,) if smoke else (torch.float16, torch.float32)
    for dtype in dtypes:
        for batch, heads_q, heads_kv, dim, length in attention_shapes:
            q = torch.randn(batch, heads_q, dim, device=device, dtype=dtype)
            k = torch.randn(batch, heads_kv, length, dim, device=device, dtype=dtype)
            v = torch.randn_like(k)
            scale = 1 / math.sqrt(dim)
            _record(rows, report, timer, "decode_attention",
                    f"{str(dtype)[6:]} B{batch} H{heads_q}/{heads_kv} D{dim} L{length}", {
                        "genfast": lambda: torch.ops.genfast.decode_attention(q, k, v, length, scale),
                        "reference": lambda: reference.attention(q[:, :, None], k, v, scale=scale, enable_gqa=True),
                        "torch_sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                            q[:, :, None], k, v, scale=scale, enable_gqa=heads_q != heads_kv),
                        **({"launcher": lambda: launcher(q, k, v, length, scale)} if launcher else {}),
                    })
    for batch, vocab in ([(1, 1000)] if smoke else [(1, 50257), (32, 50257), (1, 151936)]):
        logits = torch.randn(batch, vocab, device=device) * 3
        uniforms = torch.rand(batch, device=device, dtype=torch.float64)
        for settings in [(0.8, 0, 1.0), (1.0, 50, 0.9), (1.0, 0, 0.9)]:
            # With top-k on a GPU the op runs the kernels on the top-k candidates; "whole_row" is the
            # same op with the kernels on the whole vocabulary (what it did before).
            whole_row = ({"whole_row": lambda: sampling.sampling_draw(logits, uniforms, *settings, candidates=False)}
                         if sampling is not None and settings[1] > 0 else {})
            _record(rows, report, timer, "sampling_draw", f"B{batch} V{vocab} t/k/p={settings}", {
                "genfast": lambda: torch.ops.genfast.sampling_draw(logits, uniforms, *settings),
                "reference": lambda: reference.draw_from_scores(reference.process_logits(logits, *settings),
                                                                uniforms),
                **whole_row,
            })


def sampling_sweep(rows, report, timer, device):
    """Diagnostic: sampling_draw's time against its tile (tokens per iteration) and warps per program.
    One program walks a row in ~17 sequential passes; if the time falls with bigger tiles, the kernel
    waits on memory latency rather than on arithmetic."""
    sampling = load("sampling", "sampling")
    logits = torch.randn(1, 50257, device=device) * 3
    uniforms = torch.rand(1, device=device, dtype=torch.float64)
    default_warps = sampling._NUM_WARPS
    try:
        for settings in [(1.0, 50, 0.9)]:
            for warps in (4, 8, 16):
                for block in (256, 512, 1024, 2048):
                    sampling._NUM_WARPS = warps
                    try:
                        ms = median_ms(timer, lambda: sampling.sampling_draw(logits, uniforms, *settings, block=block),
                                       3, 15)
                    except Exception as err:  # e.g. out of registers or shared memory
                        ms = f"{type(err).__name__}"
                    report["sampling_sweep"].append({"settings": settings, "warps": warps, "block": block, "ms": ms})
                    rows.append(f"sampling sweep   B1 V50257 t/k/p={settings} warps {warps:2} block {block:4}: "
                                + (f"{ms:8.4f} ms" if isinstance(ms, float) else ms))
    finally:
        sampling._NUM_WARPS = default_warps


def _best_seconds(fn, device, repeats=3):
    fn()  # warm-up: compiles, allocator, cuBLAS handles
    best, result = math.inf, None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def gpt2_cases(rows, report, device, smoke):
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    from genfast.models.gpt2 import GPT2

    overrides = dict(n_layer=2, n_embd=64, n_head=4) if smoke else {}
    prompt_len, new_tokens = (4, 8) if smoke else (16, 128)
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype)[6:]
        try:
            torch.manual_seed(0)
            hf = GPT2LMHeadModel(HFConfig(**overrides)).eval()
            hf.generation_config.eos_token_id = None  # run all new_tokens
            hf.generation_config.pad_token_id = None
            ours = GPT2.from_hf(hf).to(device, dtype)
            hf = hf.to(device, dtype)
            prompt = torch.randint(0, hf.config.vocab_size, (1, prompt_len),
                                   generator=torch.Generator().manual_seed(0)).to(device)
            ours_s, ours_tokens = _best_seconds(lambda: ours.generate(prompt, new_tokens), device)
            eager_s, eager_tokens = _best_seconds(lambda: ours.generate(prompt, new_tokens, cuda_graph=False),
                                                  device) if device == "cuda" else (None, None)
            with torch.inference_mode():
                hf_s, hf_tokens = _best_seconds(lambda: hf.generate(
                    prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False), device)
            result = {"genfast_tokens_per_s": new_tokens / ours_s, "hf_tokens_per_s": new_tokens / hf_s,
                      "speedup": hf_s / ours_s, "identical_tokens": bool(torch.equal(ours_tokens, hf_tokens)),
                      "first_difference": _first_difference(ours_tokens, hf_tokens, prompt_len)}
            if eager_s is not None:  # CUDA: the same generate without the CUDA graph
                result.update(eager_tokens_per_s=new_tokens / eager_s, eager_speedup=hf_s / eager_s,
                              eager_identical_tokens=bool(torch.equal(eager_tokens, hf_tokens)))
            rows.append(f"gpt2 greedy      {label:8} {prompt_len}+{new_tokens} tokens  genfast "
                        f"{result['genfast_tokens_per_s']:7.1f} tok/s  transformers {result['hf_tokens_per_s']:7.1f} "
                        f"tok/s  speedup {result['speedup']:5.2f}x  identical tokens {result['identical_tokens']}"
                        + ("" if result["identical_tokens"] else f" (first difference at new token "
                                                                  f"{result['first_difference']})")
                        + ("" if eager_s is None else
                           f"\n                 {'':8} eager (no CUDA graph): {result['eager_tokens_per_s']:7.1f} "
                           f"tok/s  speedup {result['eager_speedup']:5.2f}x  identical tokens "
                           f"{result['eager_identical_tokens']}"))
        except Exception as err:  # report and go on
            result = {"error": f"{type(err).__name__}: {err}"}
            rows.append(f"gpt2 greedy      {label:8} ERROR {result['error']}")
        report["gpt2"].append({"dtype": label, **result})


def _first_difference(a, b, prompt_len):
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    differs = (a != b).any(dim=0).nonzero()
    return None if differs.numel() == 0 else int(differs[0]) - prompt_len


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for generation_gpu.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--skip-gpt2", action="store_true")
    parser.add_argument("--sampling-sweep", action="store_true",
                        help="only the diagnostic sweep of sampling_draw's tile size and warps (CUDA)")
    args = parser.parse_args()
    timer = timer_for(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    report = {"device": device_name(args.device), "torch": torch.__version__, "ops": [], "gpt2": [],
              "sampling_sweep": []}
    rows: list[str] = []
    if args.sampling_sweep:
        sampling_sweep(rows, report, timer, args.device)
        return finish(f"device: {report['device']}   torch {torch.__version__}   (diagnostic sweep, median ms)",
                      rows, report, args.out, "sampling_sweep_gpu.json")
    op_cases(rows, report, timer, args.device, args.smoke)
    if not args.skip_gpt2:
        gpt2_cases(rows, report, args.device, args.smoke)
    return finish(f"device: {report['device']}   torch {torch.__version__}   (ops: median ms; lower is better)",
                  rows, report, args.out, "generation_gpu.json")


if __name__ == "__main__":
    raise SystemExit(main())
