"""FLOP counts for every benchmarked op, in one place.

Conventions (a multiply-add is 2 FLOPs; only the matrix products are counted, the
element-wise gate math and softmax are O(1/H) or O(1/D) of the total and are left out):

  LSTM forward   2 * steps * 4H * (I + H_out)      + 2 * steps * H * P   with a projection
                 (steps = T*N for padded input, sum(lengths) for packed; H_out = P or H)
  GRU forward    2 * steps * 3H * (I + H)
  training       3 x forward  (backward = grad wrt inputs + grad wrt weights, each ~ forward); an RNN
                 layer whose input needs no gradient skips the input's product, 2 * steps * G*H * I
  attention fwd  4 * B * H * Lq * Lk * D  (QK^T and PV); half of that with a causal mask
  attention f+b  3.5 x forward  (the backward is 2.5x: 5 matmuls of the forward's 2, FlashAttention's count)
  GPT-2 generate see gpt2_generate
"""
from __future__ import annotations

TRAINING_FACTOR_RNN = 3.0
TRAINING_FACTOR_ATTENTION = 3.5  # forward + backward


def lstm_forward(steps: int, input_size: int, hidden_size: int, proj_size: int = 0) -> float:
    """FLOPs of one LSTM layer/direction over `steps` = (time step, batch row) pairs."""
    h_out = proj_size if proj_size > 0 else hidden_size
    flops = 2.0 * steps * 4 * hidden_size * (input_size + h_out)
    if proj_size > 0:
        flops += 2.0 * steps * hidden_size * proj_size
    return flops


def gru_forward(steps: int, input_size: int, hidden_size: int) -> float:
    """FLOPs of one GRU layer/direction over `steps` = (time step, batch row) pairs."""
    return 2.0 * steps * 3 * hidden_size * (input_size + hidden_size)


def rnn(cell: str, steps: int, input_size: int, hidden_size: int, training: bool,
        proj_size: int = 0, input_grad: bool = True) -> float:
    """One layer/direction; ``input_grad=False``: the training step needs no gradient for the input."""
    if cell == "lstm":
        fwd, gates = lstm_forward(steps, input_size, hidden_size, proj_size), 4
    elif cell in ("gru", "gru_reset_before"):  # the same products; the reset gate only moves one
        fwd, gates = gru_forward(steps, input_size, hidden_size), 3
    else:
        raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
    if not training:
        return fwd
    skipped = 0.0 if input_grad else 2.0 * steps * gates * hidden_size * input_size
    return fwd * TRAINING_FACTOR_RNN - skipped


def attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool,
              training: bool) -> float:
    fwd = 4.0 * batch * heads * q_len * kv_len * head_dim
    if causal:
        fwd /= 2
    return fwd * (TRAINING_FACTOR_ATTENTION if training else 1.0)


def linear(rows: int, in_features: int, out_features: int, training: bool) -> float:
    return 2.0 * rows * in_features * out_features * (TRAINING_FACTOR_RNN if training else 1.0)


def gpt2_generate(prompt_len: int, new_tokens: int, config: dict) -> float:
    """Matrix-product FLOPs of greedy generation: 2 per weight per token that passes through the
    model (the prompt once, then each generated token but the last), plus the attention scores
    and values against the cache; the tied output projection only for positions that are sampled."""
    layers, width = config.get("n_layer", 12), config.get("n_embd", 768)
    vocab = config.get("vocab_size", 50257)
    block_weights = layers * 12 * width * width          # qkv 3C^2, proj C^2, mlp 8C^2
    tokens = prompt_len + new_tokens - 1
    context = sum(range(1, tokens + 1))                   # keys each token attends to
    return (2.0 * tokens * block_weights + 4.0 * layers * width * context
            + 2.0 * (new_tokens) * width * vocab)


def gemm(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k
