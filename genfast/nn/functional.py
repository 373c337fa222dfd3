"""Drop-in ``scaled_dot_product_attention`` with torch's signature, semantics and errors.

Dispatch (the last decision is kept: ``last_dispatch()``, and logged at DEBUG level):
  CPU tensors             -> genfast's fused C++ kernel (torch.ops.genfast.attention_forward)
  CPU with dropout_p > 0  -> genfast's documented non-fused path: the softmax matrix is
                             materialised and torch.nn.functional.dropout (torch's generator) applied
  CUDA tensors            -> the same op, whose CUDA kernel is Triton (kernels/flash_attention.py),
                             when it supports the call (fp16/bf16/fp32, head dim <= 256, no mask
                             gradient), else torch's SDPA; masks are read in the kernel, dropout
                             (Philox, seeded from torch's CUDA generator) runs in
                             kernels/flash_attention.flash_attention
One route for genfast's kernels on every device: torch.ops.genfast.attention_forward, with its
autograd in csrc/attention_autograd.cpp.
  anything else           -> torch's SDPA
Calls that genfast does not handle go to torch's SDPA with the reason recorded.

``flash_attn_varlen`` (FlashAttention-2's packed variable-length layout) records its route too:
``genfast-cpu-varlen`` (torch.ops.genfast.attention_varlen_forward, C++) or ``genfast-triton-varlen``.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from genfast import reference

logger = logging.getLogger(__name__)

_last_dispatch: dict = {"backend": None, "reason": "no call yet"}

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def last_dispatch() -> dict:
    """Which backend the latest scaled_dot_product_attention call used, and why."""
    return dict(_last_dispatch)


_warned_missing: set[str] = set()


def _warn_missing_kernel(reason: str) -> None:
    """A missing kernel (not an unsupported argument) is said loudly, once per reason."""
    if reason not in _warned_missing and not torch.compiler.is_compiling():
        _warned_missing.add(reason)
        warnings.warn(f"genfast.nn.functional.scaled_dot_product_attention: {reason}; using torch's "
                      "scaled_dot_product_attention instead", stacklevel=3)


def _record(backend: str, reason: str) -> None:
    # Skipped while torch.compile traces: logging would break the graph, and the
    # decision is made once at trace time anyway.
    if torch.compiler.is_compiling():
        return
    _last_dispatch["backend"] = backend
    _last_dispatch["reason"] = reason
    logger.debug("scaled_dot_product_attention -> %s (%s)", backend, reason)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Same as torch.nn.functional.scaled_dot_product_attention, on genfast's kernels.

    query (..., Hq, L, E), key (..., Hk, S, E), value (..., Hk, S, Ev); leading dims broadcast.
    Rows whose keys are all masked give 0, as torch's CPU kernel does.
    """
    if _plain_cpu_call(query, key, value, attn_mask, dropout_p):
        # The common call, checked in a few steps: the general checks below cost about as much
        # as the kernel of a one-query-row call.
        _record("genfast-cpu", "fused C++ kernel")
        scale_value = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        return _attention_forward()(query, key, value, None, is_causal, scale_value)[0]
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(
            "scaled_dot_product_attention: expected query, key, and value to all be at least 2 dimensional, "
            f"but got query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            "scaled_dot_product_attention: expected query, key, and value to have the same dtype, but got "
            f"query.dtype: {query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    if not (query.device == key.device == value.device):
        raise RuntimeError(
            "scaled_dot_product_attention: expected query, key, and value to be on the same device, but got "
            f"{query.device}, {key.device} and {value.device}.")
    if query.dtype not in _FLOATS:
        raise RuntimeError(f"scaled_dot_product_attention: query must be a floating point tensor, got {query.dtype}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(
            f"scaled_dot_product_attention: query and key must have the same embedding size, got "
            f"query.shape[-1]={query.shape[-1]} and key.shape[-1]={key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(
            f"scaled_dot_product_attention: key and value must have the same sequence length, got "
            f"key.shape[-2]={key.shape[-2]} and value.shape[-2]={value.shape[-2]}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise RuntimeError(
                "scaled_dot_product_attention: expected attn_mask dtype to be bool or to match query dtype, "
                f"but got attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")
        if attn_mask.device != query.device:
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask is on {attn_mask.device}, "
                               f"query on {query.device}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1], got {dropout_p}")

    batch, heads_q, heads_kv, out_lead = _leading_shapes(query, key, value, enable_gqa)
    len_q, len_k = query.shape[-2], key.shape[-2]
    out_shape = (*out_lead, len_q, value.shape[-1])
    if attn_mask is not None:
        full = (*out_lead, len_q, len_k)
        try:
            fits = attn_mask.shape == full or torch.broadcast_shapes(attn_mask.shape, full) == torch.Size(full)
        except RuntimeError:
            fits = False
        if not fits:
            raise RuntimeError(
                f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                f"to the attention shape {full} (batch..., heads, query length, key length)")
    scale_value = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)

    def torch_sdpa(reason: str) -> Tensor:
        _record("torch", reason)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    device = query.device.type
    if device == "cpu":
        if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
            return torch_sdpa("attn_mask requires grad; genfast's kernel gives no mask gradient")
        if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
            return torch_sdpa("empty input")
        q4, k4, v4, mask4 = _to_bhld(query, key, value, attn_mask, batch, heads_q, heads_kv)
        if dropout_p > 0.0:
            _record("genfast-cpu-unfused", "dropout_p > 0: softmax materialised, torch dropout applied")
            out = _attention_with_dropout(q4, k4, v4, mask4, is_causal, scale_value, dropout_p)
        else:
            _record("genfast-cpu", "fused C++ kernel")
            out, _ = _attention_forward()(q4, k4, v4, mask4, is_causal, scale_value)
        return out.reshape(out_shape)

    if device == "cuda":
        reason = _triton_unsupported(query, key, value, attn_mask, dropout_p, is_causal)
        if reason is None:
            from genfast.ops.attention import cuda_kernel_error

            reason = cuda_kernel_error()
            if reason is not None:
                _warn_missing_kernel(reason)
        if reason is not None:
            return torch_sdpa(reason)
        q4, k4, v4, mask4 = _to_bhld(query, key, value, attn_mask, batch, heads_q, heads_kv)
        if dropout_p > 0.0:
            # The op's schema has no dropout: the kernel module's own autograd.Function, whose backward
            # regenerates the Philox mask from the seed it drew from torch's CUDA generator.
            _record("genfast-triton", "flash_attention kernel, in-kernel dropout"
                    + (" and mask" if attn_mask is not None else ""))
            from genfast.ops.attention import _flash

            out = _flash().flash_attention(q4, k4, v4, causal=is_causal, scale=scale_value, attn_mask=mask4,
                                           dropout_p=dropout_p)
        else:
            _record("genfast-triton", "flash_attention kernel" + (", in-kernel mask" if attn_mask is not None else ""))
            out, _ = _attention_forward()(q4, k4, v4, mask4, is_causal, scale_value)
        return out.reshape(out_shape)

    _warn_missing_kernel(f"no genfast kernel for device {device!r}")
    return torch_sdpa(f"no genfast kernel for device {device!r}")


def _plain_cpu_call(query, key, value, attn_mask, dropout_p) -> bool:
    """(B, H, L, D) CPU tensors of one floating dtype with matching shapes, no mask, no dropout."""
    if attn_mask is not None or dropout_p != 0.0 or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _FLOATS:
        return False
    if not (query.device.type == "cpu" and key.device == query.device and value.device == query.device):
        return False
    b, h, _, d = query.shape
    return (key.shape[0] == value.shape[0] == b and key.shape[1] == value.shape[1] == h and key.shape[3] == d
            and key.shape[2] == value.shape[2] and query.numel() > 0 and key.numel() > 0 and value.numel() > 0)


def _attention_forward():
    # Imported on first use: genfast.ops loads the compiled extension.
    from genfast.ops.attention import attention_forward
    return attention_forward


def _leading_shapes(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """(batch dims, query heads, key/value heads, output's leading dims) by torch's broadcasting rules."""
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and value.dim() >= 3:
        heads_q, heads_k, heads_v = query.shape[-3], key.shape[-3], value.shape[-3]
        if heads_k != heads_v or heads_k == 0 or heads_q % heads_k != 0:
            raise RuntimeError(
                "scaled_dot_product_attention: number of heads in key and value must be equal and divide the "
                f"number of heads in query, got query {heads_q}, key {heads_k}, value {heads_v}")
        batch = tuple(_broadcast(query.shape[:-3], key.shape[:-3], value.shape[:-3]))
        return batch, heads_q, heads_k, (*batch, heads_q)
    try:
        lead = _broadcast(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError as err:
        hint = ""
        if query.dim() >= 3 and key.dim() >= 3 and query.shape[-3] != key.shape[-3]:
            hint = (f" (query has {query.shape[-3]} heads and key {key.shape[-3]}: "
                    "pass enable_gqa=True for grouped-query attention)")
        raise RuntimeError(f"scaled_dot_product_attention: the leading dims of query {tuple(query.shape)}, "
                           f"key {tuple(key.shape)} and value {tuple(value.shape)} do not broadcast{hint}") from err
    lead = tuple(lead)
    if not lead:
        return (), 1, 1, ()
    return lead[:-1], lead[-1], lead[-1], lead


def _broadcast(*shapes: torch.Size) -> torch.Size:
    # torch.broadcast_shapes is Python over every dim, slow next to a small kernel; equal shapes are the usual case.
    return shapes[0] if all(s == shapes[0] for s in shapes) else torch.broadcast_shapes(*shapes)


def _to_bhld(query, key, value, attn_mask, batch, heads_q, heads_kv):
    """Broadcast and flatten to (B, H, L, D); views where the strides allow."""
    def flat(x: Tensor, heads: int) -> Tensor:
        if x.dim() == 4 and x.shape[:2] == (*batch, heads):  # already (B, H, L, D)
            return x
        x = x.expand(*batch, heads, x.shape[-2], x.shape[-1])
        return x.reshape(-1, heads, x.shape[-2], x.shape[-1])

    q4, k4, v4 = flat(query, heads_q), flat(key, heads_kv), flat(value, heads_kv)
    mask4 = attn_mask
    if attn_mask is not None and (len(batch) != 1 or attn_mask.dim() > 4):
        mask4 = attn_mask.expand(*batch, heads_q, query.shape[-2], key.shape[-2])
        mask4 = mask4.reshape(-1, heads_q, query.shape[-2], key.shape[-2])
    return q4, k4, v4, mask4


def _attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                            scale: float, dropout_p: float) -> Tensor:
    """The textbook equations plus dropout on the probabilities (torch's generator).

    Fully masked rows give 0, like the fused kernel and torch's CPU SDPA.
    """
    scores = reference.attention_scores(q, k, attn_mask, is_causal, scale, enable_gqa=True)
    v = reference.repeat_kv_heads(v, q.shape[1])
    all_masked = scores.isneginf().all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(all_masked, 0.0), dim=-1).masked_fill(all_masked, 0.0)
    probs = F.dropout(probs, p=dropout_p, training=True)
    return probs @ v


def _triton_unsupported(query, key, value, attn_mask, dropout_p, is_causal) -> str | None:
    """Why the Triton kernel cannot take this call, or None if it can (masks and dropout run in it)."""
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        return "attn_mask requires grad; the Triton kernel gives no mask gradient"
    if query.dtype not in _TRITON_DTYPES:
        return f"dtype {query.dtype} not supported by the Triton kernel"
    if query.shape[-1] > 256:
        return f"head dim {query.shape[-1]} > 256"
    if value.shape[-1] != query.shape[-1]:
        return "value head dim differs from query's"
    # The Triton kernel aligns the causal mask top-left, as torch does, so Lq != Lk is fine.
    return None


# ---- variable-length batches (FlashAttention-2's flash_attn_varlen_func) ------------------------------

def flash_attn_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False, scale: float | None = None,
                      window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0) -> Tensor:
    """Attention over a packed batch of sequences of different lengths, FlashAttention-2's layout.

    q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv) with Hq a multiple of Hk (GQA);
    cu_seqlens_q / cu_seqlens_k int32 (B + 1): sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1]),
    at most max_seqlen_q / max_seqlen_k of them. Returns (total_q, Hq, Dv).

    Causal is aligned **bottom-right**, as in FlashAttention-2 >= 2.1: query i of a sequence with Lq
    queries and Lk keys sees keys j <= i + Lk - Lq. (torch's ``is_causal`` is aligned top-left: j <= i;
    the two agree when Lq == Lk.) ``window_size=(left, right)`` limits query i to keys
    i + Lk - Lq - left <= j <= i + Lk - Lq + right (-1: unbounded); causal sets right to 0. A query that
    sees no key (a sequence without keys, or an empty window) gives 0 and passes no gradient.
    ``dropout_p`` drops probabilities inside the kernel, with a mask drawn from a seed taken from
    torch's default generator (torch.manual_seed makes it repeatable) and drawn again in the backward.

    CPU: genfast's C++ kernel. CUDA: genfast.kernels.flash_attention.flash_attention_varlen (Triton).
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size, dropout_p, scale)
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window_left, window_right = (int(w) for w in window_size)
    device = q.device.type
    if device == "cpu":
        from genfast.ops.attention_varlen import attention_varlen_forward

        seed = None
        if dropout_p > 0.0:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        _record("genfast-cpu-varlen",
                "fused C++ varlen kernel" + (" with in-kernel dropout" if dropout_p > 0.0 else ""))
        out, _ = attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                          bool(causal), scale_value, window_left, window_right, float(dropout_p),
                                          seed)
        return out
    if device == "cuda":
        flash_attention_varlen = _cuda_varlen_kernel()
        if isinstance(flash_attention_varlen, str):
            raise NotImplementedError(f"flash_attn_varlen: {flash_attention_varlen}")
        _record("genfast-triton-varlen", "Triton varlen kernel")
        return flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                      causal=bool(causal), scale=scale_value,
                                      window_size=(window_left, window_right), dropout_p=float(dropout_p))
    raise NotImplementedError(f"flash_attn_varlen: no genfast kernel for device {device!r} (CPU and CUDA only)")


@functools.cache
def _cuda_varlen_kernel():
    """genfast.kernels.flash_attention.flash_attention_varlen, or a string saying why it cannot be imported
    (asked once)."""
    try:
        from genfast.kernels.flash_attention import flash_attention_varlen
    except ImportError as err:  # triton missing, or a checkout without the varlen kernel
        return ("CUDA tensors need genfast.kernels.flash_attention.flash_attention_varlen (the Triton varlen "
                f"kernel), which is not available here ({err})")
    return flash_attention_varlen


def varlen_unavailable(device: torch.device) -> str | None:
    """Why flash_attn_varlen cannot run on ``device``, or None if it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        kernel = _cuda_varlen_kernel()
        return kernel if isinstance(kernel, str) else None
    return f"no genfast varlen kernel for device {device.type!r}"


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size, dropout_p,
                  scale) -> None:
    """flash_attn_varlen's arguments, each error naming the argument at fault."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"flash_attn_varlen: {name} must be a Tensor, got {type(t).__name__}")
    for name, t, want in (("q", q, "(total_q, heads, head_dim)"), ("k", k, "(total_k, heads_kv, head_dim)"),
                          ("v", v, "(total_k, heads_kv, head_dim_v)")):
        if t.dim() != 3:
            raise ValueError(f"flash_attn_varlen: {name} must be 3-D {want}, got shape {tuple(t.shape)}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"flash_attn_varlen: q must be float32, float64, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash_attn_varlen: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens_q.device == cu_seqlens_k.device):
        raise ValueError(f"flash_attn_varlen: q, k, v, cu_seqlens_q and cu_seqlens_k must be on one device, got "
                         f"{q.device}, {k.device}, {v.device}, {cu_seqlens_q.device}, {cu_seqlens_k.device}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"flash_attn_varlen: v's (total_k, heads_kv) {tuple(v.shape[:2])} must equal k's "
                         f"{tuple(k.shape[:2])}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"flash_attn_varlen: k's head_dim {k.shape[2]} must equal q's {q.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"flash_attn_varlen: q's heads ({q.shape[1]}) must be a multiple of k's and v's "
                         f"({k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"flash_attn_varlen: {name} must be a 1-D int32 tensor of batch + 1 offsets, got "
                             f"dtype {cu.dtype} and shape {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"flash_attn_varlen: cu_seqlens_q ({cu_seqlens_q.numel()} offsets) and cu_seqlens_k "
                         f"({cu_seqlens_k.numel()}) must describe the same batch")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 0:
            raise ValueError(f"flash_attn_varlen: {name} must be an int >= 0, got {value!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window_size)):
        raise ValueError(f"flash_attn_varlen: window_size must be two ints >= -1 (left, right), got {window_size!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"flash_attn_varlen: dropout_p must be in [0, 1], got {dropout_p}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"flash_attn_varlen: scale must be a float or None, got {type(scale).__name__}")
    if torch.compiler.is_compiling():
        return  # the offsets' values are data; the CPU kernel checks them again
    for name, cu, total, longest, max_name in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")):
        offsets = cu.tolist()
        if offsets[0] != 0:
            raise ValueError(f"flash_attn_varlen: {name} must start at 0, got {offsets[0]}")
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"flash_attn_varlen: {name} must not decrease, got {offsets}")
        if offsets[-1] != total:
            raise ValueError(f"flash_attn_varlen: {name}[-1] = {offsets[-1]} must equal the rows of "
                             f"{'q' if name.endswith('q') else 'k and v'} ({total})")
        if lengths and max(lengths) > longest:
            raise ValueError(f"flash_attn_varlen: {max_name} = {longest} is less than the longest sequence in "
                             f"{name} ({max(lengths)})")


__all__ = ["scaled_dot_product_attention", "last_dispatch", "flash_attn_varlen"]
