"""Named providers: who computes each benchmarked op, built from one shared workload.

A workload holds a case's inputs and the torch module whose weights every provider
copies, so all providers compute the same function of the same numbers. A provider's
`build(workload)` returns a zero-argument callable that runs the op once (forward, or
forward + backward for training) and returns the forward output, or raises
Unavailable saying why it can't run here ("not built: <import error>", "needs CUDA",
"skipped: ...").

LayerNorm RNN:       genfast (genfast.nn.LayerNormLSTM/GRU), genfast_plain (genfast.nn.LSTM/GRU, same
                     weights), cell_loop (Python loop over genfast.reference's LN cell),
                     compiled_cell_loop (the same with the cell under torch.compile).
RNN providers:       genfast (genfast.nn.LSTM/GRU, kernels forced), routed (the same as users get it: on
                     CUDA genfast.routing may send it to cuDNN), persistent (kernels forced, the persistent
                     CUDA kernel of issue 20 on; unavailable where it would not run), flashrnn (FlashRNN at
                     one head with the same weights, CUDA, when the package is installed),
                     genfast_cell (genfast.nn.LSTMCell/GRUCell, decode cases), torch (nn.LSTM/GRU:
                     oneDNN/ATen on CPU, cuDNN on GPU), cell_loop (Python loop over nn.LSTMCell/GRUCell), reference
                     (genfast.reference equations), compiled_reference (torch.compile of it).
Attention providers: genfast (genfast.nn.functional.scaled_dot_product_attention),
                     genfast_triton (genfast.kernels.flash_attention, CUDA only),
                     torch_sdpa (F.scaled_dot_product_attention, default backend),
                     math (genfast.reference.attention: materialised softmax).
                     torch_sdpa_flash (SDPA restricted to its flash backend, CUDA).
IMDB providers:      genfast (the model with genfast.nn.LSTM layers), torch (with nn.LSTM).
GPT-2 providers:     genfast (genfast.generation.gpt2.GPT2.generate, greedy, KV cache; a CUDA graph
                     per decode step on CUDA), genfast_eager (the same with cuda_graph=False, CUDA),
                     transformers (GPT2LMHeadModel.generate on the same weights).
Decode attention:    genfast (torch.ops.genfast.decode_attention), launcher (the Triton launcher
                     called directly, skipping the dispatcher; CUDA), routed
                     (genfast.generation.decode.decode_attention: genfast.routing's choice), reference, torch_sdpa.
Sampling draw:       genfast (torch.ops.genfast.sampling_draw), whole_row (its kernels on the whole
                     vocabulary; CUDA), tile (a tile size and warp count; CUDA), routed
                     (genfast.generation.sampling.draw: genfast.routing's choice), reference.
Sentence VAE:        genfast (SentenceVAE on genfast.nn.GRU/LSTM), torch (the same on torch.nn.GRU/LSTM);
                     genfast/bench/vae.py.

Generation code is imported from genfast.generation.*; an older checkout's genfast.models.gpt2 and
genfast.nn.generation are accepted too, so that `--ab` can time a build from before the move.
"""
from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from genfast import reference


class Unavailable(Exception):
    """A provider that can't run here; `status` goes in the table, the message with it."""

    def __init__(self, status: str, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


def _import_genfast(module: str, *older: str):
    """Import `module`, or the first of `older` (its path in older checkouts, for --ab) that exists."""
    import importlib

    first_error = None
    for name in (module, *older):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not name.startswith(err.name):  # a missing dependency, not the module
                raise Unavailable("not built", f"{type(err).__name__}: {err}") from err
            first_error = first_error or err
        except ImportError as err:
            raise Unavailable("not built", f"{type(err).__name__}: {err}") from err
    raise Unavailable("not built", f"{type(first_error).__name__}: {first_error}") from first_error


def _genfast_op(name: str):
    """torch.ops.genfast.<name>, after importing what registers its kernels: genfast.generation.ops
    (the generation ops' fake and CUDA kernels), or genfast.ops in a checkout from before the move."""
    _import_genfast("genfast.generation.ops", "genfast.ops")
    try:
        return getattr(torch.ops.genfast, name)
    except (AttributeError, RuntimeError) as err:
        raise Unavailable("not built", f"torch.ops.genfast.{name} is not registered: {err}") from err


def _needs_cuda(device: str, what: str) -> None:
    if device != "cuda":
        raise Unavailable("needs CUDA", f"{what}; this run is on {device}")


def _kernels_forced(run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """run() with genfast.routing's rules off, so that it times genfast's kernel even at shapes the rules send to
    torch (the "routed" providers time the call as users get it). A checkout without genfast.routing has no rules."""
    try:
        from genfast import routing
    except ImportError:
        return run

    def forced():
        with routing.force_kernels():
            return run()
    return forced


# --------------------------------------------------------------------------------- RNN
@dataclass(eq=False)
class RnnWorkload:
    cell: str                    # "lstm" | "gru"
    module: nn.Module            # the torch nn.LSTM / nn.GRU every provider copies
    x: torch.Tensor              # (T, N, I) padded input
    packed: PackedSequence | None
    hx: tuple[torch.Tensor, ...]  # (h0,) or (h0, c0), each (1, N, H)
    training: bool
    device: str
    case_name: str
    input_grad: bool = False     # training: the input requires grad too (a fresh leaf each call)
    stepwise: bool = False       # one module call per time step, state carried (decoding)
    regularizers: tuple = ()     # (name, rate) pairs for genfast_regularized
    graph: bool = False          # CUDA: one inference call captured in a CUDA graph, replayed (issue 20)

    @property
    def stateful(self) -> bool:
        return self.cell == "lstm"

    def module_state(self):
        return self.hx if self.cell == "lstm" else self.hx[0]


def make_rnn_workload(case, device: str) -> RnnWorkload:
    p = case.params
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    torch.manual_seed(p.get("seed", 0))
    rnn_cls = nn.LSTM if p["cell"] == "lstm" else nn.GRU
    dtype = getattr(torch, p.get("dtype", "float32"))
    layers, dirs = p.get("layers", 1), 2 if p.get("bidirectional") else 1
    module = rnn_cls(p["input_size"], p["hidden_size"], num_layers=layers, bidirectional=dirs == 2).to(device, dtype)
    T, N = p["T"], p["N"]
    x = torch.randn(T, N, p["input_size"], generator=generator).to(device, dtype)
    packed = None
    if p.get("packed"):
        lengths = rnn_lengths(T, N, p.get("seed", 0))
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    states = 2 if p["cell"] == "lstm" else 1
    hx = tuple(torch.randn(layers * dirs, N, p["hidden_size"], generator=generator).to(device, dtype)
               for _ in range(states))
    if case.mode == "training":
        module.requires_grad_(True)
    if p.get("stepwise"):  # decoding starts from a zero state, as generation does
        hx = tuple(torch.zeros_like(h) for h in hx)
    return RnnWorkload(p["cell"], module, x, packed, hx, case.mode == "training", device, case.name,
                       bool(p.get("input_grad")), bool(p.get("stepwise")), tuple(p.get("regularizers", ())),
                       bool(p.get("graph")))


def rnn_lengths(T: int, N: int, seed: int) -> torch.Tensor:
    """Sequence lengths uniform in [T/3, T], fixed seed; the longest is always T."""
    generator = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(max(1, T // 3), T + 1, (N,), generator=generator)
    lengths[0] = T
    return lengths


def _finish(work, output: torch.Tensor) -> torch.Tensor:
    if work.training:
        output.sum().backward()
    return output.detach()


def _run_module(work: RnnWorkload, module: nn.Module) -> Callable[[], torch.Tensor]:
    if work.graph:
        return _graph_step(work, module)
    inputs = work.packed if work.packed is not None else work.x
    state = work.module_state()

    if work.stepwise:
        def run_steps():
            with torch.set_grad_enabled(work.training):
                carried, outputs = state, []
                for t in range(work.x.shape[0]):
                    out, carried = module(work.x[t:t + 1], carried)
                    outputs.append(out)
                return _finish(work, torch.cat(outputs))
        return run_steps

    if work.input_grad:
        def run_input_grad():
            with torch.set_grad_enabled(work.training):
                out, _ = module(work.x.detach().requires_grad_(), state)
                return _finish(work, out)
        return run_input_grad

    def run():
        with torch.set_grad_enabled(work.training):
            out, _ = module(inputs, state)
            return _finish(work, out.data if isinstance(out, PackedSequence) else out)

    return run


def torch_rnn(work: RnnWorkload):
    return _run_module(work, work.module)


def _forcing():
    """genfast.routing's rules off, or nothing in a checkout without them."""
    try:
        from genfast import routing
    except ImportError:
        return contextlib.nullcontext()
    return routing.force_kernels()


def _persistent_switch(on: bool):
    """The persistent RNN kernels (issue 20) on or off, or nothing in a checkout without them."""
    try:
        from genfast import rnn_persistent
    except ImportError:
        return contextlib.nullcontext()
    return rnn_persistent.enabled(on)


def genfast_rnn(work: RnnWorkload):
    """genfast.nn.LSTM/GRU on its per-step kernels: the rules off, the persistent kernels off whatever the
    environment says (a graph case captures under the same settings)."""
    if work.graph:
        with _forcing(), _persistent_switch(False):
            return routed_rnn(work)
    run = routed_rnn(work)

    def per_step_kernels():
        with _forcing(), _persistent_switch(False):
            return run()
    return per_step_kernels


def persistent_rnn(work: RnnWorkload):
    """genfast.nn.LSTM/GRU on the persistent kernels of issue 20 (GENFAST_RNN_PERSISTENT=1, kernels forced). One
    checked call first (a graph case: its capture): where the forward (or, training, the backward) took the
    per-step path the provider is unavailable, with the reason, so the column never times the per-step path under
    this name."""
    _needs_cuda(work.device, "the persistent RNN kernel is CUDA-only")
    persistent = _import_genfast("genfast.rnn_persistent")
    before = persistent.last_path()
    if work.graph:
        with _forcing(), persistent.enabled():
            run_persistent = routed_rnn(work)
    else:
        run = routed_rnn(work)

        def run_persistent():
            with _forcing(), persistent.enabled():
                return run()
        run_persistent()
    after = persistent.last_path()
    if after["persistent_layers"] <= before["persistent_layers"]:
        raise Unavailable("per-step", f"the persistent kernel did not run: {after['reason']}")
    # Training: the backward kernel too (a training row is never half persistent under this name).
    if work.training and after["persistent_backward_layers"] <= before.get("persistent_backward_layers", 0):
        raise Unavailable("per-step", f"the persistent backward did not run: {after['reason']}")
    return run_persistent


def _graph_step(work: RnnWorkload, module: nn.Module):
    """One inference call of ``module`` captured in a CUDA graph; the provider replays it (issue 20's single decode
    step, T=1). Warm-up on a side stream first, as torch.cuda.graphs asks; the kernels are chosen at capture, under
    the caller's settings."""
    _needs_cuda(work.device, "CUDA graphs")
    if work.training or work.packed is not None or work.stepwise:
        raise Unavailable("n/a", "graph cases: one padded inference call")
    state = work.module_state()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            module(work.x, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out, _ = module(work.x, state)

    def replay():
        graph.replay()
        return out
    return replay


def flashrnn_layer(cell: str, params: dict, x: torch.Tensor, states: torch.Tensor, backend: str = "cuda_fused"):
    """One FlashRNN layer at one head on torch.nn's weights (``params``: weight_ih_l0, weight_hh_l0, bias_ih_l0,
    bias_hh_l0). x (T, N, I); states (S, N, 1, 1, H), S = 2 for the LSTM (h, c), 1 for the GRU. Returns the output
    (T, N, H) and FlashRNN's final states. It takes the input projection precomputed: x @ W_ih^T runs in torch.
    Weights: W_hh as (G, 1, H, H); LSTM gates i, f, g, o with one bias b_ih + b_hh; GRU recurrent gates (n, r, z),
    input gates (r, z, n) and biases (b_hn, b_r, b_z, b_in)."""
    from flashrnn.flashrnn import flashrnn

    G, H = (4 if cell == "lstm" else 3), params["weight_hh_l0"].shape[1]
    T, N = x.shape[:2]
    Wx = (x @ params["weight_ih_l0"].T).view(T, N, G, 1, H).transpose(0, 1)
    R = params["weight_hh_l0"].view(G, 1, H, H)
    bi, bh = params["bias_ih_l0"].view(G, H), params["bias_hh_l0"].view(G, H)
    if cell == "lstm":
        b = (bi + bh).view(G, 1, H)
    else:
        R = torch.stack([R[2], R[0], R[1]])
        b = torch.stack([bh[2], bi[0] + bh[0], bi[1] + bh[1], bi[2]]).view(4, 1, H)
    out, last = flashrnn(Wx, R, b, states=states, function=cell, backend=backend,
                         dtype=str(x.dtype).removeprefix("torch."))
    return out[0, :, :, 0].transpose(0, 1), last


def flashrnn_rnn(work: RnnWorkload):
    """FlashRNN (Pöppel et al. 2024; the `flashrnn` package, its CUDA compiled on first use), a second baseline for
    issue 20: flashrnn_layer on the workload's weights, its cuda_fused backend."""
    _needs_cuda(work.device, "FlashRNN's kernels are CUDA-only")
    if work.cell not in ("lstm", "gru") or work.packed is not None:
        raise Unavailable("n/a", "FlashRNN provider: LSTM/GRU on padded sequences")
    if work.module.num_layers != 1 or work.module.bidirectional or work.module.bias is False:
        raise Unavailable("n/a", "FlashRNN provider: one layer, one direction, with biases")
    try:
        import flashrnn  # noqa: F401
    except ImportError as err:
        raise Unavailable("not installed", f"flashrnn: {err} (carry its wheel in .whl/, see docs/design.md)") from err
    params = {name: p.detach().clone().requires_grad_(work.training) for name, p in work.module.named_parameters()}
    N, H = work.x.shape[1], work.module.hidden_size
    first = torch.stack([h[0] for h in work.hx]).view(len(work.hx), N, 1, 1, H)

    if work.stepwise:
        def run_steps():
            with torch.set_grad_enabled(work.training):
                carried, outputs = first, []
                for t in range(work.x.shape[0]):
                    out, carried = flashrnn_layer(work.cell, params, work.x[t:t + 1], carried)
                    outputs.append(out)
                return _finish(work, torch.cat(outputs))
        return run_steps

    def run():
        with torch.set_grad_enabled(work.training):
            x = work.x.detach().requires_grad_() if work.input_grad else work.x
            return _finish(work, flashrnn_layer(work.cell, params, x, first)[0])
    return run


def routed_rnn(work: RnnWorkload):
    # genfast.nn.LSTM/GRU as users get it: on CUDA, genfast.routing may send the call to cuDNN.
    gnn = _import_genfast("genfast.nn")
    cls = gnn.LSTM if work.cell == "lstm" else gnn.GRU
    module = cls.from_torch(work.module).to(work.device)
    if work.cell == "gru_reset_before":
        module.reset_after = False
    return _run_module(work, module)


def genfast_regularized_rnn(work: RnnWorkload):
    """genfast.nn.LSTM/GRU with the case's regularisers (params["regularizers"], issue 19), same weights."""
    gnn = _import_genfast("genfast.nn")
    cls = gnn.LSTM if work.cell == "lstm" else gnn.GRU
    rates = dict(work.regularizers)
    try:
        module = cls(work.module.input_size, work.module.hidden_size, **rates)
    except TypeError as err:  # a checkout from before the regularisers (--ab)
        raise Unavailable("not built", f"{cls.__name__} takes no {sorted(rates)}: {err}") from err
    module.load_state_dict(work.module.state_dict())
    if work.cell == "gru_reset_before":
        module.reset_after = False
    return _run_module(work, module.to(work.device, next(work.module.parameters()).dtype))


def _torch_cell(work: RnnWorkload) -> nn.Module:
    m = work.module
    cls = nn.LSTMCell if work.cell == "lstm" else nn.GRUCell
    cell = cls(m.input_size, m.hidden_size).to(work.device, m.weight_ih_l0.dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(m, f"{name}_l0"))
    cell.requires_grad_(work.training)
    return cell


def _cell_loop(work: RnnWorkload, cell: nn.Module) -> Callable[[], torch.Tensor]:
    lstm = work.cell == "lstm"
    h0 = work.hx[0][0]
    c0 = work.hx[1][0] if lstm else None

    if work.packed is None:
        def run():
            with torch.set_grad_enabled(work.training):
                h, c = h0, c0
                outputs = []
                for x_t in work.x.unbind(0):
                    if lstm:
                        h, c = cell(x_t, (h, c))
                    else:
                        h = cell(x_t, h)
                    outputs.append(h)
                return _finish(work, torch.stack(outputs))
        return run

    packed = work.packed
    batch_sizes = packed.batch_sizes.tolist()
    # The packed rows are in sorted-by-length order; the initial state must follow it.
    order = packed.sorted_indices.to(h0.device)
    h0, c0 = h0[order], (c0[order] if lstm else None)

    def run_packed():
        with torch.set_grad_enabled(work.training):
            h, c = h0, c0
            outputs = []
            offset = 0
            for rows in batch_sizes:
                x_t = packed.data[offset:offset + rows]
                offset += rows
                if lstm:
                    h, c = cell(x_t, (h[:rows], c[:rows]))
                else:
                    h = cell(x_t, h[:rows])
                outputs.append(h)
            return _finish(work, torch.cat(outputs))
    return run_packed


def cell_loop(work: RnnWorkload):
    return _cell_loop(work, _torch_cell(work))


def genfast_cell(work: RnnWorkload):
    """genfast.nn.LSTMCell / GRUCell stepped from Python (the decode-step API)."""
    gnn = _import_genfast("genfast.nn")
    cls = gnn.LSTMCell if work.cell == "lstm" else gnn.GRUCell
    torch_cell = _torch_cell(work)
    cell = cls(torch_cell.input_size, torch_cell.hidden_size).to(work.device, torch_cell.weight_ih.dtype)
    cell.load_state_dict(torch_cell.state_dict())
    cell.requires_grad_(work.training)
    return _cell_loop(work, cell)


def _reference_fn(work: RnnWorkload) -> Callable[[torch.Tensor], torch.Tensor]:
    if work.packed is not None:
        raise Unavailable("skipped", "genfast.reference has no PackedSequence form (cell_loop covers it)")
    m = work.module
    w = [getattr(m, f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    h0 = work.hx[0][0]
    if work.cell == "lstm":
        c0 = work.hx[1][0]
        return lambda x: reference.lstm_layer(x, h0, c0, w[0], w[1], w[2], w[3])[0]
    if work.cell == "gru_reset_before":
        return lambda x: reference.gru_reset_before_layer(x, h0, w[0], w[1], w[2], w[3])[0]
    return lambda x: reference.gru_layer(x, h0, w[0], w[1], w[2], w[3])[0]


def reference_rnn(work: RnnWorkload):
    fn = _reference_fn(work)

    def run():
        with torch.set_grad_enabled(work.training):
            return _finish(work, fn(work.x))
    return run


# Compiling the reference loop unrolls it T times; on a small CPU that can take minutes.
# A child process tries first, under a time limit; only if it finishes does this process
# compile (then mostly from the on-disk cache the child filled).
COMPILE_TIMEOUT_S = float(os.environ.get("GENFAST_BENCH_COMPILE_TIMEOUT", "120"))


def compiled_reference_rnn(work: RnnWorkload, probe: bool = True):
    fn = _reference_fn(work)
    if probe:
        _probe_compile(work.case_name, work.device)
    # Each case compiles afresh: dynamo's per-code-object recompile limit would otherwise
    # turn later cases silently back into eager code.
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)

    def run():
        with torch.set_grad_enabled(work.training):
            return _finish(work, compiled(work.x))
    return run


def _probe_compile(case_name: str, device: str) -> None:
    command = [sys.executable, "-m", "genfast.bench.compile_probe", case_name, device,
               str(torch.get_num_threads())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Unavailable("skipped", f"compile > {COMPILE_TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no message)"]
        message = next((line for line in reversed(lines) if "Error" in line), lines[-1])
        raise Unavailable("error", f"does not compile: {message.strip()}")


# The GRU with the reset gate before the product (cases gru_reset_before.*): what a user has without
# genfast is a Python loop over the cell (the `reference` provider: genfast.reference's loop), or that
# loop with the cell compiled; and genfast's plain GRU on the same weights shows what the second
# product of each step costs against torch's GRU equations.
def compiled_cell_loop_rnn(work: RnnWorkload):
    """The Python loop of genfast.reference.gru_reset_before_layer with its cell under torch.compile."""
    if work.cell != "gru_reset_before" or work.packed is not None:
        raise Unavailable("skipped", "compiled_cell_loop: padded gru_reset_before cases only")
    m = work.module
    w = [getattr(m, f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    h0 = work.hx[0][0]
    torch._dynamo.reset()
    cell = torch.compile(reference.gru_reset_before_cell, dynamic=False)

    def run():
        with torch.set_grad_enabled(work.training):
            return _finish(work, reference.gru_reset_before_layer(work.x, h0, *w, cell=cell)[0])
    return run


def genfast_gru_rnn(work: RnnWorkload):
    """genfast.nn.GRU (reset gate after the product, torch's equations) on the same weights and input."""
    if work.cell != "gru_reset_before":
        raise Unavailable("skipped", "genfast_gru: gru_reset_before cases only")
    gnn = _import_genfast("genfast.nn")
    return _run_module(work, gnn.GRU.from_torch(work.module).to(work.device))


# ------------------------------------------------------------- layer-normalised RNN (issue 19)
@dataclass(eq=False)
class LayerNormRnnWorkload:
    cell: str                     # "layernorm_lstm" | "layernorm_gru"
    module: nn.Module             # genfast.nn.LayerNormLSTM / LayerNormGRU: the weights every provider uses
    x: torch.Tensor               # (T, N, I)
    hx: tuple[torch.Tensor, ...]  # (h0,) or (h0, c0), each (1, N, H)
    training: bool
    regularizers: tuple = ()      # (name, rate) pairs for genfast_regularized

    @property
    def lstm(self) -> bool:
        return self.cell == "layernorm_lstm"


def make_layernorm_rnn_workload(case, device: str) -> LayerNormRnnWorkload:
    gnn = _import_genfast("genfast.nn")
    if not hasattr(gnn, "LayerNormLSTM"):
        raise Unavailable("not built", "this genfast has no LayerNormLSTM / LayerNormGRU")
    p = case.params
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    torch.manual_seed(p.get("seed", 0))
    lstm = p["cell"] == "layernorm_lstm"
    module = (gnn.LayerNormLSTM if lstm else gnn.LayerNormGRU)(p["input_size"], p["hidden_size"]).to(device)
    with torch.no_grad():  # gains and biases off their initial 1 / 0, as a trained layer's are
        for name, param in module.named_parameters():
            if name.startswith("ln_"):
                param.add_(0.1 * torch.randn(param.shape, generator=generator).to(device))
    module.requires_grad_(case.mode == "training")
    T, N, H = p["T"], p["N"], p["hidden_size"]
    x = torch.randn(T, N, p["input_size"], generator=generator).to(device)
    hx = tuple(torch.randn(1, N, H, generator=generator).to(device) for _ in range(2 if lstm else 1))
    return LayerNormRnnWorkload(p["cell"], module, x, hx, case.mode == "training", tuple(p.get("regularizers", ())))


def genfast_layernorm_rnn(work: LayerNormRnnWorkload):
    state = work.hx if work.lstm else work.hx[0]

    def run():
        with torch.set_grad_enabled(work.training):
            return _finish(work, work.module(work.x, state)[0])
    return run


def genfast_regularized_layernorm_rnn(work: LayerNormRnnWorkload):
    """The LN module with the case's regularisers (params["regularizers"], issue 19), same weights."""
    m = work.module
    try:
        module = type(m)(m.input_size, m.hidden_size, **dict(work.regularizers)).to(work.x.device)
    except (TypeError, NotImplementedError) as err:  # a checkout from before the LN regularisers (--ab)
        raise Unavailable("not built", f"{type(m).__name__} takes no {dict(work.regularizers)}: {err}") from err
    module.load_state_dict(m.state_dict())
    module.requires_grad_(work.training)
    state = work.hx if work.lstm else work.hx[0]

    def run():
        with torch.set_grad_enabled(work.training):
            return _finish(work, module(work.x, state)[0])
    return run


def genfast_plain_rnn(work: LayerNormRnnWorkload):
    """genfast.nn.LSTM / GRU with the same W_ih, W_hh and biases (no LN): LN's cost over the plain cell."""
    gnn = _import_genfast("genfast.nn")
    m = work.module
    plain = (gnn.LSTM if work.lstm else gnn.GRU)(m.input_size, m.hidden_size).to(work.x.device)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("ln_")})
    plain.requires_grad_(work.training)
    state = work.hx if work.lstm else work.hx[0]

    def run():
        with torch.set_grad_enabled(work.training):
            return _finish(work, plain(work.x, state)[0])
    return run


def _layernorm_cell_loop(work: LayerNormRnnWorkload, cell_fn) -> Callable[[], torch.Tensor]:
    """A Python loop over time steps calling cell_fn (genfast.reference's cell, or a compiled copy)."""
    weights = work.module._layer_weights(0)
    h0 = work.hx[0][0]
    c0 = work.hx[1][0] if work.lstm else None

    def run():
        with torch.set_grad_enabled(work.training):
            h, c, outputs = h0, c0, []
            for x_t in work.x.unbind(0):
                if work.lstm:
                    h, c = cell_fn(x_t, h, c, *weights)
                else:
                    h = cell_fn(x_t, h, *weights)
                outputs.append(h)
            return _finish(work, torch.stack(outputs))
    return run


def _layernorm_cell(work: LayerNormRnnWorkload):
    return reference.layernorm_lstm_cell if work.lstm else reference.layernorm_gru_cell


def layernorm_cell_loop(work: LayerNormRnnWorkload):
    return _layernorm_cell_loop(work, _layernorm_cell(work))


def compiled_layernorm_cell_loop(work: LayerNormRnnWorkload):
    # One step compiled (not the unrolled loop), so it compiles in seconds; a fresh compile per case.
    torch._dynamo.reset()
    return _layernorm_cell_loop(work, torch.compile(_layernorm_cell(work), dynamic=False))


# --------------------------------------------------------------------------- attention
# The math baseline materialises B*H*L*L scores (and as much again for the softmax);
# beyond this it would push a small machine into swap, so it is skipped, saying so.
MATH_SCORES_LIMIT_BYTES = 2 * 2**30


@dataclass(eq=False)
class PackedBatch:
    """A batch of sequences of different lengths (issue 23's varlen cases): q, k, v are packed
    (total, H, D) and the workload's leaves; the dense providers pad them to (B, H, max_len, D) inside
    the timed call and mask the padded keys, the varlen provider runs them as they are."""
    cu_seqlens: torch.Tensor   # int32 (B + 1)
    max_len: int
    valid: torch.Tensor        # bool (B, max_len): the real rows of the padded layout

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*self.valid.shape, *x.shape[1:])
        out[self.valid] = x
        return out.transpose(1, 2)

    def key_mask(self) -> torch.Tensor:
        return self.valid[:, None, None, :]  # (B, 1, 1, L): True = attend

    def unpad(self, out: torch.Tensor) -> torch.Tensor:
        return out.transpose(1, 2)[self.valid]


@dataclass(eq=False)
class AttentionWorkload:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    training: bool
    device: str
    grad_out: torch.Tensor | None = None  # training: the output's gradient (None: that of out.sum())
    attn_mask: torch.Tensor | None = None  # passed to every provider (a stride-0 broadcast view)
    dropout_p: float = 0.0
    packed: PackedBatch | None = None


def _attention_mask(kind: str, B: int, heads: int, Lq: int, L: int, generator, device, dtype) -> torch.Tensor:
    """key_padding: bool (B, 1, 1, L), row b keeps its first n_b keys, n_b uniform in [L/2, L];
    bias: an additive (1, heads, Lq, L) float bias in the inputs' dtype (ALiBi-like slopes plus noise)."""
    if kind == "key_padding":
        lengths = torch.randint(L // 2, L + 1, (B,), generator=generator)
        return (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :].to(device)
    if kind == "bias":
        slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
        distance = (torch.arange(Lq)[:, None] - torch.arange(L)[None, :]).abs()
        bias = -slopes[:, None, None] * distance + 0.1 * torch.randn(heads, Lq, L, generator=generator)
        return bias[None].to(device=device, dtype=dtype)
    raise ValueError(f"unknown attention mask kind {kind!r}")


def make_attention_workload(case, device: str) -> AttentionWorkload:
    p = case.params
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    # fp16 on a GPU unless the case names a dtype; fp32 on the CPU.
    dtype = getattr(torch, p.get("dtype", "float16")) if device == "cuda" else torch.float32
    training = case.mode == "training"
    if "lengths" in p:  # a packed batch of B sequences, lengths uniform in p["lengths"]
        lengths = varlen_lengths(p["B"], *p["lengths"], p.get("seed", 0))
        q, k, v = (torch.randn(int(lengths.sum()), p["heads"], p["D"], generator=generator)
                   .to(device=device, dtype=dtype).requires_grad_(training) for _ in range(3))
        cu = torch.zeros(p["B"] + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        max_len = int(lengths.max())
        valid = torch.arange(max_len)[None, :] < lengths[:, None]
        packed = PackedBatch(cu.to(device), max_len, valid.to(device))
        return AttentionWorkload(q, k, v, p["causal"], training, device, None, packed=packed)
    # Lq: query rows when fewer than the keys (a decode-shaped call); else L for both.
    shapes = [(p["B"], p["heads"], p.get("Lq", p["L"]), p["D"])] + [(p["B"], p["heads"], p["L"], p["D"])] * 2
    q, k, v = (torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
               .requires_grad_(training) for shape in shapes)
    grad_out = None
    if p.get("grad_out") and training:
        grad_out = torch.randn(shapes[0], generator=generator).to(device=device, dtype=dtype)
    attn_mask = None
    if p.get("mask"):
        attn_mask = _attention_mask(p["mask"], p["B"], p["heads"], shapes[0][2], p["L"], generator, device, dtype)
    return AttentionWorkload(q, k, v, p["causal"], training, device, grad_out, attn_mask, p.get("dropout_p", 0.0))


def _run_attention(work: AttentionWorkload, fn) -> Callable[[], torch.Tensor]:
    """fn(q, k, v, causal, attn_mask, dropout_p) timed with its backward in training; a packed batch is
    padded (its key padding as the mask) and the real rows gathered back, inside the call."""
    def attend(q, k, v):
        if work.packed is None:
            return fn(q, k, v, work.causal, work.attn_mask, work.dropout_p)
        packed = work.packed
        out = fn(packed.pad(q), packed.pad(k), packed.pad(v), work.causal, packed.key_mask(), work.dropout_p)
        return packed.unpad(out)

    def run():
        with torch.set_grad_enabled(work.training):
            out = attend(work.q, work.k, work.v)
            if work.grad_out is None:
                return _finish(work, out)
            work.q.grad = work.k.grad = work.v.grad = None  # no accumulation into the last call's
            out.backward(work.grad_out)
            return out.detach()
    return run


def genfast_sdpa(work: AttentionWorkload):
    functional = _import_genfast("genfast.nn.functional")
    return _run_attention(work, lambda q, k, v, causal, mask, p: functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal))


def genfast_triton(work: AttentionWorkload):
    _needs_cuda(work.device, "Triton kernel")
    flash = _import_genfast("genfast.kernels.flash_attention")
    return _run_attention(work, lambda q, k, v, causal, mask, p: flash.flash_attention(
        q, k, v, causal=causal, attn_mask=mask, dropout_p=p))


def genfast_triton_varlen(work: AttentionWorkload):
    """The packed batch as it is, through the Triton varlen kernel (no padding, no mask)."""
    _needs_cuda(work.device, "Triton kernel")
    if work.packed is None:
        raise Unavailable("skipped", "not a packed batch")
    flash = _import_genfast("genfast.kernels.flash_attention")
    packed = work.packed

    def run():
        with torch.set_grad_enabled(work.training):
            out = flash.flash_attention_varlen(work.q, work.k, work.v, packed.cu_seqlens, packed.cu_seqlens,
                                               packed.max_len, packed.max_len, causal=work.causal,
                                               dropout_p=work.dropout_p)
            return _finish(work, out)
    return run


def torch_sdpa(work: AttentionWorkload):
    return _run_attention(work, lambda q, k, v, causal, mask, p: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal))


def torch_sdpa_flash(work: AttentionWorkload):
    _needs_cuda(work.device, "SDPA's flash backend")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v, causal, mask, p):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                                    is_causal=causal)
    return _run_attention(work, flash)


def math_attention(work: AttentionWorkload):
    B, H, Lq, _ = work.q.shape
    scores_bytes = B * H * Lq * work.k.shape[2] * work.q.element_size()
    limit = MATH_SCORES_LIMIT_BYTES
    if work.device == "cuda":  # scores, softmax and (training) their gradients must fit with room
        limit = torch.cuda.get_device_properties(0).total_memory // 8
    if scores_bytes > limit:
        raise Unavailable("skipped", f"would materialise {scores_bytes / 2**30:.1f} GiB of scores")
    return _run_attention(work, lambda q, k, v, causal, mask, p: reference.attention(q, k, v, attn_mask=mask,
                                                                                      is_causal=causal))


# ------------------------------------------------------------------ variable-length attention
# genfast.nn.functional.flash_attn_varlen on a packed batch, against the same batch padded to its
# longest sequence with a key-padding mask (torch's SDPA; genfast's dense kernel). Every provider
# returns the packed (total, H, D) output, so the padded ones pay a gather of their valid rows
# (O(total * H * D), next to the O(B * L^2 * H * D) attention) for the agreement check.

def varlen_lengths(B: int, min_len: int, max_len: int, seed: int) -> torch.Tensor:
    """B sequence lengths uniform in [min_len, max_len], fixed by the seed (the workload's and the FLOP count's)."""
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(min_len, max_len + 1, (B,), generator=generator)


@dataclass(eq=False)
class VarlenAttentionWorkload:
    q: torch.Tensor            # packed (total, H, D)
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor   # int32 (B + 1)
    max_len: int
    valid: torch.Tensor        # bool (B, max_len): the real rows of the padded layout
    causal: bool
    training: bool
    device: str


def make_varlen_attention_workload(case, device: str) -> VarlenAttentionWorkload:
    p = case.params
    lengths = varlen_lengths(p["B"], p["min_len"], p["max_len"], p.get("seed", 0))
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    total = int(lengths.sum())
    q, k, v = (torch.randn(total, p["heads"], p["D"], generator=generator).to(device)
               .requires_grad_(case.mode == "training") for _ in range(3))
    cu = torch.zeros(p["B"] + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    max_len = int(lengths.max())
    valid = torch.arange(max_len)[None, :] < lengths[:, None]
    return VarlenAttentionWorkload(q, k, v, cu.to(device), max_len, valid.to(device), p["causal"],
                                   case.mode == "training", device)


def genfast_varlen(work: VarlenAttentionWorkload):
    functional = _import_genfast("genfast.nn.functional")
    if not hasattr(functional, "flash_attn_varlen"):
        raise Unavailable("not built", "genfast.nn.functional has no flash_attn_varlen in this checkout")

    def run():
        with torch.set_grad_enabled(work.training):
            return _finish(work, functional.flash_attn_varlen(work.q, work.k, work.v, work.cu_seqlens,
                                                              work.cu_seqlens, work.max_len, work.max_len,
                                                              causal=work.causal))
    return run


def _padded(work: VarlenAttentionWorkload, sdpa) -> Callable[[], torch.Tensor]:
    """Pad q, k, v to (B, H, max_len, D), mask the padded keys, attend, gather the real rows."""
    B, L = work.valid.shape
    key_mask = work.valid[:, None, None, :]  # (B, 1, 1, L): True = keep

    def pad(x):
        out = x.new_zeros(B, L, *x.shape[1:])
        out[work.valid] = x
        return out.transpose(1, 2)

    def run():
        with torch.set_grad_enabled(work.training):
            out = sdpa(pad(work.q), pad(work.k), pad(work.v), key_mask, work.causal)
            return _finish(work, out.transpose(1, 2)[work.valid])
    return run


def torch_sdpa_padded(work: VarlenAttentionWorkload):
    if work.causal:
        raise Unavailable("skipped", "causal with a key-padding mask needs a combined mask; not benchmarked")
    return _padded(work, lambda q, k, v, mask, causal: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask))


def genfast_padded(work: VarlenAttentionWorkload):
    functional = _import_genfast("genfast.nn.functional")
    if work.causal:
        raise Unavailable("skipped", "causal with a key-padding mask needs a combined mask; not benchmarked")
    return _padded(work, lambda q, k, v, mask, causal: functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask))


# -------------------------------------------------------------------------------- IMDB
class ImdbModel(nn.Module):
    """Embedding(vocab, 256) -> LSTM(64, sequences) -> LSTM(64, last state) -> Linear -> sigmoid."""

    def __init__(self, vocab: int, embed: int, hidden: int, lstm_cls=nn.LSTM):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm1 = lstm_cls(embed, hidden, batch_first=True)
        self.lstm2 = lstm_cls(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.lstm1(self.embedding(tokens))
        _, (h_last, _) = self.lstm2(sequence)
        return torch.sigmoid(self.head(h_last[-1])).squeeze(-1)


@dataclass(eq=False)
class ImdbWorkload:
    model: ImdbModel             # initial weights, shared by every provider (each copies it)
    batches: list[torch.Tensor]  # synthetic token batches (B, T)
    labels: list[torch.Tensor]   # 0/1 float labels (B,)
    training: bool
    device: str
    lr: float


def make_imdb_workload(case, device: str) -> ImdbWorkload:
    p = case.params
    torch.manual_seed(p.get("seed", 0))
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    model = ImdbModel(p["vocab"], p["embed"], p["hidden"]).to(device)
    batches = [torch.randint(0, p["vocab"], (p["batch"], p["T"]), generator=generator).to(device)
               for _ in range(p["steps_checked"])]
    labels = [torch.randint(0, 2, (p["batch"],), generator=generator).float().to(device)
              for _ in range(p["steps_checked"])]
    return ImdbWorkload(model, batches, labels, case.mode == "training", device, p.get("lr", 1e-3))


def imdb_model_for(provider: str, work: ImdbWorkload) -> ImdbModel:
    model = copy.deepcopy(work.model)
    if provider == "genfast":
        gnn = _import_genfast("genfast.nn")
        model.lstm1 = gnn.LSTM.from_torch(model.lstm1).to(work.device)
        model.lstm2 = gnn.LSTM.from_torch(model.lstm2).to(work.device)
    return model


def imdb_train_losses(provider: str, work: ImdbWorkload) -> list[float]:
    """Loss of each of len(work.batches) Adam steps from the shared initial weights."""
    model = imdb_model_for(provider, work)
    optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
    losses = []
    for tokens, labels in zip(work.batches, work.labels):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.binary_cross_entropy(model(tokens), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _imdb_provider(provider: str):
    def build(work: ImdbWorkload):
        model = imdb_model_for(provider, work)
        tokens, labels = work.batches[0], work.labels[0]
        if not work.training:
            model.eval()

            def infer():
                with torch.no_grad():
                    return model(tokens)
            return infer
        optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            probabilities = model(tokens)
            nn.functional.binary_cross_entropy(probabilities, labels).backward()
            optimizer.step()
            return probabilities.detach()
        return train_step
    return build


# ------------------------------------------------------------------------------- GPT-2
@dataclass(eq=False)
class GenerationWorkload:
    hf_model: nn.Module          # transformers.GPT2LMHeadModel, random weights (no download)
    prompt: torch.Tensor         # (rows, prompt_len) token ids: rows sequences decoded together
    new_tokens: int
    params: int                  # parameter count: a decode step streams this x the element size in bytes
    device: str
    dtype: torch.dtype = torch.float32


def make_generation_workload(case, device: str) -> GenerationWorkload:
    p = case.params
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise Unavailable("not built", f"transformers is needed to build the model: {err}") from err
    torch.manual_seed(p.get("seed", 0))
    hf = GPT2LMHeadModel(GPT2Config(**p.get("config", {}))).eval()
    hf.generation_config.eos_token_id = None  # every run generates all new_tokens
    hf.generation_config.pad_token_id = None
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    prompt = torch.randint(0, hf.config.vocab_size, (p.get("rows", 1), p["prompt_len"]), generator=generator).to(device)
    # Counted like genfast's model: the tied output projection once.
    params = sum(t.numel() for t in hf.parameters())
    dtype = getattr(torch, p.get("dtype", "float32"))
    # Every provider converts the same float32 weights: genfast's copy is taken before the cast.
    work = GenerationWorkload(hf, prompt, p["new_tokens"], params, device, dtype)
    work.hf_model = hf.to(device, dtype)
    return work


def _genfast_gpt2(work: GenerationWorkload):
    gpt2 = _import_genfast("genfast.generation.gpt2", "genfast.models.gpt2")
    return gpt2.GPT2.from_hf(work.hf_model.float()).to(work.device, work.dtype).eval()


def genfast_generate(work: GenerationWorkload):
    model = _genfast_gpt2(work)
    work.hf_model.to(work.dtype)  # back to the case's dtype after the float32 copy
    return lambda: model.generate(work.prompt, work.new_tokens)[:, work.prompt.shape[1]:]


def genfast_generate_eager(work: GenerationWorkload):
    _needs_cuda(work.device, "the eager variant of the CUDA-graph decode")
    model = _genfast_gpt2(work)
    work.hf_model.to(work.dtype)
    return lambda: model.generate(work.prompt, work.new_tokens, cuda_graph=False)[:, work.prompt.shape[1]:]


def transformers_generate(work: GenerationWorkload):
    def run():
        with torch.inference_mode():
            out = work.hf_model.generate(work.prompt, attention_mask=torch.ones_like(work.prompt),
                                         max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens,
                                         do_sample=False)
        return out[:, work.prompt.shape[1]:]
    return run


# ----------------------------------------------------------------------------- sampling
@dataclass(eq=False)
class SamplingWorkload:
    logits: torch.Tensor         # (rows, vocab)
    temperature: float
    top_k: int
    top_p: float
    seed: int


def make_sampling_workload(case, device: str) -> SamplingWorkload:
    p = case.params
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    logits = (torch.randn(p["rows"], p["vocab"], generator=generator) * p["spread"]).to(device)
    return SamplingWorkload(logits, p["temperature"], p["top_k"], p["top_p"], p.get("seed", 0))


def _seeded(work: SamplingWorkload) -> torch.Generator:
    return torch.Generator(work.logits.device).manual_seed(work.seed)


def genfast_sample(work: SamplingWorkload):
    generation = _import_genfast("genfast.generation.sampling", "genfast.nn.generation")
    generator = _seeded(work)
    return lambda: generation.sample(work.logits, work.temperature, work.top_k, work.top_p, generator=generator)


def reference_sample(work: SamplingWorkload):
    # The same uniforms as genfast's sample (one torch.rand per row from a generator seeded alike),
    # so the first tokens must agree; the filter sorts the vocabulary, as HF's top-p does.
    from genfast import reference

    generator = _seeded(work)

    def run():
        uniforms = torch.rand(work.logits.shape[0], generator=generator, dtype=torch.float64,
                              device=work.logits.device)
        scores = reference.process_logits(work.logits, work.temperature, work.top_k, work.top_p)
        return reference.draw_from_scores(scores, uniforms)
    return run


def transformers_sample(work: SamplingWorkload):
    # What transformers' generate does per step when sampling: its warpers, softmax, multinomial.
    try:
        from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)
    except ImportError as err:
        raise Unavailable("not built", f"transformers is not installed: {err}") from err
    warpers = LogitsProcessorList([TemperatureLogitsWarper(work.temperature)]
                                  + ([TopKLogitsWarper(work.top_k)] if work.top_k else [])
                                  + ([TopPLogitsWarper(work.top_p)] if work.top_p < 1 else []))
    generator = _seeded(work)

    def run():
        scores = warpers(None, work.logits)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    return run


# --------------------------------------------------------------- decode attention (GPU session)
@dataclass(eq=False)
class DecodeAttentionWorkload:
    q: torch.Tensor              # (B, Hq, D): one query row per head
    k: torch.Tensor              # (B, Hkv, L, D): the KV cache
    v: torch.Tensor
    length: int
    scale: float
    device: str


def make_decode_attention_workload(case, device: str) -> DecodeAttentionWorkload:
    p = case.params
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    dtype = getattr(torch, p["dtype"])
    q = torch.randn(p["B"], p["heads_q"], p["D"], generator=generator).to(device, dtype)
    k, v = (torch.randn(p["B"], p["heads_kv"], p["L"], p["D"], generator=generator).to(device, dtype)
            for _ in range(2))
    return DecodeAttentionWorkload(q, k, v, p["L"], p["D"] ** -0.5, device)


def genfast_decode_attention(work: DecodeAttentionWorkload):
    op = _genfast_op("decode_attention")
    return lambda: op(work.q, work.k, work.v, work.length, work.scale)


def launcher_decode_attention(work: DecodeAttentionWorkload):
    # The Triton launcher without the torch.ops dispatch: what the dispatch adds per call.
    _needs_cuda(work.device, "the Triton launcher")
    kernels = _import_genfast("genfast.kernels")
    launch = kernels.load("decode_attention", "decode_attention").decode_attention
    return lambda: launch(work.q, work.k, work.v, work.length, work.scale)


def routed_decode_attention(work: DecodeAttentionWorkload):
    # genfast.generation.decode.decode_attention, what GPT-2's decode step calls: routed by genfast.routing.
    decode = _import_genfast("genfast.generation.decode")
    return lambda: decode.decode_attention(work.q, work.k, work.v, work.length, work.scale)


def reference_decode_attention(work: DecodeAttentionWorkload):
    return lambda: reference.attention(work.q[:, :, None], work.k, work.v, scale=work.scale,
                                       enable_gqa=True)[:, :, 0]


def torch_sdpa_decode_attention(work: DecodeAttentionWorkload):
    gqa = work.q.shape[1] != work.k.shape[1]
    return lambda: torch.nn.functional.scaled_dot_product_attention(
        work.q[:, :, None], work.k, work.v, scale=work.scale, enable_gqa=gqa)[:, :, 0]


# ------------------------------------------------------------------ sampling draw (GPU session)
@dataclass(eq=False)
class SamplingDrawWorkload:
    logits: torch.Tensor         # (rows, vocab), N(0, 9)
    uniforms: torch.Tensor       # (rows,) float64: the draw's uniform numbers, fixed
    settings: tuple              # (temperature, top_k, top_p)
    warps: int | None
    block: int | None
    device: str


def make_sampling_draw_workload(case, device: str) -> SamplingDrawWorkload:
    p = case.params
    generator = torch.Generator().manual_seed(p.get("seed", 0))
    logits = (torch.randn(p["rows"], p["vocab"], generator=generator) * 3).to(device)
    uniforms = torch.rand(p["rows"], generator=generator, dtype=torch.float64).to(device)
    return SamplingDrawWorkload(logits, uniforms, (p["temperature"], p["top_k"], p["top_p"]), p.get("warps"),
                                p.get("block"), device)


def genfast_sampling_draw(work: SamplingDrawWorkload):
    op = _genfast_op("sampling_draw")
    return lambda: op(work.logits, work.uniforms, *work.settings)


def _sampling_kernels(work: SamplingDrawWorkload):
    _needs_cuda(work.device, "a Triton kernel variant")
    return _import_genfast("genfast.kernels").load("sampling", "sampling")


def whole_row_sampling_draw(work: SamplingDrawWorkload):
    sampling = _sampling_kernels(work)
    return lambda: sampling.sampling_draw(work.logits, work.uniforms, *work.settings, candidates=False)


def tile_sampling_draw(work: SamplingDrawWorkload):
    sampling = _sampling_kernels(work)

    def run():
        default_warps, sampling._NUM_WARPS = sampling._NUM_WARPS, work.warps
        try:
            return sampling.sampling_draw(work.logits, work.uniforms, *work.settings, block=work.block)
        finally:
            sampling._NUM_WARPS = default_warps
    return run


def routed_sampling_draw(work: SamplingDrawWorkload):
    # genfast.generation.sampling.draw (sample() at given uniforms): routed by genfast.routing.
    sampling = _import_genfast("genfast.generation.sampling")
    if not hasattr(sampling, "draw"):
        raise Unavailable("not built", "genfast.generation.sampling has no draw() in this checkout")
    return lambda: sampling.draw(work.logits, work.uniforms, *work.settings)


def reference_sampling_draw(work: SamplingDrawWorkload):
    return lambda: reference.draw_from_scores(reference.process_logits(work.logits, *work.settings), work.uniforms)


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable
    description: str


PROVIDERS: dict[str, dict[str, Provider]] = {
    "rnn": {p.name: p for p in (
        Provider("genfast", genfast_rnn, "genfast.nn.LSTM/GRU, its kernels forced (no routing)"),
        Provider("routed", routed_rnn, "genfast.nn.LSTM/GRU as users get it (genfast.routing may pick cuDNN)"),
        Provider("persistent", persistent_rnn, "genfast.nn.LSTM/GRU on the persistent CUDA kernel (issue 20, opt-in)"),
        Provider("flashrnn", flashrnn_rnn, "FlashRNN (flashrnn package, cuda_fused backend), one head, same weights"),
        Provider("genfast_cell", genfast_cell, "genfast.nn.LSTMCell/GRUCell"),
        Provider("genfast_regularized", genfast_regularized_rnn, "genfast.nn.LSTM/GRU with the case's regularisers"),
        Provider("torch", torch_rnn, "torch.nn.LSTM/GRU (oneDNN/ATen on CPU, cuDNN on GPU)"),
        Provider("cell_loop", cell_loop, "Python loop over torch.nn.LSTMCell/GRUCell"),
        Provider("reference", reference_rnn, "genfast.reference equations"),
        Provider("compiled_reference", compiled_reference_rnn, "torch.compile(genfast.reference)"),
        Provider("compiled_cell_loop", compiled_cell_loop_rnn, "genfast.reference's loop, its cell compiled"),
        Provider("genfast_gru", genfast_gru_rnn, "genfast.nn.GRU, reset gate after the product"),
    )},
    "layernorm_rnn": {p.name: p for p in (
        Provider("genfast", genfast_layernorm_rnn, "genfast.nn.LayerNormLSTM/LayerNormGRU"),
        Provider("genfast_plain", genfast_plain_rnn, "genfast.nn.LSTM/GRU, same weights, no LN"),
        Provider("genfast_regularized", genfast_regularized_layernorm_rnn, "the LN module with the case's regularisers"),
        Provider("cell_loop", layernorm_cell_loop, "Python loop over genfast.reference's LN cell (eager)"),
        Provider("compiled_cell_loop", compiled_layernorm_cell_loop, "the same loop, the cell torch.compile'd"),
    )},
    "attention": {p.name: p for p in (
        Provider("genfast", genfast_sdpa, "genfast.nn.functional.scaled_dot_product_attention"),
        Provider("genfast_triton", genfast_triton, "genfast.kernels.flash_attention (Triton)"),
        Provider("genfast_triton_varlen", genfast_triton_varlen,
                 "genfast.kernels.flash_attention.flash_attention_varlen (Triton, packed batch)"),
        Provider("torch_sdpa", torch_sdpa, "torch F.scaled_dot_product_attention (default backend)"),
        Provider("torch_sdpa_flash", torch_sdpa_flash, "torch F.scaled_dot_product_attention, flash backend"),
        Provider("math", math_attention, "genfast.reference.attention (materialised softmax)"),
    )},
    "varlen_attention": {p.name: p for p in (
        Provider("genfast", genfast_varlen, "genfast.nn.functional.flash_attn_varlen (packed batch)"),
        Provider("torch_sdpa_padded", torch_sdpa_padded, "padded batch + key-padding mask, torch F.scaled_dot_product_attention"),
        Provider("genfast_padded", genfast_padded, "padded batch + key-padding mask, genfast's dense kernel"),
    )},
    "imdb": {p.name: p for p in (
        Provider("genfast", _imdb_provider("genfast"), "IMDB model with genfast.nn.LSTM"),
        Provider("torch", _imdb_provider("torch"), "IMDB model with torch.nn.LSTM"),
    )},
    "generation": {p.name: p for p in (
        Provider("genfast", genfast_generate, "genfast.generation.gpt2.GPT2.generate (KV cache)"),
        Provider("genfast_eager", genfast_generate_eager, "the same with cuda_graph=False"),
        Provider("transformers", transformers_generate, "transformers GPT2LMHeadModel.generate"),
    )},
    "sampling": {p.name: p for p in (
        Provider("genfast", genfast_sample, "genfast.generation.sampling.sample (fused filter and draw)"),
        Provider("reference", reference_sample, "genfast.reference.process_logits + draw_from_scores"),
        Provider("transformers", transformers_sample, "transformers' warpers + softmax + multinomial"),
    )},
    "decode_attention": {p.name: p for p in (
        Provider("genfast", genfast_decode_attention, "torch.ops.genfast.decode_attention"),
        Provider("launcher", launcher_decode_attention, "the Triton launcher, called without the dispatcher"),
        Provider("routed", routed_decode_attention, "genfast.generation.decode.decode_attention (genfast.routing)"),
        Provider("reference", reference_decode_attention, "genfast.reference.attention"),
        Provider("torch_sdpa", torch_sdpa_decode_attention, "torch F.scaled_dot_product_attention"),
    )},
    "sampling_draw": {p.name: p for p in (
        Provider("genfast", genfast_sampling_draw, "torch.ops.genfast.sampling_draw"),
        Provider("whole_row", whole_row_sampling_draw, "the Triton kernels on the whole vocabulary"),
        Provider("tile", tile_sampling_draw, "the Triton kernel at a given tile and warp count"),
        Provider("routed", routed_sampling_draw, "genfast.generation.sampling.draw (genfast.routing)"),
        Provider("reference", reference_sampling_draw, "genfast.reference.process_logits + draw_from_scores"),
    )},
}

# The sentence VAE's training step (genfast/bench/vae.py).
from genfast.bench.vae import make_vae_workload, vae_provider  # noqa: E402

PROVIDERS["vae"] = {p.name: p for p in (
    Provider("genfast", vae_provider("genfast"), "SentenceVAE on genfast.nn.GRU/LSTM"),
    Provider("torch", vae_provider("torch"), "SentenceVAE on torch.nn.GRU/LSTM, same weights"),
)}

WORKLOADS = {"rnn": make_rnn_workload, "layernorm_rnn": make_layernorm_rnn_workload,
             "attention": make_attention_workload, "varlen_attention": make_varlen_attention_workload,
             "imdb": make_imdb_workload,
             "generation": make_generation_workload, "sampling": make_sampling_workload,
             "decode_attention": make_decode_attention_workload, "sampling_draw": make_sampling_draw_workload,
             "vae": make_vae_workload}
