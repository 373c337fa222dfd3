"""The Triton flash-attention kernels on the compiled (non-interpreted) path.

Must run WITHOUT TRITON_INTERPRET (the Makefile's main pytest process). Most tests need a CUDA GPU
and are skipped without one; the first call of each shape autotunes, so shapes are few and shared.
test_kernels_compile_for_ampere_and_hopper needs no GPU: it compiles the kernels ahead of time for
sm80 and sm90 with the ptxas that ships in the triton wheel, so CI catches GPU-only compile errors
that the interpreter cannot see.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 is set; these tests check the compiled "
                                                    "kernels (run them in a process without it)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

if not INTERPRETED:
    import triton
    import triton.language as tl

    from genfast import reference
    from genfast.kernels import flash_attention as flash_module
    from tests import flash_kernels
    from tests.flash_kernels import flash_attention
    from tests.sdpa_dispatch import TRITON_KERNEL, expect_dispatch


def _inputs(batch, q_heads, kv_heads, len_q, len_k, head_dim, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, device="cuda", dtype=torch.float32).to(dtype)
    return (make(batch, q_heads, len_q, head_dim), make(batch, kv_heads, len_k, head_dim),
            make(batch, kv_heads, len_k, head_dim), make(batch, q_heads, len_q, head_dim))


def _output_and_grads(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]


def _fp32_reference(q, k, v, grad_out, causal):
    # IEEE fp32 matmuls (no TF32) so the reference is a reference.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _output_and_grads(lambda a, b, c: reference.attention(a, b, c, is_causal=causal, enable_gqa=True),
                                 q.float(), k.float(), v.float(), grad_out.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# (batch, q heads, kv heads, Lq, Lk, head dim)
LOW_PRECISION_SHAPES = [
    (2, 4, 4, 1000, 1000, 64),
    (2, 4, 2, 513, 1000, 128),    # GQA, Lq != Lk, odd lengths
    (1, 4, 4, 257, 300, 80),      # non-power-of-two head dim
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", LOW_PRECISION_SHAPES)
def test_low_precision_error_at_most_twice_torch_sdpa(shape, causal, dtype):
    # FlashAttention-2's acceptance rule: against an fp32 reference on the same rounded inputs, the
    # kernel's error may be at most twice PyTorch's own error in the same dtype (plus 1e-5 slack for
    # cases where both are ~0).
    q, k, v, grad_out = _inputs(*shape, dtype=dtype)
    causal_flag = causal
    ours = _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=causal_flag), q, k, v, grad_out)
    torchs = _output_and_grads(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal_flag, enable_gqa=True),
        q, k, v, grad_out)
    expected = _fp32_reference(q, k, v, grad_out, causal)
    for name, got, theirs, want in zip(("out", "dq", "dk", "dv"), ours, torchs, expected):
        our_error = (got - want).abs().max().item()
        torch_error = (theirs - want).abs().max().item()
        assert our_error <= 2 * torch_error + 1e-5, (
            f"{name}: flash_attention error {our_error:.3g} > 2 x SDPA error {torch_error:.3g}")


@requires_cuda
@pytest.mark.parametrize("len_q,len_k,head_dim,causal", [
    (1, 1, 16, True), (17, 130, 24, True), (130, 17, 256, True), (1000, 1000, 112, False)])
def test_fp32_matches_float64_reference(len_q, len_k, head_dim, causal):
    q, k, v, grad_out = _inputs(1, 4, 2, len_q, len_k, head_dim, dtype=torch.float32)
    ours = _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=causal), q, k, v, grad_out)
    expected = _output_and_grads(
        lambda a, b, c: reference.attention(a, b, c, is_causal=causal, enable_gqa=True),
        q.double(), k.double(), v.double(), grad_out.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        # IEEE fp32 products, fp32 accumulation over <= 1000 terms (x2 heads for dK/dV): rounding
        # ~sqrt(terms) * 6e-8 of the result's scale; 1e-4 leaves margin while catching any masking bug.
        tolerance = 1e-4 * max(1.0, want.abs().max().item())
        error = (got.double() - want.double()).abs().max().item()
        assert error <= tolerance, f"{name}: max error {error:.3g} > {tolerance:.3g}"


@requires_cuda
def test_compiled_kernels_run_not_the_interpreter():
    assert not flash_module._INTERPRETED
    q, k, v, grad_out = _inputs(1, 2, 2, 200, 200, 64, dtype=torch.bfloat16)
    _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=True), q, k, v, grad_out)
    # The autotuners picked a compiled configuration for each kernel (the interpreter has only one).
    for kernel in (flash_module._flash_attention_forward_kernel, flash_module._flash_attention_backward_dkdv_kernel,
                   flash_module._flash_attention_backward_dq_kernel):
        assert kernel.best_config is not None
        assert kernel.best_config.kwargs["BLOCK_M"] >= 64


@requires_cuda
def test_gradcheck_float64():
    q, k, v, _ = _inputs(1, 2, 1, 9, 13, 16, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, causal=True), (q, k, v),
                                    fast_mode=True)


@requires_cuda
def test_opcheck():
    q, k, v, grad_out = _inputs(1, 2, 1, 65, 33, 64, dtype=torch.float16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # The op whose CUDA kernels these are (tests/flash_kernels.py).
    forward_op, backward_op = flash_kernels.op(flash_kernels.OP_FORWARD), flash_kernels.op(flash_kernels.OP_BACKWARD)
    torch.library.opcheck(forward_op, flash_kernels.op_forward_args(q, k, v, True, 0.125))
    out, lse = forward_op(*flash_kernels.op_forward_args(q.detach(), k.detach(), v.detach(), True, 0.125))
    torch.library.opcheck(backward_op, flash_kernels.op_backward_args(grad_out, q.detach(), k.detach(), v.detach(),
                                                                      out, lse, True, 0.125))


@requires_cuda
def test_torch_compile_fullgraph_through_the_op():
    # torch.compile of the op whose CUDA kernels these are (its autograd included), against the kernels
    # run eagerly.
    q, k, v, grad_out = _inputs(2, 4, 2, 300, 300, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: flash_kernels.op_attention(a, b, c, True, 0.125) * 2.0, fullgraph=True)
    got = _output_and_grads(compiled, q, k, v, grad_out)
    want = _output_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=True, scale=0.125) * 2.0, q, k, v,
                             grad_out)
    for a, b in zip(got, want):
        # Same kernels, same tiles; only the fused "* 2.0" epilogue may round differently (1 bf16 ulp).
        torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)


def test_cpu_tensors_are_refused_with_a_clear_error():
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="q is on cpu"):
        flash_attention(q, q, q)


def _ahead_of_time_compile(kernel, capability, constants, num_warps, num_stages, scale_type="fp32",
                           mask_type="*u8"):
    from tests.triton_aot import compile_for

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    types = {}
    for name in fn.arg_names:
        if name in ("lse_ptr", "delta_ptr"):
            types[name] = "*fp32"
        elif name == "seed_ptr":
            types[name] = "*i64"
        elif name == "keep_ptr":
            types[name] = "*i8"
        elif name.startswith("cu_seqlens"):
            types[name] = "*i32"
        elif name == "mask_ptr":
            types[name] = mask_type
        elif name in ("dropout_p", "dropout_scale"):
            types[name] = "fp32"
        elif name.endswith("_ptr"):
            types[name] = "*bf16"
        elif name in ("scale", "qk_scale_log2"):
            types[name] = scale_type
        else:
            types[name] = "i32"
    return compile_for(kernel, capability, {n: t for n, t in types.items() if n not in constants}, constants,
                       num_warps=num_warps, num_stages=num_stages)


@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_ampere_and_hopper(capability):
    # bf16, head dim 80 (padded to 128), causal GQA, with a tile configuration from the autotune list.
    constants = dict(GROUP_SIZE=2, BLOCK_D=128, ACC_DTYPE=tl.float32, DOT_PRECISION="tf32",
                     UPCAST_BF16=False, BLOCK_M=128, BLOCK_N=64, **_PLAIN_CAUSAL)
    assert any(c.kwargs == {"BLOCK_M": 128, "BLOCK_N": 64} and c.num_warps == 8 and c.num_stages == 3
               for c in flash_module._CONFIGS)
    for kernel in (flash_module._flash_attention_forward_kernel, flash_module._flash_attention_backward_dkdv_kernel,
                   flash_module._flash_attention_backward_dq_kernel):
        compiled = _ahead_of_time_compile(kernel, capability, constants, num_warps=8, num_stages=3)
        assert compiled.asm["cubin"], kernel
        # Hopper's opt-in limit is 227 KB, Ampere's 163 KB: this configuration must fit both.
        assert compiled.metadata.shared <= 163 * 1024, (kernel, compiled.metadata.shared)
    preprocess = _ahead_of_time_compile(flash_module._flash_attention_backward_preprocess_kernel, capability,
                                        dict(BLOCK_D=128, ACC_DTYPE=tl.float32, BLOCK_M=64, VARLEN=False), 4, 1)
    assert preprocess.asm["cubin"]


# The masking flags of a plain causal call: a window with right bound 0, nothing else.
_PLAIN_CAUSAL = dict(HAS_LEFT=False, HAS_RIGHT=True, VARLEN=False, MASK_KIND=0, HAS_DROPOUT=False)


@pytest.mark.parametrize("features", [
    dict(HAS_LEFT=True, HAS_RIGHT=True, VARLEN=False, MASK_KIND=1, HAS_DROPOUT=True),   # bool mask, window, dropout
    dict(HAS_LEFT=False, HAS_RIGHT=False, VARLEN=False, MASK_KIND=2, HAS_DROPOUT=False),  # additive mask
    dict(HAS_LEFT=True, HAS_RIGHT=True, VARLEN=True, MASK_KIND=0, HAS_DROPOUT=True),    # packed, window, dropout
])
def test_masked_dropout_window_and_varlen_kernels_compile_for_hopper(features):
    # Every flag combination a call can set compiles for sm90 with a large autotune tile and fits in
    # Ampere's shared memory too (what the interpreter cannot check).
    constants = dict(GROUP_SIZE=2, BLOCK_D=64, ACC_DTYPE=tl.float32, DOT_PRECISION="tf32",
                     UPCAST_BF16=False, BLOCK_M=128, BLOCK_N=64, **features)
    mask_type = "*bf16" if features["MASK_KIND"] == 2 else "*u8"
    for kernel in (flash_module._flash_attention_forward_kernel, flash_module._flash_attention_backward_dkdv_kernel,
                   flash_module._flash_attention_backward_dq_kernel):
        compiled = _ahead_of_time_compile(kernel, 90, constants, num_warps=8, num_stages=3, mask_type=mask_type)
        assert compiled.asm["cubin"], kernel
        assert compiled.metadata.shared <= 163 * 1024, (kernel, compiled.metadata.shared)
    preprocess = _ahead_of_time_compile(flash_module._flash_attention_backward_preprocess_kernel, 90,
                                        dict(BLOCK_D=64, ACC_DTYPE=tl.float32, BLOCK_M=64,
                                             VARLEN=features["VARLEN"]), 4, 1)
    assert preprocess.asm["cubin"]
    rng = _ahead_of_time_compile(flash_module._dropout_mask_kernel, 90, dict(BLOCK_M=64, BLOCK_N=64), 4, 1)
    assert rng.asm["cubin"]


@pytest.mark.parametrize("scale_as", ["fp64", "constant"])
def test_kernels_compile_with_the_scale_as_torch_passes_it(scale_as):
    # Triton's launcher types a Python float argument as fp32. torch.compile (Inductor's user-defined
    # Triton kernel path) types it as fp64, and torch's mutation analysis of the kernel (opcheck's
    # aot_dispatch test) passes it as a constant Python float. The kernels must bring the scale to the
    # accumulator type in a way that takes all three: an fp64 scale must not promote the softmax and the
    # accumulator to fp64 (tl.dot refuses an fp64 accumulator), and a constant one has no `.to(...)`.
    constants = dict(GROUP_SIZE=1, BLOCK_D=64, ACC_DTYPE=tl.float32, DOT_PRECISION="tf32",
                     UPCAST_BF16=False, BLOCK_M=64, BLOCK_N=64, **_PLAIN_CAUSAL)
    if scale_as == "constant":
        constants.update(scale=0.125, qk_scale_log2=0.125 * 1.4426950408889634)
    for kernel in (flash_module._flash_attention_forward_kernel, flash_module._flash_attention_backward_dkdv_kernel,
                   flash_module._flash_attention_backward_dq_kernel):
        compiled = _ahead_of_time_compile(kernel, 90, constants, num_warps=4, num_stages=2, scale_type="fp64")
        assert compiled.asm["cubin"], kernel
        float64_work = [line.strip() for line in compiled.asm["ptx"].splitlines()
                        if ".f64" in line and not line.strip().startswith((".param", "cvt.rn.f32.f64"))]
        assert not float64_work, f"{kernel.fn.__name__}: float64 arithmetic beyond converting the scale: " \
                                 f"{float64_work[:3]}"


# ---- the drop-in API on CUDA tensors: genfast.nn.functional and MultiheadAttention ------------

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_functional_sdpa_runs_the_triton_kernel_on_cuda(dtype):
    import genfast.nn.functional as gf

    # Two leading batch dims and GQA: reshaped to (B, H, L, D) for the kernel and back.
    q, k, v, grad_out = _inputs(6, 4, 2, 100, 120, 64, dtype=dtype, seed=3)
    as_5d = lambda t: t.unflatten(0, (2, 3))
    ours = expect_dispatch(lambda: _output_and_grads(lambda a, b, c: gf.scaled_dot_product_attention(
        as_5d(a), as_5d(b), as_5d(c), is_causal=True, enable_gqa=True).flatten(0, 1), q, k, v, grad_out),
        TRITON_KERNEL)
    torchs = _output_and_grads(lambda a, b, c: F.scaled_dot_product_attention(
        a, b, c, is_causal=True, enable_gqa=True), q, k, v, grad_out)
    expected = _fp32_reference(q, k, v, grad_out, causal=True)
    for name, got, theirs, want in zip(("out", "dq", "dk", "dv"), ours, torchs, expected):
        assert got.shape == want.shape, name
        our_error, torch_error = (got - want).abs().max().item(), (theirs - want).abs().max().item()
        assert our_error <= 2 * torch_error + 1e-5, f"{name}: {our_error:.3g} > 2 x SDPA's {torch_error:.3g}"


@requires_cuda
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_functional_sdpa_with_a_mask_runs_the_triton_kernel(kind):
    import genfast.nn.functional as gf

    q, k, v, grad_out = _inputs(1, 2, 2, 50, 60, 64, dtype=torch.float16, seed=4)
    keep = torch.rand(1, 1, 50, 60, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)) > 0.3
    keep[..., 7, :] = False  # a fully masked row: ours gives 0 (torch's backends differ there)
    as_mask = lambda m: m if kind == "bool" else torch.where(m, 0.25, float("-inf")).half()
    mask = as_mask(keep)
    ours = expect_dispatch(lambda: _output_and_grads(lambda a, b, c: gf.scaled_dot_product_attention(
        a, b, c, attn_mask=mask), q, k, v, grad_out), TRITON_KERNEL, "mask")
    expected = _fp32_reference_of(lambda a, b, c: _attention_empty_rows_zero(
        a, b, c, mask.float() if kind == "additive" else mask), q, k, v, grad_out)
    assert (ours[0][:, :, 7] == 0).all() and (ours[1][:, :, 7] == 0).all()
    # torch's error in the same dtype, measured on the same mask with row 7 kept (no fully masked row,
    # whose handling differs between SDPA backends), against its own fp32 reference.
    keep_all_rows = keep.clone()
    keep_all_rows[..., 7, :] = True
    torch_mask = as_mask(keep_all_rows)
    torchs = _output_and_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=torch_mask),
                               q, k, v, grad_out)
    torch_expected = _fp32_reference_of(lambda a, b, c: _attention_empty_rows_zero(
        a, b, c, torch_mask.float() if kind == "additive" else torch_mask), q, k, v, grad_out)
    for name, got, want, theirs, their_want in zip(("out", "dq", "dk", "dv"), ours, expected, torchs, torch_expected):
        our_error = (got - want).abs().max().item()
        torch_error = (theirs - their_want).abs().max().item()
        assert our_error <= 2 * torch_error + 1e-3, f"{name}: {our_error:.3g} > 2 x SDPA's {torch_error:.3g}"


@requires_cuda
def test_functional_sdpa_with_dropout_runs_the_triton_kernel_with_the_kernels_mask():
    import genfast.nn.functional as gf

    q, k, v, grad_out = _inputs(1, 2, 2, 50, 60, 64, dtype=torch.float32, seed=7)
    torch.manual_seed(8)
    seed = flash_module.draw_dropout_seed("cuda")
    torch.manual_seed(8)  # the call draws the same seed from torch's CUDA generator
    ours = expect_dispatch(lambda: _output_and_grads(lambda a, b, c: gf.scaled_dot_product_attention(
        a, b, c, dropout_p=0.3), q, k, v, grad_out), TRITON_KERNEL, "dropout")
    keep = flash_module.dropout_keep_mask(seed, 1, 2, 50, 60, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.05

    def dropped(a, b, c):
        probs = torch.softmax((a @ b.transpose(-2, -1)) / 8.0, dim=-1)
        return (probs * keep / 0.7) @ c

    expected = _fp32_reference_of(dropped, q, k, v, grad_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _attention_empty_rows_zero(q, k, v, attn_mask):
    """The textbook equations with rows that see no key set to 0 (torch's SDPA rule)."""
    scores = reference.attention_scores(q, k, attn_mask)
    empty = scores.isneginf().all(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0) @ v


def _fp32_reference_of(fn, q, k, v, grad_out):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _output_and_grads(fn, q.float(), k.float(), v.float(), grad_out.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@requires_cuda
def test_varlen_on_cuda_matches_padding_plus_masked_sdpa():
    lengths = [1, 100, 37, 0, 64]
    total = sum(lengths)
    generator = torch.Generator(device="cuda").manual_seed(9)
    q, k, v = (torch.randn(total, 4, 64, device="cuda", generator=generator, dtype=torch.float16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = flash_module.flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    for b, length in enumerate(lengths):
        if length == 0:
            continue
        part = slice(cu[b].item(), cu[b + 1].item())
        want = F.scaled_dot_product_attention(*(t[part].transpose(0, 1).float() for t in (q, k, v)), is_causal=True)
        torch.testing.assert_close(out[part].float(), want.transpose(0, 1), atol=2e-3, rtol=2e-3)


@requires_cuda
def test_multihead_attention_on_cuda_within_2x_of_torch_error():
    from genfast.nn.attention import MultiheadAttention

    torch.manual_seed(6)
    reference_mha = torch.nn.MultiheadAttention(256, 4, batch_first=True, device="cuda")
    ours = MultiheadAttention(256, 4, batch_first=True, device="cuda")
    ours.load_state_dict(reference_mha.state_dict())
    theirs = copy.deepcopy(reference_mha).half()
    ours.half()
    x = torch.randn(2, 300, 256, device="cuda")

    def forward_and_grads(module, inputs):
        inputs = inputs.detach().requires_grad_()
        out, weights = module(inputs, inputs, inputs, need_weights=False)
        assert weights is None
        out.float().square().sum().backward()
        return [out.detach().float(), inputs.grad.float()] + [p.grad.float() for p in module.parameters()]

    got = expect_dispatch(lambda: forward_and_grads(ours, x.half()), TRITON_KERNEL)
    torchs = forward_and_grads(theirs, x.half())
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            want = forward_and_grads(reference_mha, x.half().float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    names = ["out", "input"] + [name for name, _ in ours.named_parameters()]
    for name, a, b, w in zip(names, got, torchs, want):
        our_error, torch_error = (a - w).abs().max().item(), (b - w).abs().max().item()
        # Same fp16 projections on both sides; only the attention kernel differs. Slack: one fp16 ulp
        # of the largest value, for entries where both errors are rounding-sized.
        slack = 2 ** -10 * w.abs().max().item()
        assert our_error <= 2 * torch_error + slack, f"{name}: {our_error:.3g} > 2 x torch's {torch_error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("block_d", [16, 64, 128, 256])
def test_tile_pruning_fits_shared_memory(dtype, block_d):
    # No GPU needed. On an H200, fp32 at head dim 256 with the 64 x 64, 2-stage tile asked for 279,040 bytes
    # of shared memory in the dK/dV kernel (limit 232,448) and failed to launch: pruning must not pick it.
    q = torch.empty(0, dtype=dtype)
    kept = flash_module._prune_for_head_dim(flash_module._gpu_configs(), {"q_ptr": q, "BLOCK_D": block_d})
    assert kept
    shapes = [flash_module._shape(config) for config in kept]
    if q.element_size() >= 4:
        assert len(shapes) == 1 and shapes[0] in flash_module._WIDE_SHAPES
    else:
        assert set(shapes) <= set(flash_module._HALF_SHAPES)
    for block_m, block_n, _, stages in shapes:
        assert 1.15 * (block_m + block_n) * block_d * q.element_size() * stages <= 227 * 1024
    if dtype == torch.float32 and block_d == 256:
        assert (64, 64, 4, 2) not in shapes
