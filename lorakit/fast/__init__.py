"""GPU fast paths for LoRA training, each switchable off, each with its reference beside it.

| part (FastOptions = the flags) | fast path                                 | reference                      |
|--------------------------------|-------------------------------------------|--------------------------------|
| --fused_loss                   | chunked linear+CE (lorakit.loss)          | full fp32 logits + CE          |
| --fused_lora                   | lorakit.fast.lora (bf16 adapter math)     | PEFT's LoRA forward            |
| --packed_attention             | varlen flash attention per packed sample; | transformers SDPA (+ 4-D mask  |
|                                | causal SDPA (cuDNN on H100) for plain rows| when packed)                   |
| --torch_compile                | torch.compile of each decoder layer       | eager                          |
| --gradient_checkpointing empty | 'auto': only as many layers as memory     | true: 'full' (HF); false: none |
| (.checkpointing)               | needs are recomputed (--gpu_memory_limit) |                                |

Measured on an H100 (experiments/train-speed-h100-2026-11-22.md): Qwen2.5-7B LoRA r16 at 4096 tokens x 2 runs at
15.7k tok/s (48.7% MFU) against 5.8k for HF+PEFT with gradient checkpointing.

The sft loop calls `prepare_for_training(model, opts)` once after LoRA is attached, then
`causal_lm_loss(model, batch, fused=opts.fused_loss)` each micro-step.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.utils.checkpoint

from lorakit.args import FastOptions  # the flags are the settings; importable from here too
from lorakit.fast import attention, lora_dropout
from lorakit.fast.lora import can_fuse, fuse_lora_layers, fuse_refusal, is_lora_linear, unfuse_lora_layers
from lorakit.kv_cache import CACHE_ARG
from lorakit.quantize import is_quantized

GIB = 1024**3


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of transformer blocks (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder().layers


def activation_bytes_per_token(config, peft_lora: bool = False) -> tuple[int, int]:
    """(bytes a layer keeps per token without recompute, bytes with full recompute), bf16.

    Without recompute a Qwen2/Llama block keeps ~6 hidden-sized tensors (input, two norm outputs,
    q, attention output, mid residual), k and v, and 3 intermediate-sized ones (gate, up, act).
    With recompute it keeps its input only. Calibrated on the H100 (experiments/train-speed-h100-2026-11-22.md);
    the fused LoRA paths (plain and 4-bit) keep no more. peft_lora: LoRA through PEFT's own forward
    (--fused_lora false, or PEFT's bitsandbytes layer), which casts each projection's input to the fp32
    adapter dtype; a compiled layer keeps about a third of those copies (saved-tensor bytes on a CPU, bf16
    Qwen2 shape, 2026-12-03: 13.7 vs 10.3 KB per token and layer).
    """
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    fp32_inputs = 4 * (6 * h + i) // 3 if peft_lora else 0
    return 2 * (6 * h + 2 * kv + 3 * i) + 256 + fp32_inputs, 2 * h


def plan_checkpointing(n_layers: int, tokens: int, full: int, ckpt: int, budget_bytes: float) -> int:
    """How many of n_layers to recompute so that their activations fit budget_bytes.

    full/ckpt: bytes per token per layer without/with recompute. The recomputed layer's own
    activations during backward count once.
    """
    spare = budget_bytes - tokens * (n_layers * ckpt + full)
    keep = math.floor(spare / max(1, tokens * (full - ckpt)))
    return min(n_layers, max(0, n_layers - keep))


def planned_limit_gib(opts: FastOptions, quantized: bool, device: torch.device | None = None) -> float | None:
    """The peak the 'auto' recompute plan keeps under: --gpu_memory_limit, else 92% of the card (None when
    no card is visible); a quantized base without --gpu_memory_limit plans for the least memory (0: every
    layer recomputes, as HF+PEFT's gradient checkpointing does): a user who picks --quant_bits wants that."""
    if opts.gpu_memory_limit:
        return opts.gpu_memory_limit
    if quantized:
        return 0.0
    if not torch.cuda.is_available():
        return None
    return 0.92 * torch.cuda.get_device_properties(device or torch.cuda.current_device()).total_memory / GIB


def _memory_budget(limit_gib: float, device: torch.device, reserve_bytes: float) -> float:
    return limit_gib * GIB - torch.cuda.memory_allocated(device) - reserve_bytes


def dequantized_bytes(layers) -> int:
    """The largest 4-bit weight de-quantized to its compute dtype: the fused 4-bit LoRA and bitsandbytes'
    matmul hold one such weight at a time (forward, recompute and backward), never one per layer."""
    sizes = [math.prod(m.weight.quant_state.shape) * torch.finfo(m.compute_dtype or torch.bfloat16).bits // 8
             for m in layers.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None
             and hasattr(m, "compute_dtype")]
    return max(sizes, default=0)


def _reserve(layers, config) -> float:
    """Bytes the step needs beside activations: one lm_head chunk (bf16 logits + gradient, as in
    lorakit.loss), adapter gradients and AdamW moments (not allocated yet at the first step), the
    de-quantized weight of a 4-bit base, slack."""
    trainable = sum(p.numel() * p.element_size() for p in layers.parameters() if p.requires_grad)
    return 0.5 * GIB + 6 * 1024 * config.vocab_size + 3 * trainable + dequantized_bytes(layers)


def _body_pre_hook(opts: FastOptions, layers, config, reference_attn: str, limit_gib: float | None,
                   module, args, kwargs):
    """Per forward: cu_seqlens for packed attention; which layers recompute ('auto').

    Generation (a KV cache, padding masks) goes through the model's own attention instead.
    """
    module._lorakit_unpadded = None
    prefix_layout, module._lorakit_prefix_layout = getattr(module, "_lorakit_prefix_layout", None), None
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs["inputs_embeds"]
    cached = kwargs.get(CACHE_ARG) is not None or bool(kwargs.get("use_cache"))
    if opts.packed_attention:
        config._attn_implementation = reference_attn if cached else attention.ATTN_IMPLEMENTATION
    if opts.packed_attention and not cached and "input_ids" in kwargs:
        kwargs = _drop_padding(module, kwargs)
        ids = kwargs["input_ids"]
    b, t = ids.shape[:2]
    if prefix_layout is not None:  # joined_prefix_hidden's one row: its segments and the keys each reads
        kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["key_index"] = prefix_layout
        for x in prefix_layout:
            torch._dynamo.maybe_mark_dynamic(x, 0)
    elif opts.packed_attention and not cached:
        cu = attention.packed_boundaries(kwargs.get("position_ids"), (b, t), kwargs.get("attention_mask"), ids.device,
                                         starts=module._lorakit_unpadded[2] if module._lorakit_unpadded else None)
        if cu.numel() > b + 1:  # some row holds several samples (or padding)
            torch._dynamo.maybe_mark_dynamic(cu, 0)  # the number of samples varies: one graph
            kwargs["cu_seq_lens_q"] = cu
        kwargs["attention_mask"] = None
    if opts.checkpointing == "auto" and module.training and ids.is_cuda and limit_gib is not None:
        full, ckpt = activation_bytes_per_token(config, peft_lora=not opts.fused_lora)
        budget = _memory_budget(limit_gib, ids.device, _reserve(layers, config))
        n = plan_checkpointing(len(layers), b * t, full, ckpt, budget)
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < n
    return args, kwargs


def _drop_padding(body, kwargs: dict) -> dict:
    """Padded rows [B, T] -> their real tokens as one packed row [1, N] (positions restarting per row), so the
    layers do no work on padding (a pair's shorter side, a short anchor row beside 1,024-token pairs); the
    forward hook `_restore_padding` puts the hidden states back in the rows. Unchanged without padding."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return kwargs
    keep = mask.reshape(-1).nonzero().squeeze(1)
    if keep.numel() == mask.numel():
        return kwargs
    positions = kwargs.get("position_ids")
    if positions is None:  # what the model would use: 0..T-1 in every row
        positions = torch.arange(mask.shape[1], device=mask.device)
    positions = positions.expand(mask.shape).reshape(-1)[keep]
    starts = torch.ones_like(keep, dtype=torch.bool)  # a row's first real token starts a segment
    starts[1:] = keep[1:] // mask.shape[1] != keep[:-1] // mask.shape[1]
    body._lorakit_unpadded = (keep, tuple(mask.shape), starts)
    return kwargs | {"input_ids": kwargs["input_ids"].reshape(-1)[keep][None], "position_ids": positions[None],
                     "attention_mask": None}


def _restore_padding(body, args, kwargs, output):
    """The forward hook after `_drop_padding`: hidden states back at their rows' places (0 on padding)."""
    unpadded, body._lorakit_unpadded = getattr(body, "_lorakit_unpadded", None), None
    if unpadded is None:
        return output
    keep, (b, t), _ = unpadded
    hidden = output.last_hidden_state
    full = hidden.new_zeros(b * t, hidden.shape[-1]).index_copy(0, keep, hidden[0])
    output.last_hidden_state = full.view(b, t, -1)
    return output


def joined_prefix_hidden(body, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, W, H] hidden states of a batch whose rows continue prefix_ids [1, P] (collate(shared_prefix=True)),
    the prefix run once, in ONE forward: [prefix, row 1, row 2, ...] as one packed row of real tokens (a
    continuing row's positions start at P), each row attending to the prefix's keys and its own (packed
    attention's key_index). batch["prefix_rows"] [B] bool, when present: False for rows that do not continue
    the prefix (replay anchor rows, positions from 0, their own keys only). The same numbers as
    lorakit.loss's KV-cache reference; 0 on padding."""
    prefix, ids = batch["prefix_ids"][0], batch["input_ids"]
    rows, width = ids.shape
    n = prefix.numel()
    mask = batch.get("attention_mask", torch.ones_like(ids))
    shares = batch.get("prefix_rows", torch.ones(rows, dtype=torch.bool, device=ids.device)).bool()
    keep = mask.reshape(-1).nonzero().squeeze(1)
    positions = torch.arange(width, device=ids.device) + n * shares[:, None].long()  # as the KV-cache reference
    stream = torch.cat([prefix, ids.reshape(-1)[keep]])
    lengths, continues = mask.sum(1).tolist(), shares.tolist()
    keys, q_bounds, k_bounds, start = [torch.arange(n, device=ids.device)], [0, n], [0, n], n
    for length, shared in zip(lengths, continues):
        if shared:
            keys.append(keys[0])
        keys.append(torch.arange(start, start + length, device=ids.device))
        start += length
        q_bounds.append(start)
        k_bounds.append(k_bounds[-1] + length + (n if shared else 0))
    as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=ids.device)
    body._lorakit_prefix_layout = (as_int32(q_bounds), as_int32(k_bounds), torch.cat(keys))
    out = body(input_ids=stream[None], position_ids=torch.cat([torch.arange(n, device=ids.device),
                                                               positions.reshape(-1)[keep]])[None], use_cache=False)
    hidden = out.last_hidden_state[0, n:]
    return hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, keep, hidden).view(rows, width, -1)


# one object for every layer and every call: compiled layers guard on its identity
_CHECKPOINT = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def set_checkpointing(layers, enabled: list[bool]) -> None:
    """Per-layer activation recompute through transformers' own layer switch (non-reentrant)."""
    for layer, on in zip(layers, enabled):
        layer._gradient_checkpointing_func = _CHECKPOINT
        layer.gradient_checkpointing = on


def prepare_for_training(model: torch.nn.Module, opts: FastOptions) -> torch.nn.Module:
    """Switch the fast paths in opts on, in place; returns the model (call after LoRA is attached).

    Calling it again with other options replaces the earlier choice (compiled layers stay compiled).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, layers = base.get_decoder(), decoder_layers(model)
    base.config.use_cache = False
    _remove_hook(body)
    reference_attn = getattr(base.config, "_lorakit_reference_attn", base.config._attn_implementation)
    base.config._lorakit_reference_attn = reference_attn
    if opts.packed_attention:
        base.set_attn_implementation(attention.register())
    if opts.fused_lora:
        # compiled: plain ops, so inductor fuses the adds (measured 2.8% faster on the H100);
        # eager: the autograd.Function with its GEMM-epilogue adds
        fuse_lora_layers(model, "ops" if opts.torch_compile else "function")
    else:
        unfuse_lora_layers(model)
    set_checkpointing(layers, [opts.checkpointing == "full"] * len(layers))
    # transformers 5.25 with the `kernels` package wraps each attention forward in a context-variable set and reset
    # (kernel routing); in a compiled layer that recomputes, dynamo refuses that side effect (a graph break per
    # layer) unless told the recompute need not replay it, which it need not: the value is restored on return
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    body._lorakit_joins_prefix = opts.packed_attention  # lorakit.loss.hidden_states: joined_prefix_hidden
    if opts.packed_attention or opts.checkpointing == "auto":
        limit = planned_limit_gib(opts, is_quantized(model))
        hook = functools.partial(_body_pre_hook, opts, layers, base.config, reference_attn, limit)
        body._lorakit_hook = (body.register_forward_pre_hook(hook, with_kwargs=True),
                              body.register_forward_hook(_restore_padding, with_kwargs=True))
    if opts.torch_compile:
        # all blocks share their graphs (the fused LoRA projections share one class, fast/lora.py): one per
        # shape kind and grad mode, not per block; the limit stays generous (a 4-bit base's packed weights may
        # still be guarded per layer: not measured)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(layers))
        for layer in layers:
            if layer._compiled_call_impl is None:
                layer.compile()
    return model


def describe_fast_paths(model: torch.nn.Module, opts: FastOptions | None, device: torch.device) -> str:
    """One line for the start of training: which fast paths are on, and why any is off."""
    loss = "chunked loss on" if opts is None or opts.fused_loss else "chunked loss off (--fused_loss false)"
    if torch.device(device).type != "cuda" or opts is None:
        return (f"fast paths: {loss}; fused LoRA, packed attention and torch.compile are GPU paths, off on "
                f"{torch.device(device).type} (this run computes the plain reference)")
    lora = [m for m in model.modules() if is_lora_linear(m)]
    if not opts.fused_lora:
        fused = "fused LoRA off (--fused_lora false)"
    elif lora:
        refused: dict[str, int] = {}
        for m in lora:
            if not can_fuse(m):
                why = fuse_refusal(m) or f"layer type {type(m).__name__}"
                refused[why] = refused.get(why, 0) + 1
        fused = f"fused LoRA on {len(lora) - sum(refused.values())}/{len(lora)} layers"
        if refused:
            fused += " (not fused: " + ", ".join(f"{n} with {why}" for why, n in refused.items()) + ")"
        dropout = any(isinstance(m.lora_dropout[n], torch.nn.Dropout) for m in lora for n in m.active_adapters
                      if n in m.lora_dropout)
        if dropout and opts.torch_compile and not lora_dropout.available():
            fused += " (LoRA dropout through torch ops, which store its mask: Triton is not installed)"
    else:
        fused = "fused LoRA: no LoRA layers (full fine-tuning)"
    attn = "packed attention on" if opts.packed_attention else "packed attention off (--packed_attention false)"
    comp = "torch.compile on" if opts.torch_compile else "torch.compile off (--torch_compile false)"
    return f"fast paths: {loss}, {fused}, {attn}, {comp}, {describe_recompute(opts, is_quantized(model))}"


def describe_recompute(opts: FastOptions, quantized: bool) -> str:
    """'recompute ...': the mode, and for 'auto' the peak it plans for and where that limit comes from."""
    if opts.checkpointing != "auto":
        flag = "--gradient_checkpointing " + ("true" if opts.checkpointing == "full" else "false")
        return f"recompute {'every layer' if opts.checkpointing == 'full' else 'off'} ({flag})"
    limit = planned_limit_gib(opts, quantized)
    if opts.gpu_memory_limit:
        return f"recompute auto, planned for a {limit:g} GiB peak (--gpu_memory_limit)"
    if quantized:
        return ("recompute auto, planned for the least memory: every layer (a quantized base; --gpu_memory_limit N "
                "keeps activations up to an N GiB peak, which is faster)")
    card = f"{limit:.1f} GiB, " if limit is not None else ""
    return f"recompute auto, planned for {card}92% of the card (--gpu_memory_limit N plans for N GiB)"


def _remove_hook(body: torch.nn.Module) -> None:
    for handle in getattr(body, "_lorakit_hook", None) or ():
        handle.remove()
    body._lorakit_hook = None
    body._lorakit_joins_prefix = False


def restore_reference(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Undo prepare_for_training: PEFT forward, eager layers, transformers attention, no recompute."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _remove_hook(base.get_decoder())
    base.set_attn_implementation(getattr(base.config, "_lorakit_reference_attn", attn_implementation))
    unfuse_lora_layers(model)
    layers = decoder_layers(model)
    set_checkpointing(layers, [False] * len(layers))
    for layer in layers:
        layer._compiled_call_impl = None
    return model
