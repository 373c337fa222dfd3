"""Attention's one route on CUDA, checked on the CPU under the Triton interpreter: the functions
registered as torch.ops.genfast.attention_forward / attention_backward's CUDA kernels
(genfast/ops/attention.py -> kernels/flash_attention.py) give what the C++ CPU kernels give on the
same inputs, with the op's argument order. The compiled path on a GPU, autograd included:
tests/test_generation_cuda.py::test_attention_forward_on_cuda_runs_the_triton_kernel_with_the_cpp_autograd.

Runs only in the Triton-interpreter process (TRITON_INTERPRET=1 set before the run, as the Makefile's
INTERPRETED_TESTS are); skipped in the main test process, so it never sets the variable itself.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels under the interpreter: TRITON_INTERPRET=1 python -m "
                                       "pytest tests/test_attention_triton_route.py")

if os.environ.get("TRITON_INTERPRET") == "1":
    from genfast.ops import attention


def _inputs(shape_q, shape_kv, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    return make(*shape_q), make(*shape_kv), make(*shape_kv), make(*shape_q)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape_q,shape_kv", [((1, 2, 17, 16), (1, 2, 17, 16)), ((2, 4, 9, 24), (2, 2, 20, 24))])
def test_cuda_kernels_match_the_cpu_op(dtype, tol, causal, shape_q, shape_kv):
    q, k, v, grad = _inputs(shape_q, shape_kv, dtype, seed=shape_q[2])
    scale = 0.3
    out, lse = attention.attention_forward_cuda(q, k, v, None, causal, scale)
    want_out, want_lse = torch.ops.genfast.attention_forward(q, k, v, None, causal, scale)
    torch.testing.assert_close(out, want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)
    grads = attention.attention_backward_cuda(grad, q, k, v, out, lse, None, causal, scale)
    want = torch.ops.genfast.attention_backward(grad, q, k, v, want_out, want_lse, None, causal, scale)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_cuda_kernels_are_registered_to_the_op():
    for name in ("attention_forward", "attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"genfast::{name}", "CUDA"), name


def test_a_mask_is_taken_by_the_cuda_kernels():
    # Masked calls run in the kernel now (tests/test_flash_attention_masks.py compares them with the CPU op in
    # detail); here: a bool mask hiding key 0 changes the output exactly as the CPU op's does.
    q, k, v, grad = _inputs((1, 1, 3, 16), (1, 1, 3, 16), torch.float64, seed=0)
    mask = torch.tensor([[False, True, True]]).expand(3, 3)
    out, lse = attention.attention_forward_cuda(q, k, v, mask, False, 1.0)
    want_out, want_lse = torch.ops.genfast.attention_forward(q, k, v, mask, False, 1.0)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    unmasked, _ = attention.attention_forward_cuda(q, k, v, None, False, 1.0)
    assert not torch.allclose(out, unmasked)
