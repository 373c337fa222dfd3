"""The generation kernels (kernels/sampling.py, kernels/decode_attention.py) compiled ahead of time for
sm_80 and sm_90 with the ptxas in the triton wheel: no GPU needed, so CI sees what only a GPU build
sees (layout and lowering errors, shared memory, register spills). Their numbers are tested under the
interpreter (tests/test_sampling_triton.py, tests/test_decode_attention_triton.py) and on a GPU
(tests/test_generation_cuda.py). Must run without TRITON_INTERPRET (the Makefile's main pytest process).
"""
import os

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 is set; this compiles for real GPUs")

if not INTERPRETED:
    import triton.language as tl

    from genfast.kernels import decode_attention, sampling
    from tests.triton_aot import compile_for, ptxas_usage



def _width(name):
    """(accumulation dtype, key dtype, key bits, pointer type); float32 also covers float16/bfloat16 inputs."""
    return {"fp32": (tl.float32, tl.uint32, 32, "*fp32"), "fp64": (tl.float64, tl.uint64, 64, "*fp64")}[name]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("width", ["fp32", "fp64"])
@pytest.mark.parametrize("kernel_name", ["filter", "draw"])
def test_sampling_kernels_compile_without_spills(kernel_name, width, capability):
    acc, key, bits, logits = _width(width)
    constants = dict(USE_TOP_K=True, USE_TOP_P=True, ACC_DTYPE=acc, KEY_DTYPE=key, KEY_BITS=bits,
                     BLOCK=sampling._DEFAULT_BLOCK, RECIPROCAL=True, ROUND_BF16=False)
    types = dict(logits_ptr=logits, status_ptr="*i32", vocab="i32", stride_logits_row="i32",
                 temperature_bits="i64", top_k="i32", top_p_bits="i64")
    if kernel_name == "filter":
        kernel = sampling._sampling_filter_kernel
        types.update(out_ptr=logits, stride_out_row="i32")
    else:
        kernel = sampling._sampling_draw_kernel
        types.update(uniforms_ptr="*fp64", tokens_ptr="*i64")
    compiled = compile_for(kernel, capability, types, constants, num_warps=sampling._NUM_WARPS)
    usage = ptxas_usage(compiled, capability)
    # The per-lane partial sums (BLOCK x 16 per digit pass) live in registers; a spill would put them in
    # local memory on every tile of every pass.
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    assert compiled.metadata.shared <= 48 * 1024, compiled.metadata.shared


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("pointer,width", [("*fp16", "fp32"), ("*fp32", "fp32"), ("*fp64", "fp64")])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_attention_kernels_compile(head_dim, pointer, width, capability):
    acc, _, _, accumulate = _width(width)
    strides = [f"stride_{t}{d}" for t, dims in (("q", "bhd"), ("k", "bhnd"), ("v", "bhnd"), ("o", "bhd"))
               for d in dims]
    types = dict(q_ptr=pointer, k_ptr=pointer, v_ptr=pointer, out_ptr=pointer, partial_out_ptr=accumulate,
                 partial_lse_ptr=accumulate, length_ptr="*i64", num_q_heads="i32", group_size="i32", length="i32",
                 max_len="i32", chunk_len="i32", head_dim="i32", head_dim_v="i32", scale_bits="i64",
                 **{name: "i32" for name in strides})
    block_n = decode_attention._block_n(head_dim)
    for length_in_memory in (False, True):  # an int length, and the CUDA-graph path's length tensor
        split = compile_for(decode_attention._decode_attention_split_kernel, capability, types,
                            dict(ACC_DTYPE=acc, SINGLE_SPLIT=False, LENGTH_IN_MEMORY=length_in_memory,
                                 BLOCK_N=block_n, BLOCK_D=head_dim, BLOCK_DV=head_dim), num_warps=4)
        assert split.asm["cubin"]
    reduce_types = dict(partial_out_ptr=accumulate, partial_lse_ptr=accumulate, out_ptr=pointer,
                        stride_ob="i32", stride_oh="i32", stride_od="i32", num_q_heads="i32", num_splits="i32",
                        head_dim_v="i32")
    reduce = compile_for(decode_attention._decode_attention_reduce_kernel, capability, reduce_types,
                         dict(ACC_DTYPE=acc, BLOCK_S=64, BLOCK_DV=head_dim), num_warps=4)
    assert reduce.asm["cubin"]
