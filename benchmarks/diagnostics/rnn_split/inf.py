"""CPU-time inference ratio torch/genfast, alternating: python inf.py T N H threads R [cell]"""
import sys, time, statistics, torch
import genfast.nn
T, N, H, threads, R = map(int, sys.argv[1:6]); cell = sys.argv[6] if len(sys.argv) > 6 else "lstm"; I = int(sys.argv[7]) if len(sys.argv) > 7 else H
torch.set_num_threads(threads); torch.manual_seed(0)
m = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(I, H); g = (genfast.nn.LSTM if cell == "lstm" else genfast.nn.GRU).from_torch(m)
x = torch.randn(T, N, I); st = (torch.randn(1, N, H), torch.randn(1, N, H)) if cell == "lstm" else torch.randn(1, N, H)
fns = {"genfast": lambda: g(x, st), "torch": lambda: m(x, st)}
t = {k: [] for k in fns}
with torch.no_grad():
    for f in fns.values(): f(); f()
    for r in range(R):
        for k in (("genfast", "torch") if r % 2 == 0 else ("torch", "genfast")):
            c0 = time.process_time(); fns[k](); t[k].append(time.process_time() - c0)
rat = [b / a for a, b in zip(t["genfast"], t["torch"])]
print(f"{cell} inference T={T} N={N} I={I} H={H}: torch/genfast median {statistics.median(rat):.3f} best-vs-best {min(t['torch'])/min(t['genfast']):.3f} (genfast {min(t['genfast'])*1e3:.1f} ms)")
