"""perf profile of the LN (or plain) module's training step at a bench case's shape, steady state only:
    PYTHONPATH=<checkout> python perfloop.py ln|plain lstm|gru WORKLOAD cpu_seconds out.data
then: perf report -i out.data --no-children --sort symbol --stdio"""
import os
import signal
import subprocess
import sys
import time

import torch

from genfast.bench import cases, providers

which, cell, workload, secs, out = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
torch.set_num_threads(1)
(case,) = cases.cases("full", f"layernorm_{cell}.{workload}.training")
work = providers.WORKLOADS[case.kind](case, "cpu")
fn = providers.PROVIDERS["layernorm_rnn"]["genfast" if which == "ln" else "genfast_plain"].build(work)
for _ in range(3):
    fn()
perf = subprocess.Popen(["perf", "record", "-q", "-F", "2999", "-o", out, "-p", str(os.getpid())],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1.0)
cpu0, n = time.thread_time(), 0
while time.thread_time() - cpu0 < secs:
    fn()
    n += 1
cpu = (time.thread_time() - cpu0) / n
perf.send_signal(signal.SIGINT)
perf.wait()
print(f"{which} {cell} {workload}: {n} calls, {cpu * 1e3:.2f} ms CPU/call")
