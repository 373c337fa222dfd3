import os, signal, subprocess, sys, time, torch
import genfast, genfast.nn
T, N, I, H, secs = *map(int, sys.argv[1:5]), float(sys.argv[5]); out = sys.argv[6]
torch.set_num_threads(1); torch.manual_seed(0)
m = torch.nn.LSTM(I, H); x = torch.randn(T, N, I); h0 = torch.randn(N, H); c0 = torch.randn(N, H)
w = [getattr(m, f"{n}_l0").detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
ops = torch.ops.genfast
fw = ops.lstm_forward(x, h0, c0, w[0], w[1], w[2], w[3], None, None, False, True)
go = torch.ones(T, N, H); z = torch.zeros(N, H)
gb = lambda: ops.lstm_backward(go, z, z, x, h0, c0, w[0], w[1], None, fw[0], fw[3], None, False)
gb(); gb()
perf = subprocess.Popen(["perf", "record", "-q", "-F", "1999", "-o", out, "-p", str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1.0); c = time.process_time(); n = 0
while time.process_time() - c < secs: gb(); n += 1
print(f"bwd op {(time.process_time()-c)/n*1e3:.1f} ms cpu/call, {n} calls")
perf.send_signal(signal.SIGINT); perf.wait()
