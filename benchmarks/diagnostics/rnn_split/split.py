"""CPU time per call (process_time, robust to other processes) of: genfast forward(train) op, genfast backward op,
torch.nn forward (grad on), torch.nn forward+backward. Alternating, best and median of R rounds.
python split.py T N I H threads [rounds] [cell]"""
import sys, time, statistics, torch
import genfast, genfast.nn
T, N, I, H, threads = map(int, sys.argv[1:6]); R = int(sys.argv[6]) if len(sys.argv) > 6 else 7
cellname = sys.argv[7] if len(sys.argv) > 7 else "lstm"
torch.set_num_threads(threads); torch.manual_seed(0)
lstm = cellname == "lstm"
m = (torch.nn.LSTM if lstm else torch.nn.GRU)(I, H)
x = torch.randn(T, N, I)
st = (torch.randn(1, N, H), torch.randn(1, N, H)) if lstm else torch.randn(1, N, H)
ops = torch.ops.genfast
w = [getattr(m, f"{n}_l0").detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
h0 = st[0][0] if lstm else st[0]
def gf(): return ops.lstm_forward(x, h0, st[1][0], w[0], w[1], w[2], w[3], None, None, False, True) if lstm else ops.gru_forward(x, h0, w[0], w[1], w[2], w[3], None, False, True)
fw = gf(); go = torch.ones(T, N, H); z = torch.zeros(N, H)
def gb():
    if lstm: return ops.lstm_backward(go, z, z, x, h0, st[1][0], w[0], w[1], None, fw[0], fw[3], None, False)
    return ops.gru_backward(go, z, x, h0, w[0], w[1], fw[0], fw[2], None, False)
def tf():
    o, _ = m(x, st); return o
def tfb():
    o, _ = m(x, st); o.backward(go)
g = (genfast.nn.LSTM if lstm else genfast.nn.GRU).from_torch(m)
def gfb():
    o, _ = g(x, st); o.backward(go)
fns = {"genfast fwd(train) op": gf, "genfast bwd op": gb, "genfast module fwd+bwd": gfb, "torch fwd (grad)": tf, "torch fwd+bwd": tfb}
for f in fns.values(): f(); f()
flop = 2 * T * N * (4 if lstm else 3) * H * (I + H)
inner = max(1, int(2e8 / flop))
samples = {k: [] for k in fns}
for r in range(R):
    for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        c0 = time.process_time()
        for _ in range(inner): fns[k]()
        samples[k].append((time.process_time() - c0) / inner * 1e3)
for k, v in samples.items():
    print(f"{k:26s} best {min(v):8.3f} ms  median {statistics.median(v):8.3f} ms")
b = {k: min(v) for k, v in samples.items()}
print(f"torch bwd = {b['torch fwd+bwd'] - b['torch fwd (grad)']:.3f} ms; fwd ratio torch/genfast {b['torch fwd (grad)']/b['genfast fwd(train) op']:.3f}; bwd ratio {(b['torch fwd+bwd'] - b['torch fwd (grad)'])/b['genfast bwd op']:.3f}; train ratio {b['torch fwd+bwd']/b['genfast module fwd+bwd']:.3f}")
