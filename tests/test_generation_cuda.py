"""The generation ops on CUDA tensors: torch.ops.genfast.sampling_filter / sampling_draw /
decode_attention dispatch to the compiled Triton kernels (kernels/sampling.py,
kernels/decode_attention.py), compared with the C++ CPU op and genfast.reference on the same inputs.
Skipped without a CUDA device; the same kernels are tested on the CPU under the Triton interpreter by
tests/test_sampling_triton.py and tests/test_decode_attention_triton.py.

Sampling: kept sets and values must equal the CPU op's exactly on the logits as torch scales them on
CUDA (x * (1 / temperature); the CPU divides), and draws must agree. The GPU's float64
exp may differ from glibc's in the last bit, and its sums are trees instead of sequences, so a draw can
differ only when a uniform lies within ~1e-15 of a CDF step (probability ~1e-12 per draw here).
"""
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    import genfast.generation.ops  # noqa: F401
    from genfast import reference, routing
    from genfast.generation import sampling as generation


@pytest.fixture(autouse=True)
def _genfast_kernels():
    """genfast.routing's rules off: these tests are of genfast's kernels (tests/test_routing.py tests the
    routing), and the CUDA-graph tests compare eager steps with replays of the same kernels."""
    with routing.force_kernels():
        yield

SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 1, 1.0), (1.0, 50, 1.0), (1.0, 0, 0.9), (1.0, 0, 0.0),
            (1.4, 50, 0.95), (1.0, 100000, 0.5)]


def _logits(rows, vocab, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [7, 50257, 151936])
def test_sampling_matches_cpu_op(dtype, vocab):
    logits = _logits(4, vocab, dtype, seed=vocab)
    uniforms = torch.rand(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for temperature, top_k, top_p in SETTINGS:
        # torch on CUDA scales by the reciprocal of the temperature, as the kernels do (see
        # kernels/sampling.py); the C++ op then filters and draws from those scaled logits.
        # Half logits are scaled in float32 (the ops' accumulation type) and rounded on output.
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        scaled = (logits.cuda().to(accumulate) / temperature).cpu()
        got = torch.ops.genfast.sampling_filter(logits.cuda(), temperature, top_k, top_p).cpu()
        expected = torch.ops.genfast.sampling_filter(scaled, 1.0, top_k, top_p).to(dtype)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), (temperature, top_k, top_p)
        assert torch.equal(got, expected), (temperature, top_k, top_p)
        tokens = torch.ops.genfast.sampling_draw(logits.cuda(), uniforms.cuda(), temperature, top_k, top_p).cpu()
        assert torch.equal(tokens, torch.ops.genfast.sampling_draw(scaled, uniforms, 1.0, top_k, top_p)), \
            (temperature, top_k, top_p)


def test_sampling_ties_match_cpu_op():
    logits = torch.randint(-4, 4, (8, 3000), generator=torch.Generator().manual_seed(2)).float()
    uniforms = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for settings in [(1.0, 10, 1.0), (1.0, 0, 0.6), (0.5, 25, 0.5)]:
        assert torch.equal(torch.ops.genfast.sampling_filter(logits.cuda(), *settings).cpu(),
                           torch.ops.genfast.sampling_filter(logits, *settings))
        assert torch.equal(torch.ops.genfast.sampling_draw(logits.cuda(), uniforms.cuda(), *settings).cpu(),
                           torch.ops.genfast.sampling_draw(logits, uniforms, *settings))


def test_generation_api_uses_the_op_without_warning(recwarn):
    logits = _logits(2, 1000, torch.float32, seed=4).cuda()
    scores = generation.process_logits(logits, 0.8, 40, 0.9)
    torch.testing.assert_close(scores, reference.process_logits(logits, 0.8, 40, 0.9), atol=0, rtol=0)
    generator = torch.Generator(device="cuda").manual_seed(5)
    first = generation.sample(logits, 0.8, 40, 0.9, generator=generator)
    again = generation.sample(logits, 0.8, 40, 0.9, generator=torch.Generator(device="cuda").manual_seed(5))
    assert torch.equal(first, again) and first.device.type == "cuda"
    assert not [w for w in recwarn.list if "genfast" in str(w.message)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch,heads_q,heads_kv,length,dim", [
    (1, 12, 12, 1, 64), (4, 12, 12, 17, 64), (1, 32, 8, 4000, 128), (2, 8, 1, 30000, 80), (1, 4, 4, 999, 256)])
def test_decode_attention_matches_reference(dtype, tol, batch, heads_q, heads_kv, length, dim):
    # Tolerances as in tests/test_decode_attention_triton.py (fp32 IEEE products, half types: output ulp).
    generator = torch.Generator().manual_seed(length)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)
    q, k_cache, v_cache = make(batch, heads_q, dim), make(batch, heads_kv, length + 5, dim), \
        make(batch, heads_kv, length + 5, dim)
    scale = 1 / math.sqrt(dim)
    got = torch.ops.genfast.decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), length, scale)
    expected = reference.attention(q.double()[:, :, None], k_cache.double()[:, :, :length],
                                   v_cache.double()[:, :, :length], scale=scale, enable_gqa=True)[:, :, 0]
    assert got.dtype == dtype and got.device.type == "cuda"
    torch.testing.assert_close(got.cpu().double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_greedy_on_cuda_follows_the_float64_model(dtype):
    # End to end on the GPU: prefill, KV cache, decode_attention (Triton), argmax. Teacher forcing
    # checks each generated token against the fp64 CPU model on the same prefix: it must be the
    # argmax there, or within the dtype's rounding of it (a near tie may go either way).
    from genfast.generation.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    prompt = torch.randint(0, 500, (2, 5), generator=torch.Generator().manual_seed(1))
    tokens = model.to("cuda", dtype).generate(prompt.cuda(), 40).cpu()
    assert tokens.shape == (2, 45) and torch.equal(tokens[:, :5], prompt)
    with torch.no_grad():
        logits = model.to("cpu", torch.float64)(tokens[:, :-1])[:, 4:]
    chosen = logits.gather(-1, tokens[:, 5:, None]).squeeze(-1)
    # fp32: IEEE products (TF32 is off by default), errors ~1e-6 of logits of size ~1; bf16: 8 bits.
    slack = 1e-4 if dtype == torch.float32 else 0.1
    gap = logits.max(-1).values - chosen
    assert (gap <= slack).all(), f"largest gap to the fp64 argmax {gap.max().item():.3g} > {slack}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_cuda_graph_decode_gives_the_eager_tokens(dtype):
    # The CUDA-graph decode (the default on CUDA) replays the eager step's kernels, with the length read
    # from memory. Caches under 512 rows keep decode_attention at one split either way, so the
    # arithmetic is the same and the tokens must be identical, greedy and sampled. (Longer caches split
    # differently by design: test_decode_attention_length_in_memory checks that path against the reference.)
    from genfast.generation.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=500, n_positions=512, n_embd=64, n_layer=2, n_head=4)).eval()
    model = model.to("cuda", dtype)
    prompt = torch.randint(0, 500, (3, 300), generator=torch.Generator().manual_seed(2)).cuda()
    eager = model.generate(prompt, 100, cuda_graph=False)
    assert torch.equal(model.generate(prompt, 100), eager)
    assert torch.equal(model.generate(prompt, 100, cuda_graph=True), eager)
    # End tokens: rows that finish are padded while the graph keeps running the others; the call stops
    # when every row has finished. The eos is a token the first row emits early on.
    eos = int(eager[0, 310])
    with_eos = model.generate(prompt, 100, eos_token_id=eos, pad_token_id=0, cuda_graph=False)
    assert torch.equal(model.generate(prompt, 100, eos_token_id=eos, pad_token_id=0), with_eos)

    def sampled(cuda_graph):
        generator = torch.Generator(device="cuda").manual_seed(3)
        return model.generate(prompt[:1, :8], 30, do_sample=True, top_k=20, top_p=0.9, num_return_sequences=2,
                              repetition_penalty=1.2, generator=generator, cuda_graph=cuda_graph)

    assert torch.equal(sampled(True), sampled(False))


@pytest.mark.parametrize("num_splits", [None, 3, 7])
def test_decode_attention_length_in_memory(num_splits):
    # The CUDA-graph path of the kernel: splits cover max_len=2000, chunks past the length weigh 0.
    from genfast.kernels.decode_attention import decode_attention

    generator = torch.Generator().manual_seed(11)
    q, k_cache, v_cache = (torch.randn(*shape, generator=generator) for shape in
                           [(2, 8, 64), (2, 2, 2000, 64), (2, 2, 2000, 64)])
    for length in (1, 300, 1999):
        got = decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), torch.tensor([length], device="cuda"),
                               0.125, num_splits=num_splits)
        expected = reference.attention(q.double()[:, :, None], k_cache.double()[:, :, :length],
                                       v_cache.double()[:, :, :length], scale=0.125, enable_gqa=True)[:, :, 0]
        torch.testing.assert_close(got.cpu().double(), expected, atol=1e-5, rtol=1e-5)


def test_gpt2_sampling_on_cuda_is_reproducible_and_stays_in_top_k(recwarn):
    from genfast.generation.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval().cuda()
    prompt = torch.randint(0, 500, (1, 4), generator=torch.Generator().manual_seed(1)).cuda()

    def run():
        generator = torch.Generator(device="cuda").manual_seed(7)
        return model.generate(prompt, 20, do_sample=True, top_k=5, num_return_sequences=3, generator=generator)

    tokens = run()
    assert torch.equal(tokens, run()) and tokens.shape == (3, 24)
    with torch.no_grad():
        logits = model(tokens[:, :-1])[:, 3:].float()
    top5 = logits.topk(5, dim=-1).indices
    # Each draw is one of the 5 most likely tokens (ties at the 5th place aside, impossible here).
    assert (top5 == tokens[:, 4:, None]).any(-1).all()
    assert not [w for w in recwarn.list if "genfast" in str(w.message)]


@pytest.mark.parametrize("length_on_device", [False, True])
def test_eager_decode_attention_skipping_the_dispatcher_equals_the_op(length_on_device):
    # genfast.generation.decode.decode_attention calls the op's CUDA kernel directly in eager mode
    # (the one route that skips the dispatcher): it must give what the op gives, bit for bit.
    from genfast.generation.decode import decode_attention

    generator = torch.Generator().manual_seed(12)
    q, k_cache, v_cache = (torch.randn(*shape, generator=generator).cuda() for shape in
                           [(2, 8, 64), (2, 2, 700, 64), (2, 2, 700, 64)])
    for length in (1, 333, 700):
        op = torch.ops.genfast.decode_attention(q, k_cache, v_cache, length, 0.125)
        if length_on_device:  # splits sized for max_len instead of length: same math, other summation order
            direct = decode_attention(q, k_cache, v_cache, torch.tensor([length], device="cuda"), 0.125)
            torch.testing.assert_close(direct, op, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(decode_attention(q, k_cache, v_cache, length, 0.125), op)


def test_attention_forward_on_cuda_runs_the_triton_kernel_with_the_cpp_autograd():
    # One route for attention on every device: torch.ops.genfast.attention_forward, whose CUDA kernel
    # is the Triton flash attention and whose autograd (csrc/attention_autograd.cpp) calls
    # attention_backward's CUDA kernel. Checked against the CPU op on the same inputs.
    from genfast.ops.attention import attention_forward

    generator = torch.Generator().manual_seed(13)
    q, k, v, grad = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                     for shape in [(2, 4, 37, 32), (2, 2, 45, 32), (2, 2, 45, 32), (2, 4, 37, 32)])

    def run(device):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
        out, lse = attention_forward(*leaves, None, True, 0.2)
        out.backward(grad.to(device))
        return [t.detach().cpu() for t in (out, lse, *(x.grad for x in leaves))]

    for got, want in zip(run("cuda"), run("cpu")):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    with pytest.raises(RuntimeError, match="takes no attn_mask"):
        attention_forward(q.cuda(), k.cuda(), v.cuda(), torch.ones(37, 45, dtype=torch.bool, device="cuda"),
                          False, 0.2)
