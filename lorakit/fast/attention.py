"""Per-sample causal attention for packed rows, without a [T, T] mask.

A packed row holds several samples; position_ids restart at 0 at each. The transformers SDPA path
then builds a 4-D boolean mask, which rules out the flash kernel and spends the full T^2 causal
work on pairs that are masked anyway. Here the rows are flattened to one token stream with
cumulative sample boundaries (cu_seqlens) and handed to torch's variable-length flash attention
(torch.nn.attention.varlen), which does only the per-sample work.

Reference beside it: `masked_attention`, plain SDPA with the block-diagonal causal mask built from
the same boundaries (used on CPU, and by the CPU test that checks it against separate samples).

A shared prefix (a preference pair's prompt, run once for both answers: `fast.joined_prefix_hidden`) is a
segment whose keys other segments also read: `key_index` lists, segment by segment, the tokens each one
attends to (its own, after the prefix's where it continues the prefix), and cu_seq_lens_k their boundaries.
Causal masking is aligned at the segment's end (flash attention's rule when keys outnumber queries), so an
answer token sees the whole prefix and the answer tokens up to itself.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "lorakit_varlen"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - older torch
    _varlen_attn, _VARLEN_PARAMS = None, set()


def packed_boundaries(
    position_ids: torch.Tensor | None,
    shape: tuple[int, int],
    attention_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """int32 cu_seqlens [S + 1] over the flattened [B * T] tokens.

    A segment starts at each row start, at each position_id == 0, wherever attention_mask
    switches between real and padding tokens (so padding never shares a segment with a sample),
    and wherever `starts` ([B * T] bool: rows joined into one, their padding dropped) is set.
    """
    b, t = shape
    if device is None:
        device = next((x.device for x in (position_ids, attention_mask) if x is not None), None)
    begins = torch.zeros(b, t, dtype=torch.bool, device=device)
    begins[:, 0] = True
    if position_ids is not None:
        begins |= position_ids.expand(b, t) == 0
    if attention_mask is not None:
        m = attention_mask.bool()
        begins[:, 1:] |= m[:, 1:] != m[:, :-1]
    if starts is not None:
        begins |= starts.reshape(b, t)
    idx = begins.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([b * t], device=idx.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


def _segments(cu_seqlens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment id, offset from the segment's end) of each of n stream positions."""
    seg = torch.zeros(n, dtype=torch.int64, device=cu_seqlens.device)
    seg[cu_seqlens[1:-1].long()] = 1
    seg = seg.cumsum(0)
    ends = cu_seqlens[1:].long()[seg]
    return seg, torch.arange(n, device=cu_seqlens.device) - ends


def masked_attention(q, k, v, cu_seqlens, scale, cu_seqlens_k=None):
    """Reference: SDPA over the flattened stream with a block-diagonal causal mask.

    q: [N, Hq, D]; k, v: [N, Hkv, D] (or [K, Hkv, D] with cu_seqlens_k [S + 1]: each segment's keys, causal
    masking aligned at the segment's end); cu_seqlens: [S + 1]. Returns [N, Hq, D].
    """
    seg_q, from_end_q = _segments(cu_seqlens, q.shape[0])
    seg_k, from_end_k = _segments(cu_seqlens if cu_seqlens_k is None else cu_seqlens_k, k.shape[0])
    mask = (seg_q[:, None] == seg_k[None, :]) & (from_end_k[None, :] <= from_end_q[:, None])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, scale=scale
    )
    return out[0].transpose(0, 1)


def varlen_attention(q, k, v, cu_seqlens, max_len: int, scale, cu_seqlens_k=None, max_len_k: int | None = None):
    """torch varlen flash attention (causal within each segment, aligned at its end). Shapes as masked_attention."""
    kwargs = {"scale": scale}
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "enable_gqa" in _VARLEN_PARAMS and q.shape[1] != k.shape[1]:
        kwargs["enable_gqa"] = True
    if cu_seqlens_k is None:
        cu_seqlens_k, max_len_k = cu_seqlens, max_len
    return _varlen_attn(q, k, v, cu_seqlens, cu_seqlens_k, max_len, max_len_k, **kwargs)


def packed_attention_forward(
    module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, cu_seq_lens_q=None, cu_seq_lens_k=None,
    key_index=None, **kwargs
):
    """transformers attention interface: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> [B, T, Hq, D].

    cu_seq_lens_q (from packed_boundaries, passed through the model's forward kwargs) marks the
    packed samples; without it every row is one causal sequence and plain causal SDPA runs (its
    fastest kernel for the card). key_index with cu_seq_lens_k (a shared prefix, see the module's
    docstring): each segment's keys gathered from the stream. Packed rows use varlen flash attention on
    CUDA, the masked reference elsewhere.
    """
    if dropout:
        raise ValueError("lorakit packed attention has no attention dropout; set attention_dropout=0")
    b, hq, t, d = query.shape
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    if key_index is not None:
        k, v = k.index_select(0, key_index), v.index_select(0, key_index)
    else:
        cu_seq_lens_k = None
    if query.is_cuda and _varlen_attn is not None:
        out = varlen_attention(q, k, v, cu_seq_lens_q, t, scaling, cu_seq_lens_k, k.shape[0])
    else:
        out = masked_attention(q, k, v, cu_seq_lens_q, scaling, cu_seq_lens_k)
    return out.reshape(b, t, hq, d), None


def register() -> str:
    """Make the packed attention selectable as config._attn_implementation; returns its name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    return ATTN_IMPLEMENTATION
