"""Shared machinery for the LSTM/GRU parity tests: run torch.nn and genfast.nn on the
same weights and inputs, and compare outputs, final states and every gradient."""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

# Tolerances. float64: both sides compute the same equations with different summation
# orders; errors are ~1e-15 relative, so 1e-9 leaves room for long recurrences.
# float32: GEMM summation order differs (ours: sequential over K; oneDNN/MKL: blocked),
# and genfast's exp/tanh are polynomial approximations within 2 ulp, so each step adds a
# few ulp of relative error; over <= 12 steps and K <= 64 gradients stay within 2e-5
# absolute / 1e-4 relative for O(1) values. Looser only where noted.
TOLERANCES = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=2e-5, rtol=1e-4)}


def clone_module(torch_module, genfast_cls):
    g = genfast_cls.from_torch(torch_module)
    assert [n for n, _ in g.named_parameters()] == [n for n, _ in torch_module.named_parameters()]
    return g


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def forward_backward(module, make_input, hx=None):
    """Forward + backward of ``module`` on a fresh input; returns (output, [final states], {name: grad})."""
    inp = make_input()
    leaf_input = inp.data if isinstance(inp, PackedSequence) else inp
    states = None
    if hx is not None:
        states = tuple(_leaf(h) for h in hx) if isinstance(hx, tuple) else _leaf(hx)
    module.zero_grad(set_to_none=True)
    out, final = module(inp, states)
    out_t = out.data if isinstance(out, PackedSequence) else out
    finals = list(final) if isinstance(final, tuple) else [final]
    # Weighted sums so that every element's gradient differs (catches transposes).
    gen = torch.Generator().manual_seed(1234)
    loss = (out_t * torch.randn(out_t.shape, generator=gen, dtype=out_t.dtype)).sum()
    for f in finals:
        loss = loss + (f * torch.randn(f.shape, generator=gen, dtype=f.dtype)).sum()
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["input"] = leaf_input.grad
    if states is not None:
        for i, s in enumerate(states if isinstance(states, tuple) else (states,)):
            grads[f"hx{i}"] = s.grad
    return out_t.detach(), [f.detach() for f in finals], grads


def run_both(torch_module, genfast_module, make_input, hx=None):
    """Runs forward + backward of both modules on cloned inputs; returns (torch_results, genfast_results).

    Each result is (output tensor, list of final-state tensors, {name: grad}).
    """
    return [forward_backward(module, make_input, hx) for module in (torch_module, genfast_module)]


def assert_same_for_any_thread_count(module, make_input, hx=None, thread_counts=(2, 3)):
    """Forward + backward agree between 1 thread and each of ``thread_counts``.

    In the time loops each element is computed by one thread, in the same order whatever the
    split, so outputs, states and the input and state gradients must be bit-identical. The weight
    gradients are single GEMMs over all steps (torch's at::mm), whose summation order over the
    S = T*N rows depends on the thread count: float32 rounding, bounded by S * eps relative.
    3 threads also oversubscribe a 2-CPU machine and split the hidden units unevenly."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = forward_backward(module, make_input, hx)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            out, finals, grads = forward_backward(module, make_input, hx)
            assert torch.equal(out, expected[0]), f"output differs with {threads} threads"
            for i, (a, b) in enumerate(zip(finals, expected[1])):
                assert torch.equal(a, b), f"final state {i} differs with {threads} threads"
            assert grads.keys() == expected[2].keys()
            for name, grad in grads.items():
                if name.startswith(("weight", "bias")):
                    torch.testing.assert_close(grad, expected[2][name], atol=1e-5, rtol=1e-5,
                                               msg=lambda m, n=name: f"grad {n} with {threads} threads: " + m)
                else:
                    assert torch.equal(grad, expected[2][name]), f"grad {name} differs with {threads} threads"
    finally:
        torch.set_num_threads(previous)


def assert_same(results, dtype, scale=1.0):
    (out_t, fin_t, grad_t), (out_g, fin_g, grad_g) = results
    tol = {k: v * scale for k, v in TOLERANCES[dtype].items()}
    torch.testing.assert_close(out_g, out_t, **tol, msg=lambda m: "output: " + m)
    for i, (a, b) in enumerate(zip(fin_g, fin_t)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"final state {i}: " + m)
    assert grad_t.keys() == grad_g.keys()
    for name in grad_t:
        assert (grad_t[name] is None) == (grad_g[name] is None), name
        if grad_t[name] is not None:
            torch.testing.assert_close(grad_g[name], grad_t[name], **tol, msg=lambda m, n=name: f"grad {n}: " + m)


def packed_input(lengths, input_size, dtype, enforce_sorted, seed=0):
    """A function making the same PackedSequence (with a fresh leaf data tensor) each call."""
    gen = torch.Generator().manual_seed(seed)
    padded = torch.randn(max(lengths), len(lengths), input_size, generator=gen, dtype=dtype)

    def make():
        leaf = padded.clone().requires_grad_(True)
        packed = pack_padded_sequence(leaf, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        # Make the packed data itself the leaf so both runs compare d(loss)/d(data).
        data = packed.data.detach().requires_grad_(True)
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)

    return make


# bfloat16 / float16 on the CPU run in float32 and round each result once (genfast.ops.rnn).
# Against float64 on the same rounded weights and inputs, every output, state and gradient
# is then off by that one rounding (at most u = the dtype's unit roundoff, relative) plus
# float32's error (~1e-6): within 2u of the largest magnitude.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _flatten(result):
    return [t for item in result for t in _flatten(item)] if isinstance(result, tuple) else [result]


def assert_reduced_precision_matches_float64(genfast_module, dtype, input_shape, state_shapes):
    """Runs ``genfast_module`` in ``dtype`` and a float64 copy of it on the same (rounded) inputs,
    backward through the same (rounded) loss weights; compares outputs, states and gradients."""
    gen = torch.Generator().manual_seed(7)
    rounded = lambda shape, g=gen: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    rounded_like = lambda o, g: rounded(o.shape, g).to(o.dtype)
    x, states = rounded(input_shape), [rounded(s) for s in state_shapes]
    results = []
    for run_dtype in (dtype, torch.float64):  # the float64 copy takes the rounded weights exactly
        module = genfast_module.to(run_dtype)
        leaves = [t.to(run_dtype, copy=True).requires_grad_(True) for t in (x, *states)]
        hx = None if not states else leaves[1] if len(states) == 1 else tuple(leaves[1:])
        module.zero_grad(set_to_none=True)
        outs = _flatten(module(leaves[0], hx))  # output and final states, or a cell's states
        loss_gen = torch.Generator().manual_seed(11)
        loss = sum((o * rounded_like(o, loss_gen)).sum() for o in outs)
        loss.backward()
        # cloned: the next .to() converts the parameters' .grad too
        grads = [t.grad.clone() for t in (*leaves, *module.parameters())]
        results.append(([o.detach() for o in outs], grads))
    (outs_r, grads_r), (outs_64, grads_64) = results
    u = UNIT_ROUNDOFF[dtype]
    for i, (got, want) in enumerate(zip(outs_r + grads_r, outs_64 + grads_64)):
        assert got.dtype == dtype, (i, got.dtype)
        bound = 2 * u * want.abs().max().item()
        error = (got.double() - want).abs().max().item()
        assert error <= bound, f"tensor {i}: error {error:.3g} > 2u * max|value| = {bound:.3g}"


def assert_reduced_precision_layer_and_cell(layer_cls, cell_cls, num_states, dtype, with_hx):
    """The check above for a bidirectional layer over (7, 3, 5) and a cell step over (3, 5), hidden size 6."""
    torch.manual_seed(3)
    layer_states = [(2, 3, 6)] * num_states if with_hx else []
    assert_reduced_precision_matches_float64(layer_cls(5, 6, bidirectional=True), dtype, (7, 3, 5), layer_states)
    cell_states = [(3, 6)] * num_states if with_hx else []
    assert_reduced_precision_matches_float64(cell_cls(5, 6), dtype, (3, 5), cell_states)
