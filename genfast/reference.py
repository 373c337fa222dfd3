"""The textbook equations in plain PyTorch: the oracle for tests, the slow baseline for benchmarks.

One copy of each op, written for clarity, not speed. Everything here runs on any
device and dtype and is differentiable by autograd.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
               b_ih: Tensor | None = None, b_hh: Tensor | None = None,
               w_hr: Tensor | None = None, reverse: bool = False, *, zoneout: Tensor | None = None,
               cell_zoneout: Tensor | None = None,
               recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, over x of shape (T, N, I).

    i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)      (PyTorch's gate order)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h' = sigmoid(o) * tanh(c')            then h' = W_hr h' when projecting (proj_size > 0)
    Returns (output (T, N, H_out), h_T, c_T).

    Regularisers with their masks given (see zoned below): zoneout, cell_zoneout (T, N, H), the weight
    of h_{t-1} (c_{t-1}) at step t; recurrent_mask (N, H) multiplies h in W_hh h.
    """
    outputs = []
    h, c = h0, c0
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        h_in = h if recurrent_mask is None else h * recurrent_mask
        gates = x[t] @ w_ih.t() + h_in @ w_hh.t()
        if b_ih is not None:
            gates = gates + b_ih + b_hh
        i, f, g, o = gates.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        c = zoned(cell_zoneout, t, c, c_new)
        h = zoned(zoneout, t, h, h_new)
        outputs.append(h)
    if reverse:
        outputs.reverse()
    return torch.stack(outputs), h, c


def gru_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None = None, b_hh: Tensor | None = None,
              reverse: bool = False, *, zoneout: Tensor | None = None,
              recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One GRU layer, one direction, over x of shape (T, N, I), in PyTorch's convention.

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h
    Returns (output (T, N, H), h_T). Regularisers: see lstm_layer (the mask multiplies h in W_h* h only).
    """
    outputs = []
    h = h0
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        gx = x[t] @ w_ih.t()
        gh = (h if recurrent_mask is None else h * recurrent_mask) @ w_hh.t()
        if b_ih is not None:
            gx = gx + b_ih
            gh = gh + b_hh
        xr, xz, xn = gx.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = zoned(zoneout, t, h, (1 - z) * n + z * h)
        outputs.append(h)
    if reverse:
        outputs.reverse()
    return torch.stack(outputs), h


def zoned(keep: Tensor | None, t: int, prev: Tensor, fresh: Tensor) -> Tensor:
    """Zoneout (Krueger et al. 2016) of a recurrent state at step t: keep[t] * prev + (1 - keep[t]) * fresh.
    keep (T, N, H): a 0/1 mask in training (Bernoulli(p): 1 keeps the previous value), p itself in eval;
    None: the fresh value. The fresh value is what the cell computes from the carried previous states."""
    if keep is None:
        return fresh
    return keep[t] * prev + (1 - keep[t]) * fresh


def gru_reset_before_cell(x_t: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
                          b_ih: Tensor | None = None, b_hh: Tensor | None = None,
                          h_product: Tensor | None = None) -> Tensor:
    """One step of the GRU with the reset gate before the recurrent product (Cho et al. 2014,
    Keras' reset_after=False), on torch.nn.GRU's parameters (gates r, z, n):

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
    h' = (1 - z) * n + z * h

    h_product: the h the three recurrent products read when it is not h itself. Under recurrent dropout
    it is m * h: W_hr (m * h), W_hz (m * h) and W_hn (r * (m * h)), while z * h keeps the unmasked h.
    """
    hp = h if h_product is None else h_product
    w_ir, w_iz, w_in = w_ih.chunk(3, dim=0)
    w_hr, w_hz, w_hn = w_hh.chunk(3, dim=0)
    b_ir, b_iz, b_in = b_ih.chunk(3) if b_ih is not None else (0, 0, 0)
    b_hr, b_hz, b_hn = b_hh.chunk(3) if b_hh is not None else (0, 0, 0)
    r = torch.sigmoid(x_t @ w_ir.t() + b_ir + hp @ w_hr.t() + b_hr)
    z = torch.sigmoid(x_t @ w_iz.t() + b_iz + hp @ w_hz.t() + b_hz)
    n = torch.tanh(x_t @ w_in.t() + b_in + (r * hp) @ w_hn.t() + b_hn)
    return (1 - z) * n + z * h


def gru_reset_before_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                           b_ih: Tensor | None = None, b_hh: Tensor | None = None,
                           reverse: bool = False, cell=gru_reset_before_cell, *, zoneout: Tensor | None = None,
                           recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One layer, one direction, of gru_reset_before_cell over x of shape (T, N, I): a Python loop
    over the steps calling ``cell`` (the function above, or a compiled copy of it).
    Returns (output (T, N, H), h_T). Regularisers as lstm_layer's: zoneout (T, N, H) zones out the cell's
    h' against h; recurrent_mask (N, H) m gives the cell h_product = m * h."""
    outputs = []
    h = h0
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        if recurrent_mask is None:
            fresh = cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
        else:
            fresh = cell(x[t], h, w_ih, w_hh, b_ih, b_hh, h_product=h * recurrent_mask)
        h = zoned(zoneout, t, h, fresh)
        outputs.append(h)
    if reverse:
        outputs.reverse()
    return torch.stack(outputs), h


# ---------------------------------------------------------------- layer-normalised cells (issue 19)
def layer_norm(v: Tensor, eps: float = 1e-5) -> Tensor:
    """(v - mean(v)) / sqrt(var(v) + eps) over the last dimension, biased variance, no gain or bias."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps)


def layernorm_lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                        b_hh: Tensor | None, ln_ih_weight: Tensor, ln_hh_weight: Tensor, ln_cell_weight: Tensor,
                        ln_cell_bias: Tensor, recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step of the layer-normalised LSTM (Ba et al. 2016), gates i, f, g, o as torch:

    a = LN(W_ih x) * ln_ih_weight + LN(W_hh h) * ln_hh_weight + b_ih + b_hh
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h' = sigmoid(o) * tanh(LN(c') * ln_cell_weight + ln_cell_bias)
    Returns (h', c'). recurrent_mask (N, H): h * recurrent_mask in place of h in W_hh h (recurrent dropout).
    """
    h_in = h if recurrent_mask is None else h * recurrent_mask
    gates = layer_norm(x @ w_ih.t()) * ln_ih_weight + layer_norm(h_in @ w_hh.t()) * ln_hh_weight
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(layer_norm(c) * ln_cell_weight + ln_cell_bias)
    return h, c


def layernorm_gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                       ln_ih_weight: Tensor, ln_hh_weight: Tensor, recurrent_mask: Tensor | None = None) -> Tensor:
    """One step of the layer-normalised GRU, gates r, z, n as torch:

    x^ = LN(W_ih x) * ln_ih_weight + b_ih,  h^ = LN(W_hh h) * ln_hh_weight + b_hh
    r = sigmoid(x^_r + h^_r), z = sigmoid(x^_z + h^_z), n = tanh(x^_n + r * h^_n)
    h' = (1 - z) * n + z * h
    recurrent_mask (N, H): h * recurrent_mask in place of h in W_hh h only (z * h keeps h).
    """
    gx = layer_norm(x @ w_ih.t()) * ln_ih_weight
    gh = layer_norm((h if recurrent_mask is None else h * recurrent_mask) @ w_hh.t()) * ln_hh_weight
    if b_ih is not None:
        gx = gx + b_ih
        gh = gh + b_hh
    xr, xz, xn = gx.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def layernorm_lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                         b_hh: Tensor | None, ln_ih_weight: Tensor, ln_hh_weight: Tensor, ln_cell_weight: Tensor,
                         ln_cell_bias: Tensor, reverse: bool = False, *, zoneout: Tensor | None = None,
                         cell_zoneout: Tensor | None = None,
                         recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """layernorm_lstm_cell over x (T, N, I). Returns (output (T, N, H), h_T, c_T).
    Regularisers with their masks given, as lstm_layer: zoneout, cell_zoneout (T, N, H) zone out the
    cell's h', c' against the carried h, c (zoned); recurrent_mask (N, H) multiplies h in W_hh h."""
    outputs = []
    h, c = h0, c0
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        h_new, c_new = layernorm_lstm_cell(x[t], h, c, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight,
                                           ln_cell_weight, ln_cell_bias, recurrent_mask)
        c = zoned(cell_zoneout, t, c, c_new)
        h = zoned(zoneout, t, h, h_new)
        outputs.append(h)
    if reverse:
        outputs.reverse()
    return torch.stack(outputs), h, c


def layernorm_gru_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                        ln_ih_weight: Tensor, ln_hh_weight: Tensor, reverse: bool = False, *,
                        zoneout: Tensor | None = None, recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """layernorm_gru_cell over x (T, N, I). Returns (output (T, N, H), h_T). Regularisers: see
    layernorm_lstm_layer."""
    outputs = []
    h = h0
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        h = zoned(zoneout, t, h, layernorm_gru_cell(x[t], h, w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_hh_weight,
                                                    recurrent_mask))
        outputs.append(h)
    if reverse:
        outputs.reverse()
    return torch.stack(outputs), h


def layer_over_lengths(layer, x: Tensor, lengths: list[int], states: list[Tensor], *weights: Tensor | None,
                       reverse: bool = False) -> tuple[Tensor, list[Tensor]]:
    """What an RNN op computes on a PackedSequence: ``layer`` (lstm_layer, gru_layer) run on each
    sequence n of the padded x (T, N, I) over its own length lengths[n], from its own row of each
    initial state (N, *). Returns the padded output (T, N, H_out), zero past each length, and the
    final states, each sequence's from its own last step (its first, when reverse)."""
    outputs, finals = [], [[] for _ in states]
    for n, length in enumerate(lengths):
        out, *last = layer(x[:length, n:n + 1], *(s[n:n + 1] for s in states), *weights, reverse=reverse)
        outputs.append(out[:, 0])
        for kind, value in enumerate(last):
            finals[kind].append(value)
    padded = torch.nn.utils.rnn.pad_sequence(outputs)
    padded = torch.cat([padded, padded.new_zeros(x.shape[0] - padded.shape[0], *padded.shape[1:])])
    return padded, [torch.cat(f) for f in finals]


def repeat_kv_heads(t: Tensor, heads_q: int) -> Tensor:
    """K or V (..., H_k, L, D) repeated so that head j serves the H_q / H_k consecutive query
    heads j*G .. j*G+G-1 (torch's enable_gqa); unchanged when H_k == heads_q."""
    if t.shape[-3] == heads_q:
        return t
    return t.repeat_interleave(heads_q // t.shape[-3], dim=-3)


def attention_scores(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                     scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """q k^T * scale with the causal mask (top-left aligned) and attn_mask applied: (..., H, Lq, Lk),
    -inf where a boolean mask or the causal mask removes a key, the additive mask added otherwise."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa:
        k = repeat_kv_heads(k, q.shape[-3])
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
              is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> Tensor:
    """softmax(q k^T * scale + mask) v, materialising the (Lq, Lk) matrix.

    Layout (..., H, L, D) like torch's scaled_dot_product_attention. The causal
    mask is aligned top-left (query i sees keys 0..i), as torch does. With
    enable_gqa, each K/V head serves H_q / H_k consecutive query heads. Rows whose
    keys are all masked come out as NaN, as torch's math path gives.
    """
    scores = attention_scores(q, k, attn_mask, is_causal, scale, enable_gqa)
    if enable_gqa:
        v = repeat_kv_heads(v, q.shape[-3])
    return torch.softmax(scores, dim=-1) @ v


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     causal: bool = False, scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                     dropout: Tensor | None = None) -> Tensor:
    """FlashAttention-2's variable-length attention, one sequence at a time, materialising each (Lq, Lk) matrix.

    q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv); sequence b owns rows
    [cu_seqlens[b], cu_seqlens[b + 1]). Query i of a sequence sees keys j with
    i + Lk - Lq - left <= j <= i + Lk - Lq + right (bottom-right aligned; -1 unbounded; causal: right = 0).
    Rows that see no key (no keys at all, or none in the window) give 0. ``dropout`` (B, Hq, >= Lq, >= Lk),
    if given, multiplies the probabilities (0 or 1 / (1 - p)).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    left, right = window_size
    if causal:
        right = 0
    heads_q = q.shape[1]
    out = q.new_zeros(q.shape[0], heads_q, v.shape[-1])
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        qs, ks, vs = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        ks, vs = repeat_kv_heads(ks, heads_q), repeat_kv_heads(vs, heads_q)
        len_q, len_k = q1 - q0, k1 - k0
        i = torch.arange(len_q, device=q.device)[:, None] + (len_k - len_q)
        j = torch.arange(len_k, device=q.device)[None, :]
        keep = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
        scores = (qs @ ks.transpose(-2, -1) * scale).masked_fill(~keep, float("-inf"))
        none_seen = ~keep.any(dim=-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(none_seen, 0.0), dim=-1).masked_fill(none_seen, 0.0)
        if dropout is not None:
            probs = probs * dropout[b, :, :len_q, :len_k].to(probs.dtype)
        out[q0:q1] = (probs @ vs).transpose(0, 1)
    return out


# ---------------------------------------------------------------- generation: logits processing
# Hugging Face's semantics (transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
# TopKLogitsWarper, TopPLogitsWarper, applied in that order), written out in plain PyTorch.

def repetition_penalty(scores: Tensor, token_ids: Tensor, penalty: float) -> Tensor:
    """Scores (N, V) of tokens present in token_ids (N, T): divided by penalty if > 0, else multiplied."""
    seen = torch.gather(scores, 1, token_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, token_ids, seen)


def process_logits(scores: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then top-p on scores (N, V); removed tokens become -inf.

    top-k keeps every score >= the k-th largest (ties kept). top-p sorts ascending and
    removes tokens whose cumulative probability is <= 1 - top_p, keeping at least the
    largest. top_k=0 / top_p=1 disable the filter.
    """
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def draw_from_scores(scores: Tensor, uniforms: Tensor) -> Tensor:
    """One token per row of scores (N, V): the inverse CDF of softmax(scores), in vocabulary
    order, at uniforms (N,) in [0, 1). The first index whose cumulative mass exceeds u * total."""
    cdf = torch.softmax(scores.to(torch.float64), dim=-1).cumsum(dim=-1)
    target = uniforms.to(torch.float64)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last_kept = (scores.shape[-1] - 1) - torch.isfinite(scores).flip(-1).int().argmax(dim=-1)
    return torch.minimum(tokens, last_kept)
