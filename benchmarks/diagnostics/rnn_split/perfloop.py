"""perf profile of one LSTM/GRU layer's step (after warm-up, by CPU time):
python perfloop.py which T N I H threads cpu_seconds mode cell out.data"""
import os, signal, subprocess, sys, time, torch
import genfast, genfast.nn
which, T, N, I, H, threads, secs = sys.argv[1], *map(int, sys.argv[2:7]), float(sys.argv[7])
mode, cellname, out = sys.argv[8], sys.argv[9], sys.argv[10]
torch.set_num_threads(threads); torch.manual_seed(0)
m = (torch.nn.LSTM if cellname == "lstm" else torch.nn.GRU)(I, H)
mod = m if which == "torch" else (genfast.nn.LSTM if cellname == "lstm" else genfast.nn.GRU).from_torch(m)
x = torch.randn(T, N, I)
st = (torch.randn(1, N, H), torch.randn(1, N, H)) if cellname == "lstm" else torch.randn(1, N, H)
def step():
    with torch.set_grad_enabled(mode == "training"):
        o, _ = mod(x, st)
        if mode == "training":
            o.sum().backward()
for _ in range(3): step()
perf = subprocess.Popen(["perf", "record", "-q", "-F", "1999", "-g", "-o", out, "-p", str(os.getpid())],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1.0)
cpu0 = time.process_time(); n = 0; t0 = time.perf_counter()
while time.process_time() - cpu0 < secs:
    step(); n += 1
cpu = (time.process_time() - cpu0) / n; wall = (time.perf_counter() - t0) / n
perf.send_signal(signal.SIGINT); perf.wait()
print(f"{which} {cellname} {mode} T={T} N={N} I={I} H={H} threads={threads}: {n} calls, {cpu*1e3:.2f} ms cpu/call, {wall*1e3:.2f} ms wall/call")
