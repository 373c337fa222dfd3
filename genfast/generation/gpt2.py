"""GPT-2 (the decoder of Radford et al. 2019) on genfast's kernels, with a KV cache and
Hugging Face-compatible generation.

    model = GPT2.from_hf("path/to/gpt2")            # or a transformers.GPT2LMHeadModel
    out = model.generate(ids, max_new_tokens=50, do_sample=True, top_k=50, top_p=0.95)

Prefill runs the prompt through genfast's causal scaled_dot_product_attention; each
decode step attends one new token to a preallocated cache (n_layer, B, H, max_len, D)
with genfast's decode_attention (a fused C++ op on CPU, Triton flash-decoding on CUDA). On CUDA,
generate() captures the decode step once as a CUDA graph and replays it per token: at batch 1 a
step is ~100 small kernels, whose launches from Python would otherwise dominate it.
Logits match transformers.GPT2LMHeadModel's for the same weights.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genfast.generation.decode import decode_attention, linear
from genfast.generation.ops import gpt2_decode as _fused
from genfast.generation.sampling import apply_repetition_penalty, sample
from genfast.nn import functional as gf

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # the tanh approximation, as HF's NewGELU
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class GPT2Config:
    """The fields of transformers.GPT2Config that shape the network (same names, same defaults)."""
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation_function!r} not supported; "
                             f"one of {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, values: dict) -> "GPT2Config":
        """From a config.json dict or a transformers config's to_dict(); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class Linear(nn.Linear):
    """nn.Linear whose decode steps (a few rows, no autograd) run genfast's decode_linear:
    one pass over the weight at memory bandwidth. Weights are in nn.Linear's (out, in) layout;
    from_hf transposes HF's Conv1D (in, out)."""

    def reset_parameters(self) -> None:  # GPT-2's initialisation
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class KVCache:
    """Keys and values of every layer, preallocated: (n_layer, batch, heads, max_len, head_dim)."""

    def __init__(self, config: GPT2Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (config.n_layer, batch, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled so far


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer_idx = config.n_head, config.n_embd // config.n_head, layer_idx
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x: Tensor, cache: KVCache | None, position: Tensor | None = None,
                attended: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x (B,H,T,D)
        if position is not None:  # a decode step at a position held on the device (see GPT2.forward)
            k_cache, v_cache = cache.k[self.layer_idx], cache.v[self.layer_idx]
            k_cache.index_copy_(2, position, k)
            v_cache.index_copy_(2, position, v)
            y = decode_attention(q[:, :, 0], k_cache, v_cache, attended, self.scale).unsqueeze(2)
        elif cache is None:
            y = gf.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            start, end = cache.length, cache.length + T
            k_cache, v_cache = cache.k[self.layer_idx], cache.v[self.layer_idx]
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            if T == 1:  # decode: one new token against everything cached
                y = decode_attention(q[:, :, 0], k_cache, v_cache, end, self.scale).unsqueeze(2)
            elif start == 0:  # prefill: the prompt attends to itself
                y = gf.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            else:  # a chunk after cached tokens: causal, aligned to the end
                keep = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = gf.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end],
                                                    attn_mask=keep, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.c_fc = Linear(config.n_embd, inner)
        self.c_proj = Linear(inner, config.n_embd)
        self.act = _ACTIVATIONS[config.activation_function]
        self.activation = config.activation_function

    def forward(self, x: Tensor, cache: KVCache | None, position: Tensor | None = None,
                attended: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, position, attended)
        return x + self.c_proj(self.act(self.c_fc(self.ln_2(x))))

    def decode_step(self, x: Tensor, cache: KVCache) -> Tensor:
        """forward(x, cache) for x (B, 1, C), one new token per row, as one fused CPU op."""
        attn = self.attn
        out = _fused.gpt2_decode_block(
            x.reshape(x.shape[0], x.shape[2]), (self.ln_1.weight, self.ln_1.bias), (attn.c_attn.weight, attn.c_attn.bias),
            (attn.c_proj.weight, attn.c_proj.bias), (self.ln_2.weight, self.ln_2.bias), (self.c_fc.weight, self.c_fc.bias),
            (self.c_proj.weight, self.c_proj.bias), cache.k[attn.layer_idx], cache.v[attn.layer_idx], cache.length,
            attn.n_head, attn.scale, self.ln_1.eps, self.activation)
        return out.view(x.shape)


class GPT2(nn.Module):
    # CPU decode steps (one token per row, float32/64, no autograd, at most as many rows as the block's
    # weights are read in place for: fused_decode_rows) run each block as one fused op
    # (Block.decode_step, csrc/generation/gpt2_decode.cpp) instead of a dozen torch ops: the same
    # equations, without their per-op overhead. False runs the unfused blocks.
    fused_cpu_decode: bool = True

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        # Tied (the GPT-2 default): the output projection is the token embedding.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, last_only: bool = False,
                position: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) for input_ids (B, T), or (B, 1, vocab) with last_only.

        With a cache, input_ids continue the cached sequence and the cache is extended; that is
        inference only (under torch.no_grad() or inference_mode; with autograd recording it raises).
        ``position`` (one token per row, with a cache): the cache row to fill, as a one-element int64
        tensor on the model's device, in place of cache.length, which is then neither read nor
        advanced. No host value depends on it, so the call can be captured in a CUDA graph
        (see _CUDAGraphDecodeStep); the caller keeps it below cache.max_len and n_positions.
        """
        B, T = input_ids.shape
        attended = None  # with a device position: the rows attended to, position + 1, for every layer
        if position is not None:
            if cache is None or T != 1:
                raise ValueError("position needs a cache and one token per row")
            positions, attended = position, position + 1
        else:
            start = cache.length if cache is not None else 0
            if start + T > self.config.n_positions:
                raise ValueError(f"sequence length {start + T} exceeds n_positions={self.config.n_positions}")
            if cache is not None and start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} needed")
            positions = torch.arange(start, start + T, device=input_ids.device)
        if cache is not None and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Each step writes the cache in place, which invalidates what autograd saved at the steps
            # before (and the decode kernels have no backward): gradients would be wrong or fail late.
            raise RuntimeError("GPT2: a forward with a KV cache is inference only; call it under torch.no_grad() "
                               "or torch.inference_mode(), or train without a cache")
        x = self.wte(input_ids) + self.wpe(positions)
        fused = position is None and self._fuses_decode(x, cache)
        for block in self.h:
            x = block.decode_step(x, cache) if fused else block(x, cache, position, attended)
        if cache is not None and position is None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        x = self.ln_f(x)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, weight)

    def fused_decode_rows(self) -> int:
        """The most rows a fused CPU decode step takes: as many as every weight of a block is read in
        place for (decode_linear's few-row path); beyond it the unfused blocks run torch's GEMMs."""
        block = self.h[0]
        return _fused.max_rows([block.attn.c_attn.weight, block.attn.c_proj.weight, block.c_fc.weight,
                                block.c_proj.weight])

    def _fuses_decode(self, x: Tensor, cache: KVCache | None) -> bool:
        """Whether this step runs the fused CPU decode blocks (see fused_cpu_decode). The op has no
        backward; no check is needed here because forward() refuses a cached step autograd would record."""
        return (self.fused_cpu_decode and cache is not None and x.shape[1] == 1 and len(self.h) > 0
                and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and self.config.activation_function in _fused.ACTIVATIONS and x.shape[0] <= self.fused_decode_rows())

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        param = self.wte.weight
        return KVCache(self.config, batch, max_len, param.dtype, param.device)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 num_return_sequences: int = 1, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 streamer=None, cuda_graph: bool | None = None) -> Tensor:
        """Prompt plus up to max_new_tokens tokens, (B * num_return_sequences, T + new), as HF's generate.

        Per step, as transformers applies them: repetition penalty (over prompt and output),
        then when sampling temperature, top-k, top-p and a draw (greedy argmax otherwise).
        Rows that emitted an eos_token_id continue with pad_token_id (default: the first eos)
        and generation stops early once every row has. Unlike HF, eos_token_id=None means
        no end token (HF falls back to the model's generation config). ``streamer`` gets
        HF's calls: put(prompt), put(tokens) per step, end(). Prompts are unpadded (one length).
        ``cuda_graph`` (default: on for a model on CUDA): run the decode steps as one captured CUDA
        graph (_CUDAGraphDecodeStep); the same kernels, so the same tokens, with fewer launches.
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64 (batch, length), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        if num_return_sequences > 1 and not do_sample:
            raise ValueError("greedy decoding gives one sequence per prompt: num_return_sequences > 1 needs "
                             "do_sample=True (as in transformers)")
        if streamer is not None and input_ids.shape[0] * num_return_sequences != 1:
            raise ValueError("streamer supports a single sequence (batch 1, num_return_sequences 1)")
        on_cuda = self.wte.weight.is_cuda
        if cuda_graph and not on_cuda:
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {self.wte.weight.device}")
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if eos and pad_token_id is None:
            pad_token_id = eos[0]
        input_ids = input_ids.to(self.wte.weight.device).repeat_interleave(num_return_sequences, dim=0)
        batch, prompt_len = input_ids.shape
        total = prompt_len + max_new_tokens
        if total > self.config.n_positions:
            raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"n_positions={self.config.n_positions}")
        tokens = torch.empty(batch, total, dtype=torch.long, device=input_ids.device)
        tokens[:, :prompt_len] = input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if max_new_tokens == 0:
            if streamer is not None:
                streamer.end()
            return tokens
        eos_ids = torch.tensor(eos, device=tokens.device) if eos else None
        unfinished = torch.ones(batch, dtype=torch.bool, device=tokens.device)
        cache = self.new_cache(batch, total)
        logits = self(input_ids, cache, last_only=True)[:, -1]
        graph_step = None
        if (on_cuda and max_new_tokens > 1) if cuda_graph is None else cuda_graph:
            graph_step = _CUDAGraphDecodeStep(self, cache)
        length = prompt_len
        for step in range(max_new_tokens):
            scores = logits.float()
            if repetition_penalty != 1.0:
                scores = apply_repetition_penalty(scores, tokens[:, :length], repetition_penalty)
            if do_sample:
                next_tokens = sample(scores, temperature, top_k, top_p, generator=generator)
            else:
                next_tokens = scores.argmax(dim=-1)
            if eos_ids is not None:
                next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
                unfinished &= ~torch.isin(next_tokens, eos_ids)
            tokens[:, length] = next_tokens
            length += 1
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if eos_ids is not None and not bool(unfinished.any()):
                break
            if step + 1 < max_new_tokens:
                if graph_step is not None:
                    logits = graph_step(next_tokens)  # the graph's output buffer: read before the next step
                else:
                    logits = self(next_tokens[:, None], cache, last_only=True)[:, -1]
        if streamer is not None:
            streamer.end()
        return tokens[:, :length]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_hf(cls, source, dtype: torch.dtype | None = None) -> "GPT2":
        """GPT-2 weights from a transformers GPT2LMHeadModel/GPT2Model or a local directory
        (config.json + model.safetensors or pytorch_model.bin). Never downloads."""
        if isinstance(source, (str, Path)):
            config, state = _read_hf_directory(Path(source))
        else:
            if not hasattr(source, "config") or not hasattr(source, "state_dict"):
                raise TypeError(f"source must be a path or a transformers GPT-2 model, got {type(source).__name__}")
            config = GPT2Config.from_dict(source.config.to_dict())
            state = source.state_dict()
        model = cls(config)
        model.load_state_dict(_convert_hf_state(state, config))
        if dtype is not None:
            model.to(dtype)
        return model.eval()


class _CUDAGraphDecodeStep:
    """GPT2's decode step (one token per row -> last-position logits) as a CUDA graph.

    Captured once, right after the prefill, with the next cache row held on the device; each replay
    writes that row, attends over rows [0, position] (decode_attention reads the length from
    memory) and advances the position, so one replay per token needs no host value. Inputs and
    outputs are static buffers: call() copies the tokens in and returns the logits buffer, which the
    next call overwrites.
    """

    def __init__(self, model: GPT2, cache: KVCache):
        device = model.wte.weight.device
        self.tokens = torch.zeros(cache.k.shape[1], 1, dtype=torch.long, device=device)
        self.position = torch.full((1,), cache.length, dtype=torch.long, device=device)
        # Warm up on a side stream, as torch.cuda.graphs asks: Triton compiles and cuBLAS picks its
        # kernels outside the capture. It writes cache row `position`, which the first replay overwrites.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model(self.tokens, cache, last_only=True, position=self.position)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, cache, last_only=True, position=self.position)[:, -1]
            self.position += 1

    def __call__(self, tokens: Tensor) -> Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        return self.logits


def _read_hf_directory(directory: Path) -> tuple[GPT2Config, dict]:
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist (nothing is downloaded: "
                                "save one with transformers' save_pretrained)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; a GPT-2 directory needs config.json and "
                                "model.safetensors or pytorch_model.bin")
    config = GPT2Config.from_dict(json.loads(config_file.read_text()))
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return config, load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return config, torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory} "
                            "(sharded checkpoints are not supported)")


# HF's Conv1D layers store their weight (in, out); this model's Linear stores (out, in).
_CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".c_fc.weight", ".c_proj.weight")


def _convert_hf_state(state: dict, config: GPT2Config) -> dict:
    """HF names and layouts -> this module's (Conv1D weights transposed)."""
    converted = {}
    for name, tensor in state.items():
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        if name == "lm_head.weight":
            if not config.tie_word_embeddings:
                converted[name] = tensor
            continue
        name = name.replace(".mlp.c_fc.", ".c_fc.").replace(".mlp.c_proj.", ".c_proj.")
        converted[name] = tensor.t() if name.endswith(_CONV1D_WEIGHTS) and tensor.dim() == 2 else tensor
    return converted


__all__ = ["GPT2", "GPT2Config", "KVCache"]
