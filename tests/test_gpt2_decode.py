"""The fused CPU GPT-2 decode block (genfast/generation/ops/gpt2_decode.py, csrc/generation/gpt2_decode.cpp) against the
model's unfused block (the same equations as separate torch ops) on the same weights and cache.

Tolerances: float64 differs from the unfused block only in summation order (~1e-15 relative). For
float32 the fused block's error against the float64 block is held to a few times the unfused float32
block's own error: both round the same sums differently, neither is more exact.
"""
from __future__ import annotations

import copy

import pytest
import torch

from genfast.generation.gpt2 import GPT2, Block, GPT2Config, KVCache
from genfast.generation.ops.gpt2_decode import gpt2_decode_block


def _block_and_cache(activation: str, rows: int, position: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_head=4, n_embd=32, n_inner=80, vocab_size=50, n_positions=64,
                        activation_function=activation)
    block = Block(config, layer_idx=0).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():  # away from init: nonzero biases, unit-scale LayerNorms
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0))
    cache = KVCache(config, rows, 16, dtype, torch.device("cpu"))
    cache.k.normal_()
    cache.v.normal_()
    cache.length = position  # rows [0, position) hold earlier tokens
    return block, cache, torch.randn(rows, 1, 32, dtype=dtype)


def _unfused(block, cache, x):
    cache = copy.deepcopy(cache)
    with torch.no_grad():
        return block(x, cache), cache


def _fused(block, cache, x):
    cache = copy.deepcopy(cache)
    with torch.no_grad():
        return block.decode_step(x, cache), cache


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu", "silu"])
# Any row count is computed exactly; these cover one and several chunks of 8 rows of the dot-product path.
@pytest.mark.parametrize("rows,position", [(1, 0), (1, 9), (3, 5), (8, 15), (13, 4), (32, 7)])
def test_fused_block_matches_unfused_block_float64(activation, rows, position):
    block, cache, x = _block_and_cache(activation, rows, position, torch.float64)
    (want, want_cache), (got, got_cache) = _unfused(block, cache, x), _fused(block, cache, x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # The new token's key and value went into row `position` of layer 0's caches, and nothing else changed.
    torch.testing.assert_close(got_cache.k, want_cache.k, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_cache.v, want_cache.v, atol=1e-12, rtol=1e-12)
    assert not torch.equal(got_cache.k[0, :, :, position], cache.k[0, :, :, position])


def _assert_float32_error_is_that_of_the_unfused_block(block64, cache64, x64):
    exact, _ = _unfused(block64, cache64, x64)
    block, cache, x = copy.deepcopy(block64).float(), copy.deepcopy(cache64), x64.float()
    cache.k, cache.v = cache.k.float(), cache.v.float()
    unfused, _ = _unfused(block, cache, x)
    fused, _ = _fused(block, cache, x)
    ours, theirs = (fused.double() - exact).abs().max().item(), (unfused.double() - exact).abs().max().item()
    assert ours <= 4 * theirs + 1e-6, (ours, theirs)


@pytest.mark.parametrize("activation", ["gelu_new", "silu"])
@pytest.mark.parametrize("rows,position", [(1, 0), (2, 12), (10, 3)])
def test_fused_block_float32_error_is_that_of_the_unfused_block(activation, rows, position):
    _assert_float32_error_is_that_of_the_unfused_block(*_block_and_cache(activation, rows, position, torch.float64,
                                                                         seed=1))


def test_fused_gelu_tails_float32():
    # float32 tanh-GELU runs as x / (1 + exp(-2u)) with genfast's polynomial exp (csrc/generation/gpt2_decode.cpp):
    # fc biases from -20 to 20 put pre-activations in both tails, where exp's clamps act and where
    # 0.5 x (1 + tanh u) cancels.
    block64, cache64, x64 = _block_and_cache("gelu_new", 3, 5, torch.float64, seed=2)
    with torch.no_grad():
        block64.c_fc.bias.copy_(torch.linspace(-20, 20, block64.c_fc.bias.numel(), dtype=torch.float64))
    _assert_float32_error_is_that_of_the_unfused_block(block64, cache64, x64)


def test_generate_runs_the_fused_blocks_and_gives_the_unfused_tokens(monkeypatch):
    torch.manual_seed(3)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=60, n_positions=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ids = torch.randint(0, 60, (2, 5))
    calls = []
    monkeypatch.setattr(Block, "decode_step", lambda self, x, cache, _f=Block.decode_step: calls.append(1) or _f(
        self, x, cache))
    fused = model.generate(ids, max_new_tokens=12)
    assert len(calls) == 11 * 2  # every decode step after the prefill, every layer
    model.fused_cpu_decode = False
    unfused = model.generate(ids, max_new_tokens=12)
    assert len(calls) == 22
    assert torch.equal(fused, unfused)


def test_fused_decode_takes_exactly_the_rows_its_weights_are_read_in_place_for(monkeypatch):
    # The limit is what the kernels report for this model's weights (decode_linear's few-row path),
    # not a number fixed here: at the limit the fused block runs, one row more the unfused one.
    from genfast.generation.ops.decode_linear import dot_path_rows

    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=60, n_positions=16)).eval()
    block = model.h[0]
    limit = model.fused_decode_rows()
    assert limit == min(dot_path_rows(w) for w in (block.attn.c_attn.weight, block.attn.c_proj.weight,
                                                     block.c_fc.weight, block.c_proj.weight))
    calls = []
    monkeypatch.setattr(Block, "decode_step", lambda self, x, cache, _f=Block.decode_step: calls.append(x.shape[0])
                        or _f(self, x, cache))
    for rows in (limit, limit + 1):
        ids = torch.randint(0, 60, (rows, 3), generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            cache = model.new_cache(rows, 4)
            model(ids, cache)
            fused = model(ids[:, -1:], cache)[:, -1]
            cache.length -= 1
            model.fused_cpu_decode = False
            unfused = model(ids[:, -1:], cache)[:, -1]
            model.fused_cpu_decode = True
        torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    assert calls == [limit]


def test_a_cached_forward_that_autograd_would_record_is_a_clear_error():
    # The cache is written in place and the decode kernels have no backward: gradients through a
    # cached step would be wrong, so it is refused; without a cache, or under no_grad, it runs.
    torch.manual_seed(4)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=60, n_positions=64))
    model.wte.requires_grad_(False)  # x itself need not require grad for the blocks' weights to
    model.wpe.requires_grad_(False)
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(RuntimeError, match="a forward with a KV cache is inference only"):
        model(ids, model.new_cache(1, 8))
    model(ids).sum().backward()
    assert model.h[0].c_fc.weight.grad is not None
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(ids[:, :3], cache)
        model(ids[:, 3:], cache)


def _op_args(dtype=torch.float32, rows=2, position=3):
    block, cache, x = _block_and_cache("gelu_new", rows, position, dtype)
    attn = block.attn
    tensors = [x.view(rows, 32), block.ln_1.weight, block.ln_1.bias, attn.c_attn.weight, attn.c_attn.bias,
               attn.c_proj.weight, attn.c_proj.bias, block.ln_2.weight, block.ln_2.bias, block.c_fc.weight,
               block.c_fc.bias, block.c_proj.weight, block.c_proj.bias, cache.k[0], cache.v[0]]
    return [t.detach() for t in tensors] + [position, 4, attn.scale, 1e-5, "gelu_tanh"]


def test_opcheck():
    torch.library.opcheck(torch.ops.genfast.gpt2_decode_block.default, tuple(_op_args()))


def test_bad_inputs_name_the_argument():
    op = torch.ops.genfast.gpt2_decode_block

    def call(**changes):
        args = _op_args()
        names = ["x", "ln_1_weight", "ln_1_bias", "attn_weight", "attn_bias", "attn_proj_weight", "attn_proj_bias",
                 "ln_2_weight", "ln_2_bias", "fc_weight", "fc_bias", "mlp_proj_weight", "mlp_proj_bias", "k_cache",
                 "v_cache", "position", "n_head", "scale", "eps", "activation"]
        for name, value in changes.items():
            args[names.index(name)] = value(args[names.index(name)]) if callable(value) else value
        return op(*args)

    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        call(x=lambda t: t.half())
    with pytest.raises(RuntimeError, match="attn_weight must be a CPU tensor of x's dtype"):
        call(attn_weight=lambda t: t.double())
    with pytest.raises(RuntimeError, match=r"mlp_proj_weight must be \(32, 80\)"):
        call(mlp_proj_weight=lambda t: t[:, :40])
    with pytest.raises(RuntimeError, match="ln_2_bias must be"):
        call(ln_2_bias=lambda t: t[:31])
    with pytest.raises(RuntimeError, match="k_cache and v_cache must be"):
        call(k_cache=lambda t: t[:1])
    with pytest.raises(RuntimeError, match=r"position must be in \[0, max_len=16\)"):
        call(position=16)
    with pytest.raises(RuntimeError, match="n_head .* must divide n_embd"):
        call(n_head=5)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        call(activation="tanh")
    with pytest.raises(ValueError, match="activation 'tanh' not one of"):
        gpt2_decode_block(torch.zeros(1, 32), *[(None, None)] * 6, None, None, 0, 4, 1.0, 1e-5, "tanh")
