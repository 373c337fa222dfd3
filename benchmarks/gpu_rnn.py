"""genfast's CUDA LSTM/GRU vs cuDNN (torch.nn) on one GPU, same weights and inputs, side by side in one run.

    python benchmarks/gpu_rnn.py --out results/     # prints the table, writes rnn_gpu.json

Cases: T=100, N=64, I=H=512 (inference, and a training step: forward + backward through the
input) in fp32 and bf16, and N=1 decode (one time step per call, state carried: the latency of
autoregressive generation). Median of per-call times taken with CUDA events. TF32 is off for both,
so fp32 means IEEE fp32 products on both sides. `--device cpu --smoke` runs the same code on the
CPU kernels at tiny sizes (a check of this script, not a benchmark).
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
from gpu_common import device_name, finish, median_ms, timer_for

import genfast.nn

def _modules(kind: str, size: int, device: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    theirs = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(size, size).to(device, dtype)
    ours_cls = genfast.nn.LSTM if kind == "lstm" else genfast.nn.GRU
    return {"torch": theirs, "genfast": ours_cls.from_torch(copy.deepcopy(theirs)).to(device, dtype)}


def sequence_case(timer, kind, device, dtype, steps, batch, size, repeats) -> dict:
    x = torch.randn(steps, batch, size, device=device, dtype=dtype)
    results = {}
    for name, module in _modules(kind, size, device, dtype).items():
        def inference():
            with torch.no_grad():
                module(x)

        def train_step():
            out, _ = module(x.detach().requires_grad_())
            out.sum().backward()

        results[name] = {"inference_ms": median_ms(timer, inference, 3, repeats),
                         "train_ms": median_ms(timer, train_step, 3, repeats)}
    return results


def decode_case(timer, kind, device, dtype, tokens, size, repeats) -> dict:
    x = torch.randn(tokens, 1, 1, size, device=device, dtype=dtype)
    results = {}
    for name, module in _modules(kind, size, device, dtype).items():
        def decode():
            with torch.no_grad():
                state = None
                for t in range(tokens):
                    _, state = module(x[t], state)

        results[name] = {"decode_ms_per_token": median_ms(timer, decode, 1, max(3, repeats // 4)) / tokens}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for rnn_gpu.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    timer = timer_for(args.device)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    steps, batch, size, tokens, repeats = (5, 4, 32, 5, 4) if args.smoke else (100, 64, 512, 100, 20)

    report = {"device": device_name(args.device), "torch": torch.__version__, "cases": []}
    rows = []
    for kind in ("lstm", "gru"):
        for dtype in (torch.float32, torch.bfloat16):
            label = str(dtype).removeprefix("torch.")
            cases = ((f"T={steps} N={batch} I=H={size}",
                      lambda: sequence_case(timer, kind, args.device, dtype, steps, batch, size, repeats)),
                     (f"decode N=1 H={size}",
                      lambda: decode_case(timer, kind, args.device, dtype, tokens, size, repeats)))
            for case_name, run in cases:
                try:
                    result = run()
                except Exception as err:  # report and go on: one failing case must not hide the rest
                    result = {"error": f"{type(err).__name__}: {err}"}
                report["cases"].append({"op": kind, "dtype": label, "case": case_name, "result": result})
                if "error" in result:
                    rows.append(f"{kind:4} {label:8} {case_name:20} ERROR {result['error']}")
                    continue
                for metric, base in result["torch"].items():
                    ours = result["genfast"][metric]
                    rows.append(f"{kind:4} {label:8} {case_name:20} {metric:20} torch {base:9.4f}  "
                                f"genfast {ours:9.4f}  speedup (torch/genfast) {base / ours:5.2f}x")
    return finish(f"device: {report['device']}   torch {torch.__version__}   (median ms; torch = cuDNN on CUDA)",
                  rows, report, args.out, "rnn_gpu.json")


if __name__ == "__main__":
    raise SystemExit(main())
