"""GPT-2 text generation speed: genfast vs transformers' generate, same weights, one run.

    python -m genfast.bench.generation [--threads N] [--new-tokens 128] [--small]

Greedy decoding of a random-weight GPT-2 (GPT2Config() defaults: the 124M shape) in fp32,
batch 1; both produce the same tokens (checked). Reports tokens/s, ms/token, and the
weight-streaming bandwidth the decode achieves (parameters x 4 bytes per token) next to
the machine's copy bandwidth, measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def copy_bandwidth_gbps(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes moved (read + write) per second by a large tensor copy, best of `repeats`, GB/s."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_generation_benchmark(prompt_len: int = 16, new_tokens: int = 128, config_overrides: dict | None = None,
                             num_threads: int | None = None, repeats: int = 2, seed: int = 0,
                             compare_hf: bool = True) -> dict:
    """Time greedy generation with genfast and (if installed and compare_hf) transformers.

    Returns a dict: tokens/s and ms/token of each, the speedup, parameter count, the
    achieved weight bandwidth of genfast's decode and the copy bandwidth, and whether
    the tokens were identical. Best of `repeats` runs each, after one warm-up.
    """
    try:
        from transformers import GPT2Config as HFConfig, GPT2LMHeadModel
    except ImportError as err:
        raise ImportError("the generation benchmark builds its model with transformers: "
                          "pip install -r requirements-dev.txt") from err

    from genfast.models.gpt2 import GPT2

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(HFConfig(**(config_overrides or {}))).eval()
        hf.generation_config.eos_token_id = None  # run all new_tokens
        hf.generation_config.pad_token_id = None
        ours = GPT2.from_hf(hf)
        params = sum(p.numel() for p in ours.parameters())
        prompt = torch.randint(0, hf.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))

        run_ours = lambda: ours.generate(prompt, new_tokens)
        run_ours()  # warm-up
        ours_s, ours_tokens = _best_time(run_ours, repeats)
        # Prefill alone, to separate the per-token decode cost.
        prefill_s, _ = _best_time(lambda: ours.generate(prompt, 1), repeats)
        decode_ms = (ours_s - prefill_s) / max(new_tokens - 1, 1) * 1e3
        result = {
            "threads": torch.get_num_threads(), "prompt_len": prompt_len, "new_tokens": new_tokens,
            "params": params, "weight_MB": params * 4 / 1e6,
            "genfast_tokens_per_s": new_tokens / ours_s, "genfast_ms_per_token": ours_s / new_tokens * 1e3,
            "genfast_decode_ms_per_token": decode_ms,
            "genfast_weight_GBps": params * 4 / (decode_ms / 1e3) / 1e9,
        }
        if compare_hf:
            with torch.inference_mode():
                run_hf = lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False)
                run_hf()
                hf_s, hf_tokens = _best_time(run_hf, repeats)
            result.update({
                "hf_tokens_per_s": new_tokens / hf_s, "hf_ms_per_token": hf_s / new_tokens * 1e3,
                "speedup": hf_s / ours_s, "identical_tokens": bool(torch.equal(hf_tokens, ours_tokens)),
            })
        result["copy_GBps_read_plus_write"] = copy_bandwidth_gbps()
        return result
    finally:
        torch.set_num_threads(previous_threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genfast.bench.generation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, torch.get_num_threads()])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="a 4-layer, 256-wide model (a quick smoke run)")
    args = parser.parse_args(argv)
    overrides = dict(n_layer=4, n_embd=256, n_head=4) if args.small else None
    for threads in dict.fromkeys(args.threads):
        result = run_generation_benchmark(args.prompt_len, args.new_tokens, overrides, threads, args.repeats)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
