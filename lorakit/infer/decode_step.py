"""The decode step's math and weights, for the Llama/Qwen2 family: one new token per row, in two halves per layer.

Pure functions over plain tensors (no module state), so `fast_decode.StaticDecoder` can compile each half with
torch.compile and capture a whole step in a CUDA graph; and the weights as the step reads them (`LayerWeights`):
q/k/v stacked into one matrix, and a live LoRA adapter's stacked A rows placed under the q/k/v and o weights
(one product gives both), its other A and B matrices as fixed buffers (lorakit.infer.live_lora).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorakit.infer.live_lora import LoraGroup, add_lora, base_linear

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama/Qwen2 compute it: normalise in float32, scale in the input dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form). x [B, H, D]; cos, sin [B, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def linear_with_lora_rows(x, w, b, lora_b=None):
    """x W^T + b, where a live adapter's A rows may sit under W: then the product's last r columns are x A^T, and
    (x A^T) (s B)^T is added to the rest (lora_b: s B [out, r]). One read of W and A instead of two products."""
    out = F.linear(x, w, b)
    if lora_b is None:
        return out
    rank = lora_b.shape[1]
    return out[:, :-rank] + F.linear(out[:, -rank:], lora_b)


def attention_in(h, ln, w_qkv, b_qkv, cos, sin, eps: float, n_heads: int, n_kv: int, lora_qkv_b=None):
    """First half of a layer for one new token per row: h [B, hidden] -> q [B, H, D] and the new keys and
    values stacked, kv [2, B, KV, D] (one tensor, so one write puts both in the cache).

    q, k and v come from one matrix product with the three weights stacked (one large read of
    the weights instead of two small ones that cannot reach full memory bandwidth). With a live
    adapter, its stacked A rows sit under them (lora_qkv_b is then s B, [q+k+v out, r]): the same
    product gives x A^T, and only the B product is extra."""
    x = rms_norm(h, ln, eps)
    batch = h.shape[0]
    out = linear_with_lora_rows(x, w_qkv, b_qkv, lora_qkv_b)
    q, k, v = out.view(batch, n_heads + 2 * n_kv, -1).split([n_heads, n_kv, n_kv], dim=1)
    return rotate(q, cos, sin), torch.stack((rotate(k, cos, sin), v))


def attention_out_mlp(h, q, k_cache, v_cache, mask, wo, bo, ln, wg, bg, wu, bu, wd, bd, eps: float,
                      lora_o_b=None, lora_gate_up=None, lora_down=None):
    """Second half: attend over the cache, project, residual, SwiGLU MLP, residual.

    q [B, H, D]; k_cache, v_cache [B, KV, L, D]; mask [B, L] (0 where visible, -inf elsewhere).
    The H // KV query heads sharing a KV head attend as that head's 'query rows', so grouped
    attention needs no copy of the cache.
    """
    batch, n_heads, dim = q.shape
    n_kv = k_cache.shape[1]
    grouped = q.view(batch, n_kv, n_heads // n_kv, dim)
    o = F.scaled_dot_product_attention(grouped, k_cache, v_cache, attn_mask=mask[:, None, None, :])
    o = o.reshape(batch, n_heads * dim)
    h = h + linear_with_lora_rows(o, wo, bo, lora_o_b)
    x = rms_norm(h, ln, eps)
    gate, up = F.linear(x, wg, bg), F.linear(x, wu, bu)
    if lora_gate_up is not None:  # the live adapter (lorakit.infer.live_lora): one stacked pair for gate and up
        extra = F.linear(F.linear(x, lora_gate_up[0]), lora_gate_up[1])
        gate, up = gate + extra[:, :gate.shape[1]], up + extra[:, gate.shape[1]:]
    act = F.silu(gate) * up
    return h + add_lora(F.linear(act, wd, bd), act, lora_down)


def final_logits(h, norm, head, eps: float) -> torch.Tensor:
    return F.linear(rms_norm(h, norm, eps), head).float()


# ---------------------------------------------------------------- the weights


@dataclass
class LayerWeights:
    attn_in: tuple
    attn_out: tuple
    lora: list[LoraGroup] | None = None  # qkv, o, gate+up, down: a live adapter's stacked tensors


def lora_kwargs(weights: LayerWeights) -> tuple[dict, dict]:
    if weights.lora is None:
        return {}, {}
    qkv, o, gate_up, down = (g.tensors for g in weights.lora)
    return ({"lora_qkv_b": qkv[1] if qkv else None},
            {"lora_o_b": o[1] if o else None, "lora_gate_up": gate_up, "lora_down": down})


def layer_weights(layer, live_lora: bool = False) -> LayerWeights:
    a, m = layer.self_attn, layer.mlp
    qkv_rank = LoraGroup.rank_of([a.q_proj, a.k_proj, a.v_proj]) if live_lora else 0
    o_rank = LoraGroup.rank_of([a.o_proj]) if live_lora else 0
    o, g, u, d = (base_linear(p) for p in (a.o_proj, m.gate_proj, m.up_proj, m.down_proj))
    w_qkv, b_qkv = _stacked([a.q_proj, a.k_proj, a.v_proj], qkv_rank)  # always a copy: one product for q, k, v
    w_o, b_o = _stacked([a.o_proj], o_rank) if o_rank else (o.weight, o.bias)  # a copy only to hold A rows
    lora = None
    if live_lora:
        dtype = w_qkv.dtype
        lora = [LoraGroup([a.q_proj, a.k_proj, a.v_proj], dtype, a_rows=w_qkv[w_qkv.shape[0] - qkv_rank:]),
                LoraGroup([a.o_proj], dtype, a_rows=w_o[w_o.shape[0] - o_rank:] if o_rank else None),
                LoraGroup([m.gate_proj, m.up_proj], dtype), LoraGroup([m.down_proj], dtype)]
    return LayerWeights(
        attn_in=(layer.input_layernorm.weight, w_qkv, b_qkv),
        attn_out=(w_o, b_o, layer.post_attention_layernorm.weight, g.weight, g.bias, u.weight, u.bias,
                  d.weight, d.bias),
        lora=lora,
    )


def _stacked(modules: list, rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The modules' base weights stacked (a copy) with `rank` zero rows under them, where a live adapter's
    stacked A goes (its LoraGroup fills and refreshes them); the biases alike (None when none has one)."""
    linears = [base_linear(m) for m in modules]
    ref = linears[0].weight
    weight = torch.cat([p.weight.detach() for p in linears] + [ref.new_zeros(rank, ref.shape[1])])
    if all(p.bias is None for p in linears):
        return weight, None
    bias = torch.cat([p.bias.detach() if p.bias is not None else ref.new_zeros(p.out_features) for p in linears]
                     + [ref.new_zeros(rank)])
    return weight, bias
