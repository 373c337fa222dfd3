"""Drop-in ``MultiheadAttention`` on genfast's attention, and ``replace_attention``.

``MultiheadAttention`` subclasses torch.nn.MultiheadAttention, so the constructor,
parameters (names, shapes, initialisation), state_dict and isinstance checks are
torch's own. Only forward differs: with ``need_weights=False`` the attention runs
through genfast.nn.functional.scaled_dot_product_attention (fused kernels); with
``need_weights=True`` the weights are materialised (unfused, as torch does too).
A ``key_padding_mask`` that pads only at the end of each row (the usual padded batch)
becomes per-row key lengths for genfast.nn.functional.flash_attn_varlen, so padded keys
cost nothing; any other padding mask is applied as a mask.
The steps mirror torch.nn.functional.multi_head_attention_forward, using its mask
and projection helpers so masks, biases and errors behave identically.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genfast.nn import functional as gf


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with genfast's scaled_dot_product_attention inside."""

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """A genfast module with the same configuration, sharing ``module``'s parameters."""
        new = cls.__new__(cls)
        new.__dict__ = module.__dict__.copy()
        # Own registries holding the same Parameter objects: the weights are shared, not copied.
        for registry in ("_parameters", "_buffers", "_modules"):
            new.__dict__[registry] = type(module.__dict__[registry])(module.__dict__[registry])
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                   is_causal):
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint says attn_mask is the causal mask: the kernel's causal flag does it
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
            q, k, v = F._in_projection_packed(query, key, value, self.in_proj_weight, self.in_proj_bias)
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                     f"{value.shape[:2]}")
            b_q = b_k = b_v = None
            if self.in_proj_bias is not None:
                b_q, b_k, b_v = self.in_proj_bias.chunk(3)
            q, k, v = F._in_projection(query, key, value, self.q_proj_weight, self.k_proj_weight,
                                       self.v_proj_weight, b_q, b_k, b_v)
        src_len = key.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * num_heads, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                     f"{key_padding_mask.shape}")
            lengths = None
            if not need_weights and attn_mask is None:
                lengths = _end_padded_lengths(key_padding_mask, q)
            if lengths is not None:  # keys padded at the end of each row: per-row key lengths, no mask
                out = _varlen_attention(q, k, v, lengths, num_heads, self.dropout if self.training else 0.0)
                out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
                return (out if is_batched else out.squeeze(1)), None
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:  # unfused: the weights are an output
            if is_causal and attn_mask is None:
                raise AssertionError("is_causal without attn_mask is not implemented for need_weights")
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = torch.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights

        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = gf.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
        return out, None


def _end_padded_lengths(key_padding_mask: Tensor, q: Tensor) -> Tensor | None:
    """Each row's count of kept keys when ``key_padding_mask`` (bsz, S; additive: 0 keep, -inf pad) pads
    only at the end of every row, else None (a mask to apply as it is). Checked on the (bsz, S) mask only."""
    if (torch.compiler.is_compiling() or key_padding_mask.requires_grad or q.dtype not in gf._FLOATS
            or gf.varlen_unavailable(q.device) is not None):
        return None
    keep = key_padding_mask == 0
    if not bool((keep | key_padding_mask.isneginf()).all()):
        return None  # other additive values: a real mask
    lengths = keep.sum(dim=1)
    prefix = torch.arange(keep.shape[1], device=keep.device) < lengths[:, None]
    return lengths if torch.equal(prefix, keep) else None


def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, num_heads: int, dropout_p: float) -> Tensor:
    """Attention of q (bsz * H, L, hd) over the first lengths[b] keys of k, v (bsz * H, S, hd) of each batch row,
    through genfast.nn.functional.flash_attn_varlen. Returns (L * bsz, H * hd), rows ordered as torch's."""
    bh, tgt_len, head_dim = q.shape
    bsz = bh // num_heads
    src_len = k.shape[1]
    q_packed = q.view(bsz, num_heads, tgt_len, head_dim).transpose(1, 2).reshape(bsz * tgt_len, num_heads, head_dim)
    keep = torch.arange(src_len, device=q.device) < lengths[:, None]
    k_packed = k.view(bsz, num_heads, src_len, head_dim).transpose(1, 2)[keep]
    v_packed = v.view(bsz, num_heads, src_len, head_dim).transpose(1, 2)[keep]
    cu_q = torch.arange(bsz + 1, dtype=torch.int32, device=q.device) * tgt_len
    cu_k = torch.zeros(bsz + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = lengths.cumsum(0)
    max_k = int(lengths.max()) if bsz else 0
    out = gf.flash_attn_varlen(q_packed, k_packed, v_packed, cu_q, cu_k, tgt_len, max_k, dropout_p=dropout_p)
    gf._record(gf.last_dispatch()["backend"],
               "MultiheadAttention: key_padding_mask pads at the end of each row -> per-row key lengths (varlen)")
    return out.view(bsz, tgt_len, num_heads * head_dim).transpose(0, 1).reshape(tgt_len * bsz, num_heads * head_dim)


def replace_attention(model: nn.Module) -> nn.Module:
    """Swap every torch.nn.MultiheadAttention inside ``model`` for genfast's, in place, keeping weights.

    Returns ``model`` (or the replacement, when ``model`` itself is a MultiheadAttention).
    """
    if isinstance(model, nn.MultiheadAttention) and not isinstance(model, MultiheadAttention):
        return MultiheadAttention.from_torch(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention) and not isinstance(child, MultiheadAttention):
            setattr(model, name, MultiheadAttention.from_torch(child))
        else:
            replace_attention(child)
    return model


__all__ = ["MultiheadAttention", "replace_attention"]
