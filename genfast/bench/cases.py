"""Every benchmark case, by name, and the named sets that select them.

A case name reads family.workload.details.mode (e.g. ``lstm.fastrnns.training``) and is
what --filter matches. Sets: ``quick`` (the default: a representative subset that runs
in under 3 minutes on a 2-core CPU), ``full`` (everything) and ``smoke`` (tiny shapes,
for the suite's own tests). A case appears in several sets under the same name; its
provider list may be shorter in ``quick``.

Sets depend on the device. On CUDA, ``quick`` is the GPU session's content (cases named
``gpu.*``: the CUDA LSTM/GRU against cuDNN, Triton flash attention against SDPA's flash backend,
the generation ops and GPT-2 greedy decoding against transformers); ``full`` adds longer
sequences, the sampling tile sweep and every CPU case run on the GPU. ``gpu.*`` cases run only on
CUDA, except their tiny ``smoke`` copies, which also run on the CPU so the code is checked there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from genfast.bench import flops
from genfast.bench.providers import rnn_lengths, varlen_lengths
from genfast.bench.vae import step_flops as vae_step_flops

SETS = ("quick", "full", "smoke")


@dataclass(frozen=True, eq=False)
class Case:
    name: str
    op: str                 # lstm | gru | attention | imdb | gpt2 | sampling: which benchmarks/bench_<op>.py
    kind: str               # rnn | attention | imdb | generation | sampling: which providers and workload
    mode: str               # inference | training
    params: dict = field(default_factory=dict)
    subjects: tuple[str, ...] = ("genfast",)
    baselines: tuple[str, ...] = ()
    unit: str = "ms"        # how the table prints times: ms, or us for latency cases
    measure_memory: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")   # where the case runs
    timer: str = "events"   # on CUDA: "events" (CUDA events) or "do_bench" (Triton's, L2 flushed)

    @property
    def training(self) -> bool:
        return self.mode == "training"

    @property
    def input_grad(self) -> bool:
        """RNN cases: whether the training step asks for the input's gradient (the default input does not)."""
        return bool(self.params.get("input_grad"))

    @property
    def providers(self) -> tuple[str, ...]:
        return self.subjects + self.baselines

    @property
    def flops(self) -> float:
        p = self.params
        if self.kind == "rnn":
            steps = p["T"] * p["N"]
            if p.get("packed"):
                steps = int(rnn_lengths(p["T"], p["N"], p.get("seed", 0)).sum())
            dirs = 2 if p.get("bidirectional") else 1  # stacked layers read the previous layer's dirs x H
            return dirs * sum(flops.rnn(p["cell"], steps, p["input_size"] if layer == 0 else dirs * p["hidden_size"],
                                        p["hidden_size"], self.training, input_grad=layer > 0 or self.input_grad)
                              for layer in range(p.get("layers", 1)))
        if self.kind == "layernorm_rnn":  # the products of the plain cell; LN adds O(1/H) of it
            steps = p["T"] * p["N"]
            return flops.rnn(p["cell"].removeprefix("layernorm_"), steps, p["input_size"], p["hidden_size"],
                             self.training, input_grad=self.input_grad)
        if self.kind == "attention" and "lengths" in p:  # a packed batch: each sequence's own square
            return sum(flops.attention(1, p["heads"], n, n, p["D"], p["causal"], self.training)
                       for n in varlen_lengths(p["B"], *p["lengths"], p.get("seed", 0)).tolist())
        if self.kind == "attention":
            return flops.attention(p["B"], p["heads"], p.get("Lq", p["L"]), p["L"], p["D"], p["causal"],
                                   self.training)
        if self.kind == "varlen_attention":
            lengths = varlen_lengths(p["B"], p["min_len"], p["max_len"], p.get("seed", 0)).tolist()
            return sum(flops.attention(1, p["heads"], n, n, p["D"], p["causal"], self.training) for n in lengths)
        if self.kind == "imdb":
            steps = p["batch"] * p["T"]
            return (flops.rnn("lstm", steps, p["embed"], p["hidden"], self.training)
                    + flops.rnn("lstm", steps, p["hidden"], p["hidden"], self.training)
                    + flops.linear(p["batch"], p["hidden"], 1, self.training))
        if self.kind == "generation":
            return p.get("rows", 1) * flops.gpt2_generate(p["prompt_len"], p["new_tokens"], p.get("config", {}))
        if self.kind == "decode_attention":
            return flops.attention(p["B"], p["heads_q"], 1, p["L"], p["D"], False, False)
        if self.kind == "vae":
            return vae_step_flops(p, self.training)
        if self.kind in ("sampling", "sampling_draw"):
            return 0.0  # selection and a draw, no arithmetic worth counting: no GFLOP/s column
        raise ValueError(f"unknown case kind {self.kind!r}")


MODES = ("inference", "training")
RNN_BASELINES_FULL = ("torch", "cell_loop", "reference", "compiled_reference")


def _rnn(cell: str, workload: str, mode: str, baselines, subjects=("genfast",), unit="ms", **shape) -> Case:
    params = {"cell": cell, "seed": 0, **shape}
    return Case(f"{cell}.{workload}.{mode}", cell, "rnn", mode, params, tuple(subjects), tuple(baselines), unit)


def _fastrnns(cell, mode, baselines):
    # The fastrnns benchmark's default shape (pytorch/benchmarks/fastrnns).
    return _rnn(cell, "fastrnns", mode, baselines, T=100, N=64, input_size=512, hidden_size=512)


def _packed(cell, mode, baselines):
    return _rnn(cell, "packed", mode, baselines, T=100, N=64, input_size=512, hidden_size=512, packed=True)


def _decode(cell, hidden, baselines):
    return _rnn(cell, f"decode.h{hidden}", "inference", baselines, subjects=("genfast", "genfast_cell"),
                unit="us", T=1, N=1, input_size=hidden, hidden_size=hidden)


def _bfloat16(cell, mode, baselines, **shape):
    # bfloat16 weights and input: genfast runs the layer in float32 on the CPU (genfast.ops.rnn),
    # torch.nn in its own bfloat16 path.
    return _rnn(cell, "imdb.bf16", mode, baselines, dtype="bfloat16", **shape)


def _long(cell, mode, baselines):
    return _rnn(cell, "long", mode, baselines, T=1000, N=16, input_size=256, hidden_size=256)


def _small_batch(cell, mode, baselines, N, hidden):
    # One or two sequences through a wide layer: each step has a row or two, and the weights
    # (34 MB of LSTM W_ih + W_hh at hidden 1024) stream from memory every step.
    return _rnn(cell, f"batch{N}.h{hidden}", mode, baselines, T=100, N=N, input_size=hidden, hidden_size=hidden)


def _imdb(mode, **overrides) -> Case:
    params = {"vocab": 10000, "embed": 256, "hidden": 64, "batch": 32, "T": 100, "steps_checked": 20,
              "lr": 1e-3, "seed": 0, **overrides}
    return Case(f"imdb.{mode}", "imdb", "imdb", mode, params, ("genfast",), ("torch",))


def _attention(B, L, D, causal, mode, baselines, heads=12, prefix="", Lq=None) -> Case:
    params = {"B": B, "heads": heads, "L": L, "D": D, "causal": causal, "seed": 0}
    if Lq is not None:  # fewer query rows than keys: a decode-shaped call
        params["Lq"] = Lq
    masking = "causal" if causal else "noncausal"
    rows = f"q{Lq}." if Lq is not None else ""
    name = f"attention.{prefix}b{B}.h{heads}.{rows}n{L}.d{D}.{masking}.{mode}"
    return Case(name, "attention", "attention", mode, params, ("genfast", "genfast_triton"),
                tuple(baselines), measure_memory=True)


ATTENTION_BASELINES = ("torch_sdpa", "math")


def _imdb_lstm(mode, baselines):
    # One LSTM layer at the IMDB model's first-layer shape (the second LSTM target).
    return _rnn("lstm", "imdb", mode, baselines, T=100, N=32, input_size=256, hidden_size=64)


def _gpt2(new_tokens=128, prompt_len=16, name="gpt2.124m.greedy", config=None, rows=1) -> Case:
    # GPT2Config() defaults: the 124M model; random weights, fp32; `rows` prompts decoded together.
    params = {"prompt_len": prompt_len, "new_tokens": new_tokens, "config": config or {}, "seed": 0, "rows": rows}
    return Case(name, "gpt2", "generation", "inference", params, ("genfast",), ("transformers",))


def _sampling(vocab=50257, top_k=0, top_p=0.9, temperature=1.0, spread=1.0, name=None, rows=1) -> Case:
    # One decode step's logits: N(0, spread^2) per token. spread 1 is flat (top-p keeps most of the
    # vocabulary, as at a high temperature), spread 5 peaked (a few dozen tokens carry top_p).
    shape = "flat" if spread <= 1 else "peaked"
    filters = "_".join(f for f in (f"topk{top_k}" if top_k else "", f"topp{top_p:g}" if top_p < 1 else "") if f)
    params = {"rows": rows, "vocab": vocab, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "spread": spread, "seed": 0}
    return Case(name or f"sampling.v{vocab}.{filters}.{shape}", "sampling", "sampling", "inference", params,
                ("genfast",), ("reference", "transformers"), unit="us")


def _vae(cell="gru", name=None, **overrides) -> Case:
    # One training step of the sentence VAE (genfast/bench/vae.py). The default shape is the
    # SentenceVAE defaults (embedding 256, hidden 512, latent 32) with Bowman et al.'s Penn Treebank
    # vocabulary of 10000 words and sentences of 5 to 40 words.
    params = {"cell": cell, "vocab": 10000, "embed": 256, "hidden": 512, "latent": 32, "batch": 32,
              "shortest": 5, "longest": 40, "word_dropout": 0.25, "lr": 1e-3, "steps_checked": 5, "seed": 0,
              **overrides}
    return Case(name or f"vae.{cell}.b{params['batch']}.h{params['hidden']}.v{params['vocab']}.training", "vae",
                "vae", "training", params, ("genfast",), ("torch",))
# Issue 19's regularisers: a training step of genfast's module with one regulariser (subject) against
# the plain module (baseline), at the fastrnns shape and the IMDB layer's; the target is <= 1.1x the
# plain time, i.e. a ratio >= 0.91.
REGULARIZERS = {"lstm": ("zoneout", "cell_zoneout", "recurrent_dropout", "weight_dropout"),
                "gru": ("zoneout", "recurrent_dropout", "weight_dropout"),
                "gru_reset_before": ("zoneout", "recurrent_dropout", "weight_dropout")}


def _regularized(cell, regularizer, shape_name, **shape) -> Case:
    params = {"cell": cell, "seed": 0, "regularizers": ((regularizer, 0.25),), **shape}
    return Case(f"{cell}.regularizers.{shape_name}.{regularizer}.training", cell, "rnn", "training", params,
                ("genfast_regularized",), ("genfast",))


def _regularizer_cases() -> list[Case]:
    cases = []
    for cell, names in REGULARIZERS.items():
        for name in names:
            cases.append(_regularized(cell, name, "fastrnns", T=100, N=64, input_size=512, hidden_size=512))
            cases.append(_regularized(cell, name, "imdb", T=100, N=32, input_size=256, hidden_size=64))
    return cases


# ---- the layer-normalised cells (issue 19) --------------------------------------------------
# Against the best a user can write today: an eager Python loop over the cell in plain torch ops
# (genfast.reference.layernorm_*_cell), the same loop with the cell under torch.compile, and
# genfast's plain LSTM / GRU at the same shape (what LN costs on top of the fused plain cell).
LAYERNORM_BASELINES = ("cell_loop", "compiled_cell_loop", "genfast_plain")


def _layernorm(cell: str, workload: str, mode: str, baselines=LAYERNORM_BASELINES, **shape) -> Case:
    params = {"cell": cell, "seed": 0, **shape}
    return Case(f"{cell}.{workload}.{mode}", cell, "layernorm_rnn", mode, params, ("genfast",), tuple(baselines))


def _layernorm_cases(baselines=LAYERNORM_BASELINES) -> list[Case]:
    cases = []
    for cell in ("layernorm_lstm", "layernorm_gru"):
        for mode in MODES:
            cases.append(_layernorm(cell, "fastrnns", mode, baselines, T=100, N=64, input_size=512, hidden_size=512))
            cases.append(_layernorm(cell, "imdb", mode, baselines, T=100, N=32, input_size=256, hidden_size=64))
    return cases


# A training step of the LN module with one regulariser (subject) against the same module without it
# (issue 19: each regulariser <= 1.1x the plain time).
LAYERNORM_REGULARIZERS = ("zoneout", "recurrent_dropout")


def _layernorm_regularized(cell: str, regularizer: str, workload: str, **shape) -> Case:
    params = {"cell": cell, "seed": 0, "regularizers": ((regularizer, 0.25),), **shape}
    return Case(f"{cell}.regularizers.{workload}.{regularizer}.training", cell, "layernorm_rnn", "training", params,
                ("genfast_regularized",), ("genfast",))


def _layernorm_regularizer_cases() -> list[Case]:
    cases = []
    for cell in ("layernorm_lstm", "layernorm_gru"):
        for name in LAYERNORM_REGULARIZERS:
            cases.append(_layernorm_regularized(cell, name, "fastrnns", T=100, N=64, input_size=512, hidden_size=512))
            cases.append(_layernorm_regularized(cell, name, "imdb", T=100, N=32, input_size=256, hidden_size=64))
    return cases


def _quick() -> list[Case]:
    cases = []
    # The slow baselines (reference, cell_loop) cost several torch calls per call on the big
    # RNN shapes, so here those shapes compare with torch only; the IMDB layer's shape (small)
    # also shows the cell loop, and the decode case every RNN baseline. --full runs them all.
    for cell in ("lstm", "gru"):
        for mode in MODES:
            cases.append(_fastrnns(cell, mode, ("torch",)))
    cases += [_imdb_lstm(mode, ("torch", "cell_loop")) for mode in MODES]
    cases += [_imdb("training"), _imdb("inference")]
    cases.append(_decode("lstm", 256, ("torch", "cell_loop", "reference")))
    cases.append(_packed("lstm", "inference", ("torch",)))
    for causal in (True, False):
        cases.append(_attention(1, 1024, 64, causal, "inference", ATTENTION_BASELINES))
    for causal in (True, False):
        cases.append(_attention(4, 512, 128, causal, "inference", ("torch_sdpa",), heads=8))
    cases.append(_attention(1, 1024, 64, True, "training", ("torch_sdpa",)))
    cases += [_sampling(top_k=50, top_p=0.9, spread=5.0), _sampling(top_p=0.9, spread=1.0)]
    cases.append(_gpt2())
    cases.append(_vae())
    return cases


def _full() -> list[Case]:
    cases = []
    for cell in ("lstm", "gru"):
        for mode in MODES:
            cases.append(_fastrnns(cell, mode, RNN_BASELINES_FULL))
        for mode in MODES:
            cases.append(_packed(cell, mode, ("torch", "cell_loop")))
        for hidden in (256, 1024):
            cases.append(_decode(cell, hidden, RNN_BASELINES_FULL))
        for mode in MODES:
            cases.append(_long(cell, mode, ("torch", "cell_loop", "reference")))
        cases.append(_small_batch(cell, "inference", ("torch", "cell_loop"), N=1, hidden=256))
        for mode in MODES:
            cases.append(_small_batch(cell, mode, ("torch",), N=2, hidden=1024))
        # The IMDB layer's shape: torch's CPU bfloat16 training is too slow at the fastrnns shape.
        for mode in MODES:
            cases.append(_bfloat16(cell, mode, ("torch",), T=100, N=32, input_size=256, hidden_size=64))
    cases += [_imdb_lstm(mode, RNN_BASELINES_FULL) for mode in MODES]
    # The training steps above with the input's gradient asked for too (a layer above the first, or one fed by
    # a trainable embedding): without it genfast skips the input's product; torch.nn computes it either way.
    for cell in ("lstm", "gru"):
        cases.append(_rnn(cell, "fastrnns.input_grad", "training", ("torch",), T=100, N=64, input_size=512,
                          hidden_size=512, input_grad=True))
        cases.append(_rnn(cell, "imdb.input_grad", "training", ("torch",), T=100, N=32, input_size=256,
                          hidden_size=64, input_grad=True))
    cases += [_imdb("training"), _imdb("inference")]
    for B in (1, 8):
        for L in (128, 512, 1024, 4096):
            for causal in (True, False):
                cases.append(_attention(B, L, 64, causal, "inference", ATTENTION_BASELINES))
    for L in (1024, 4096):
        for causal in (True, False):
            cases.append(_attention(1, L, 128, causal, "inference", ATTENTION_BASELINES))
    for causal in (True, False):
        cases.append(_attention(4, 512, 128, causal, "inference", ATTENTION_BASELINES, heads=8))
    # Decode-shaped: a query row or a few against a long key sequence (KV-cached generation).
    for B, Lq, L in ((1, 1, 1024), (8, 1, 256), (1, 8, 1024)):
        cases.append(_attention(B, L, 64, False, "inference", ATTENTION_BASELINES, Lq=Lq))
    for L in (512, 1024):
        for causal in (True, False):
            cases.append(_attention(1, L, 64, causal, "training", ATTENTION_BASELINES))
    for spread in (1.0, 5.0):
        cases += [_sampling(top_k=50, top_p=0.9, spread=spread), _sampling(top_p=0.9, spread=spread),
                  _sampling(top_k=50, top_p=1.0, spread=spread)]
    cases += _layernorm_cases()
    cases += _layernorm_regularizer_cases()
    cases.append(_gpt2())
    # Ten sequences at once, as generate(..., num_return_sequences=10) decodes them.
    cases.append(_gpt2(new_tokens=32, rows=10, name="gpt2.124m.greedy.batch10"))
    # The VAE step: its GRU's share grows as the output layer shrinks (vocabulary 2000).
    cases += [_vae(), _vae("lstm"), _vae(vocab=2000)]
    cases += _regularizer_cases()
    return cases


def _smoke() -> list[Case]:
    """Tiny shapes that exercise every workload and provider kind in well under a second."""
    tiny = dict(T=5, N=3, input_size=8, hidden_size=8)
    cases = []
    for cell in ("lstm", "gru"):
        for mode in MODES:
            cases.append(_rnn(cell, "tiny", mode, ("torch", "cell_loop", "reference"), **tiny))
        cases.append(_rnn(cell, "tiny_packed", "training", ("torch", "cell_loop"), packed=True, **tiny))
        cases.append(_rnn(cell, "tiny_bf16", "training", ("torch", "cell_loop"), dtype="bfloat16", **tiny))
        cases.append(_rnn(cell, "tiny_decode", "inference", ("torch", "cell_loop", "reference"),
                          subjects=("genfast", "genfast_cell"), unit="us",
                          T=1, N=1, input_size=8, hidden_size=8))
    for mode in MODES:
        cases.append(Case(f"imdb.tiny.{mode}", "imdb", "imdb", mode,
                          {"vocab": 50, "embed": 8, "hidden": 8, "batch": 4, "T": 6, "steps_checked": 3,
                           "lr": 1e-3, "seed": 0}, ("genfast",), ("torch",)))
        cases.append(_attention(1, 16, 8, True, mode, ATTENTION_BASELINES, heads=2, prefix="tiny."))
    for cell in ("layernorm_lstm", "layernorm_gru"):  # "small", so that --filter lstm.tiny keeps its one case
        for mode in MODES:
            cases.append(_layernorm(cell, "small", mode, **tiny))
        cases.append(_layernorm_regularized(cell, "zoneout", "small", **tiny))
    cases.append(_sampling(vocab=100, top_k=5, top_p=0.9, rows=2, name="sampling.tiny"))
    tiny_gpt2 = dict(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=100)
    cases.append(_gpt2(new_tokens=4, prompt_len=3, name="gpt2.tiny.greedy", config=tiny_gpt2))
    cases.append(_gpt2(new_tokens=4, prompt_len=3, name="gpt2.tiny.greedy.batch3", config=tiny_gpt2, rows=3))
    cases.append(_vae(name="vae.tiny.training", vocab=50, embed=8, hidden=8, latent=4, batch=4, shortest=1,
                      longest=6, steps_checked=3))
    cases += [_regularized(cell, names[0], "tiny", **tiny) for cell, names in REGULARIZERS.items()]
    return cases


# ------------------------------------------------------------------------- GPU session
# What benchmarks/gpu_session.sh measures on a lent GPU. TF32 is off for the whole CUDA run
# (genfast.bench's main), so float32 means IEEE fp32 products on both sides. "genfast" times genfast's
# kernel (genfast.routing's rules off), "routed" the call as users make it (a rule may pick torch's path).
GPU = ("cuda",)


def _gpu_rnn(cell, dtype, mode, T=100, N=64, size=512, devices=GPU, layers=1, bidirectional=False) -> Case:
    # A training step is forward + backward through the input and the weights. `persistent`: the persistent
    # kernel of issue 20 (opt-in), reported unavailable where a layer would run the per-step path.
    params = {"cell": cell, "seed": 0, "T": T, "N": N, "input_size": size, "hidden_size": size, "dtype": dtype,
              "input_grad": mode == "training"}
    stack = ""
    if layers > 1 or bidirectional:
        params.update(layers=layers, bidirectional=bidirectional)
        stack = f".l{layers}{'bi' if bidirectional else ''}"
    return Case(f"gpu.rnn.{cell}.t{T}.n{N}.h{size}{stack}.{dtype}.{mode}", cell, "rnn", mode, params,
                ("genfast", "routed", "persistent"), ("torch", "flashrnn"), devices=devices)


def _gpu_rnn_decode(cell, dtype, tokens=100, size=512, devices=GPU) -> Case:
    # Autoregressive decoding: one call steps the layer `tokens` times, one token each, the state
    # carried from step to step (time per call / tokens = latency per token).
    params = {"cell": cell, "seed": 0, "T": tokens, "N": 1, "input_size": size, "hidden_size": size,
              "dtype": dtype, "stepwise": True}
    return Case(f"gpu.rnn.{cell}.decode{tokens}.h{size}.{dtype}.inference", cell, "rnn", "inference", params,
                ("genfast", "routed", "persistent"), ("torch", "flashrnn"), devices=devices)


def _gpu_rnn_persistent() -> list[Case]:
    """The shapes of issue 20's acceptance beyond the T=100, N=64, H=512 cases: small batches at H=512 and 1024,
    a 2-layer bidirectional bf16 LSTM, and cuDNN's own persistent case (1-layer fp16 LSTM, T=1024, N=16, H=768)."""
    cases = [_gpu_rnn(cell, "float32", "inference", N=N, size=size)
             for cell in ("lstm", "gru") for size in (512, 1024) for N in (1, 8)]
    cases.append(_gpu_rnn("lstm", "bfloat16", "training", layers=2, bidirectional=True))
    # A single decode step (T=1, N=1, H=512) replayed from a CUDA graph: the launch and host costs gone.
    for cell in ("lstm", "gru"):
        for dtype in ("float32", "bfloat16"):
            params = {"cell": cell, "seed": 0, "T": 1, "N": 1, "input_size": 512, "hidden_size": 512, "dtype": dtype,
                      "graph": True}
            cases.append(Case(f"gpu.rnn.{cell}.step.h512.{dtype}.graph", cell, "rnn", "inference", params,
                              ("genfast", "routed", "persistent"), ("torch",), unit="us", devices=GPU))
    cases += [_gpu_rnn("lstm", "float16", mode, T=1024, N=16, size=768) for mode in MODES]
    return cases


def _gpu_attention(D, L, causal, mode, B=4, heads=32, devices=GPU) -> Case:
    # bf16, against SDPA's flash backend; timed with do_bench. The first call autotunes the Triton
    # kernel (its wall time is the provider's first_call_s).
    params = {"B": B, "heads": heads, "L": L, "D": D, "causal": causal, "seed": 0, "dtype": "bfloat16",
              "grad_out": True}
    masking = "causal" if causal else "noncausal"
    return Case(f"gpu.attention.b{B}.h{heads}.n{L}.d{D}.{masking}.{mode}", "attention", "attention", mode, params,
                ("genfast_triton",), ("torch_sdpa_flash",), devices=devices, timer="do_bench")


def _gpu_attention_masked(variant, mode, D=64, L=4096, B=4, heads=32, devices=GPU) -> Case:
    # Training-code calls (issue 23), bf16, against torch's SDPA on its default backend (which picks
    # what takes the mask or dropout: memory-efficient for a mask, flash for dropout):
    #   key_padding: a bool (B, 1, 1, L) mask, row b keeping its first n_b keys (n_b in [L/2, L]);
    #   bias: an additive (1, heads, L, L) bias; dropout: p = 0.1, no mask (outputs differ by design).
    # genfast: the drop-in SDPA (its dispatch included), genfast_triton: the kernel's own autograd.
    params = {"B": B, "heads": heads, "L": L, "D": D, "causal": False, "seed": 0, "dtype": "bfloat16",
              "grad_out": True}
    if variant == "dropout":
        params["dropout_p"] = 0.1
    else:
        params["mask"] = variant
    return Case(f"gpu.attention.{variant}.b{B}.h{heads}.n{L}.d{D}.{mode}", "attention", "attention", mode, params,
                ("genfast_triton", "genfast"), ("torch_sdpa",), devices=devices, timer="do_bench")


def _gpu_attention_varlen(mode, B=8, heads=12, D=64, lengths=(64, 1024), causal=False, devices=GPU) -> Case:
    # A packed batch with lengths uniform in [64, 1024] (fixed seed) through the Triton varlen kernel,
    # against the same batch padded to its longest sequence with a key-padding mask: torch's SDPA and
    # genfast's kernel with the mask. The padded providers pad and gather inside the timed call.
    params = {"B": B, "heads": heads, "D": D, "lengths": lengths, "causal": causal, "seed": 0, "dtype": "bfloat16"}
    masking = "causal" if causal else "noncausal"
    return Case(f"gpu.attention.varlen.b{B}.h{heads}.n{lengths[0]}-{lengths[1]}.d{D}.{masking}.{mode}", "attention",
                "attention", mode, params, ("genfast_triton_varlen", "genfast_triton"), ("torch_sdpa",),
                devices=devices, timer="do_bench")


def _gpu_attention_training_calls(devices=GPU, **tiny) -> list[Case]:
    """Masks, dropout and packed batches (issue 23): what training code calls."""
    cases = [_gpu_attention_masked("key_padding", mode, devices=devices, **tiny) for mode in MODES]
    cases += [_gpu_attention_masked("bias", "inference", devices=devices, **tiny),
              _gpu_attention_masked("dropout", "training", devices=devices, **tiny)]
    varlen_tiny = {"B": 3, "heads": 2, "D": 16, "lengths": (1, 20)} if tiny else {}
    return cases + [_gpu_attention_varlen(mode, devices=devices, **varlen_tiny) for mode in MODES]


def _gpu_decode_attention(dtype, B, heads_q, heads_kv, D, L, devices=GPU) -> Case:
    # One query row per head against a KV cache of L positions (grouped-query when heads differ).
    params = {"B": B, "heads_q": heads_q, "heads_kv": heads_kv, "D": D, "L": L, "dtype": dtype, "seed": 0}
    return Case(f"gpu.decode_attention.{dtype}.b{B}.h{heads_q}-{heads_kv}.d{D}.l{L}", "attention",
                "decode_attention", "inference", params, ("genfast", "launcher", "routed"),
                ("reference", "torch_sdpa"), unit="us", devices=devices)


def _gpu_sampling_draw(B, vocab, temperature, top_k, top_p, devices=GPU) -> Case:
    # Temperature, top-k and top-p filtering and the draw, fused (torch.ops.genfast.sampling_draw),
    # against the unfused reference; "whole_row" is the op with its kernels on the whole vocabulary
    # rather than on the top-k candidates (CUDA, top-k only).
    params = {"rows": B, "vocab": vocab, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": 0}
    subjects = ("genfast", "whole_row", "routed") if top_k else ("genfast", "routed")
    return Case(f"gpu.sampling_draw.b{B}.v{vocab}.t{temperature:g}.k{top_k}.p{top_p:g}", "sampling",
                "sampling_draw", "inference", params, subjects, ("reference",), unit="us", devices=devices)


def _gpu_sampling_sweep(warps, block) -> Case:
    # Diagnostic: the sampling kernel's tile (tokens per iteration) and warps per program, against
    # the op at its defaults. If time falls with bigger tiles, the kernel waits on memory latency.
    params = {"rows": 1, "vocab": 50257, "temperature": 1.0, "top_k": 50, "top_p": 0.9, "seed": 0,
              "warps": warps, "block": block}
    return Case(f"gpu.sampling_draw.sweep.w{warps}.b{block}", "sampling", "sampling_draw", "inference", params,
                ("tile",), ("genfast",), unit="us", devices=GPU)


def _gpu_gpt2(dtype, new_tokens=128, prompt_len=16, config=None, name=None, devices=GPU) -> Case:
    # genfast's default on CUDA replays the decode step as a CUDA graph; genfast_eager launches
    # each kernel.
    params = {"prompt_len": prompt_len, "new_tokens": new_tokens, "config": config or {}, "seed": 0, "rows": 1,
              "dtype": dtype}
    return Case(name or f"gpu.gpt2.124m.greedy.{dtype}", "gpt2", "generation", "inference", params,
                ("genfast", "genfast_eager"), ("transformers",), devices=devices)


GPU_ATTENTION_SEQLENS_QUICK = (4096, 16384)
GPU_ATTENTION_SEQLENS_FULL = (1024, 4096, 16384)


def _gpu(seqlens=GPU_ATTENTION_SEQLENS_QUICK) -> list[Case]:
    cases = []
    for cell in ("lstm", "gru"):
        for dtype in ("float32", "bfloat16"):
            cases += [_gpu_rnn(cell, dtype, mode) for mode in MODES]
            cases.append(_gpu_rnn_decode(cell, dtype))
    cases += _gpu_rnn_persistent()
    for dtype in ("float16", "bfloat16", "float32"):  # bfloat16: decode_attention.bfloat16 is an inferred rule
        for shape in ((1, 12, 12, 64, 1024), (1, 12, 12, 64, 16384), (8, 32, 8, 128, 4096), (1, 32, 8, 128, 32768)):
            cases.append(_gpu_decode_attention(dtype, *shape))
    for B, vocab in ((1, 50257), (32, 50257), (1, 151936)):
        for settings in ((0.8, 0, 1.0), (1.0, 50, 0.9), (1.0, 0, 0.9)):
            cases.append(_gpu_sampling_draw(B, vocab, *settings))
    cases += [_gpu_gpt2("float32"), _gpu_gpt2("bfloat16")]
    for D in (64, 128):
        for L in seqlens:
            for causal in (False, True):
                cases += [_gpu_attention(D, L, causal, mode) for mode in MODES]
    cases += _gpu_attention_training_calls()
    return cases


def _gpu_full() -> list[Case]:
    sweep = [_gpu_sampling_sweep(warps, block) for warps in (4, 8, 16) for block in (256, 512, 1024, 2048)]
    return _gpu(GPU_ATTENTION_SEQLENS_FULL) + sweep


def _gpu_smoke() -> list[Case]:
    """Tiny copies of the gpu.* cases that also run on the CPU (a check of their code)."""
    both = ("cpu", "cuda")
    tiny_gpt2 = dict(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100)
    return [
        _gpu_rnn("lstm", "bfloat16", "training", T=5, N=4, size=32, devices=both),
        _gpu_rnn_decode("gru", "float32", tokens=5, size=32, devices=both),
        _gpu_attention(16, 64, True, "training", B=1, heads=2, devices=both),
        *_gpu_attention_training_calls(devices=both, D=16, L=40, B=2, heads=2),
        _gpu_decode_attention("float32", 1, 4, 2, 16, 100, devices=both),
        _gpu_sampling_draw(1, 1000, 1.0, 50, 0.9, devices=both),
        _gpu_gpt2("float32", new_tokens=8, prompt_len=4, config=tiny_gpt2, name="gpu.gpt2.tiny.greedy.float32",
                  devices=both),
    ]


# ---------------------------------------------------------------- GRU, reset gate before the product
# genfast.nn.GRU(reset_after=False) against the Python loop over genfast.reference's cell, eager and with
# the cell compiled, and against genfast's plain GRU at the same shape (genfast_gru: the second dependent
# product per step is what it costs). In full; tiny copies in smoke.
GRU_RESET_BEFORE_BASELINES = ("reference", "compiled_cell_loop", "genfast_gru")  # reference first: the output check


def _gru_reset_before() -> list[Case]:
    cases = []
    for mode in MODES:
        cases.append(_rnn("gru_reset_before", "fastrnns", mode, GRU_RESET_BEFORE_BASELINES,
                          T=100, N=64, input_size=512, hidden_size=512))
        cases.append(_rnn("gru_reset_before", "imdb", mode, GRU_RESET_BEFORE_BASELINES,
                          T=100, N=32, input_size=256, hidden_size=64))
    return cases


def _gru_reset_before_smoke() -> list[Case]:
    return [_rnn("gru_reset_before", "tiny", mode, GRU_RESET_BEFORE_BASELINES, T=5, N=3, input_size=8, hidden_size=8)
            for mode in MODES]


# ---------------------------------------------------------------- variable-length attention (issue 23)
# genfast.nn.functional.flash_attn_varlen on a packed batch against the same batch padded to its longest
# sequence with a key-padding mask (torch's SDPA, and genfast's dense kernel). Lengths uniform in
# [64, 1024], fixed seed. In full; a tiny copy in smoke.
VARLEN_BASELINES = ("torch_sdpa_padded", "genfast_padded")


def _varlen_attention(B, mode, heads=12, D=64, lengths=(64, 1024), prefix="") -> Case:
    params = {"B": B, "heads": heads, "D": D, "min_len": lengths[0], "max_len": lengths[1], "causal": False,
              "seed": 0}
    name = f"varlen_attention.{prefix}b{B}.h{heads}.n{lengths[0]}-{lengths[1]}.d{D}.noncausal.{mode}"
    return Case(name, "attention", "varlen_attention", mode, params, ("genfast",), VARLEN_BASELINES,
                measure_memory=True)


def _varlen_attention_cases() -> list[Case]:
    return [_varlen_attention(8, mode) for mode in MODES]


def _varlen_attention_quick() -> list[Case]:
    return [_varlen_attention(4, "inference", lengths=(64, 512))]


def _varlen_attention_smoke() -> list[Case]:
    return [_varlen_attention(3, mode, heads=2, D=8, lengths=(1, 20), prefix="tiny.") for mode in MODES]


_BUILDERS = {"quick": lambda: _quick() + _varlen_attention_quick(), "full": lambda: _full() + _gru_reset_before() + _varlen_attention_cases(),
             "smoke": lambda: _smoke() + _gru_reset_before_smoke() + _varlen_attention_smoke()}
_GPU_BUILDERS = {"quick": _gpu, "full": _gpu_full, "smoke": _gpu_smoke}


def _matches(name: str, name_filter: str | None) -> bool:
    """--filter: a substring of the name, or several separated by commas (any one matches)."""
    if not name_filter:
        return True
    return any(part and part in name for part in name_filter.split(","))


def cases(set_name: str = "quick", name_filter: str | None = None, device: str = "cpu") -> list[Case]:
    """The cases of a set on a device, optionally only those whose name contains `name_filter`
    (comma-separated substrings: any one)."""
    if set_name not in _BUILDERS:
        raise ValueError(f"set_name must be one of {SETS}, got {set_name!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        # quick on a GPU: the GPU session's cases; full and smoke: those and the CPU set's.
        selected = _GPU_BUILDERS[set_name]() + ([] if set_name == "quick" else _BUILDERS[set_name]())
    else:
        selected = _BUILDERS[set_name]() + (_gpu_smoke() if set_name == "smoke" else [])
    return [c for c in selected if device in c.devices and _matches(c.name, name_filter)]


def find(name: str) -> Case:
    """A case by exact name, looked up in every set."""
    for builders in (_BUILDERS, _GPU_BUILDERS):
        for set_name in ("full", "smoke", "quick"):
            for case in builders[set_name]():
                if case.name == name:
                    return case
    raise KeyError(f"no benchmark case named {name!r}")
