"""The CPU kernels' cache of large buffers (csrc/cpu/memory.h, BufferCache).

Buffers of 1 MB and more are reused from one call to the next, so a kernel that read memory it
had not written would now see the previous call's numbers instead of fresh zeroed pages: the
parity checks below run every configuration twice in a row, each time against torch.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import genfast
import genfast.nn as gnn
from genfast import _extension
from tests.rnn_cells import GRU, LSTM, assert_same, clone_module, packed_input, padded_input, run_both

_C = _extension.load()


@pytest.mark.parametrize("cell,kwargs", [
    (LSTM, dict(num_layers=2, bidirectional=True)),
    (LSTM, dict(proj_size=24)),
    (GRU, dict(num_layers=2)),
], ids=["lstm-bidirectional", "lstm-projection", "gru-two-layers"])
def test_repeated_training_steps_on_recycled_buffers_match_torch(cell, kwargs):
    torch.manual_seed(0)
    ref = cell.torch_module(64, 96, **kwargs)
    mine = clone_module(ref, cell.module)
    for step in range(3):  # T*N = 1600 rows: workspaces and gate gradients of 1-4 MB each
        x = torch.randn(50, 32, 64)
        assert_same(run_both(ref, mine, padded_input(x)), torch.float32)
    assert _C.cpu_cache_bytes() > 0


def test_packed_sequences_of_changing_lengths_reuse_buffers_correctly():
    torch.manual_seed(1)
    ref = torch.nn.LSTM(64, 128)
    mine = clone_module(ref, gnn.LSTM)
    for seed in range(3):  # different total lengths: cached blocks up to 2x the request are reused
        lengths = torch.randint(20, 61, (40,), generator=torch.Generator().manual_seed(seed)).tolist()
        assert_same(run_both(ref, mine, packed_input(lengths, 64, torch.float32, False, seed=seed)),
                    torch.float32)


def test_empty_cache_frees_and_info_reports():
    mine = gnn.GRU(64, 128)
    mine(torch.randn(60, 32, 64))[0].sum().backward()
    assert _C.cpu_cache_bytes() > 0
    assert "MB held" in genfast.info(print_it=False)["cpu_buffer_cache"]
    genfast.empty_cache()
    assert _C.cpu_cache_bytes() == 0


def test_cached_gradients_stay_resizable():
    x = torch.randn(60, 32, 256, requires_grad=True)
    gnn.LSTM(256, 128)(x)[0].sum().backward()  # x.grad is 1.9 MB: a cached buffer
    grad = x.grad
    grad.resize_(70, 32, 256)
    grad[60:] = 1.0
    assert grad.shape == (70, 32, 256) and bool((grad[60:] == 1.0).all())


def test_cache_limit_zero_turns_it_off():
    code = ("import torch, genfast, genfast.nn as gnn; from genfast import _extension;"
            "gnn.LSTM(64, 128)(torch.randn(60, 32, 64))[0].sum().backward();"
            "C = _extension.load(); print(C.cpu_cache_limit_bytes(), C.cpu_cache_bytes(),"
            " genfast.info(print_it=False)['cpu_buffer_cache'])")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, GENFAST_CPU_CACHE_MB="0"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["0", "0"] and "off" in done.stdout
