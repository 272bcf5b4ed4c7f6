"""Fused LoRA over a bitsandbytes 4-bit base weight: y = x deq(W)^T + b + s (x A^T) B^T.

The reference (kept: PEFT's `peft.tuners.lora.bnb.Linear4bit.forward`) runs bitsandbytes'
`matmul_4bit` (de-quantize W, GEMM, and in the backward de-quantize W again for d x), clones the
result, casts x to the fp32 adapter dtype for the low-rank branch, and adds. Here W is de-quantized
by bitsandbytes' own kernel (`torch.ops.bitsandbytes.dequantize_4bit`, a custom op torch.compile
keeps whole) to the input dtype, the low-rank product is added in the base GEMM's epilogue, and the
backward de-quantizes W once more (never stored: memory holds the 4-bit weight only) and computes
d x = dy W + (dy sB) A with the second GEMM accumulating into the first's output, as
`lorakit.fast.lora` does for plain weights. A CPU test compares forward and gradients with PEFT's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



def _dropped(x2: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """x2 with dropout's mask applied (as lorakit.fast.lora does; kept here so lora.py can import this file)."""
    return x2 if keep is None else x2 * keep / (1.0 - p)


def packed_4bit(base) -> tuple[tuple[torch.Tensor, ...], tuple]:
    """(tensors, meta) of a bitsandbytes Linear4bit's weight, as plain tensors and constants.

    tensors: packed codes, block scales (uint8 when double-quantized), and for double quantization the
    scales' own code table, scales and offset. meta: (blocksize, quant_type, shape, dtype, nested, blocksize2).
    Plain tensors (not the Params4bit subclass or its QuantState object) keep torch.compile's graph whole.
    """
    weight = base.weight
    state = weight.quant_state
    if state.nested:
        tensors = (weight.data, state.absmax, state.state2.absmax, state.state2.code, state.offset.reshape(1))
        blocksize2 = state.state2.blocksize
    else:
        tensors = (weight.data, state.absmax)
        blocksize2 = 0
    meta = (state.blocksize, state.quant_type, tuple(state.shape), state.dtype, state.nested, blocksize2)
    return tensors, meta


def dequantize(tensors: tuple[torch.Tensor, ...], meta: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight as a dense [out, in] tensor of `dtype` (bitsandbytes' kernels, as its dequantize_4bit)."""
    blocksize, quant_type, shape, saved_dtype, nested, blocksize2 = meta
    packed, absmax = tensors[0], tensors[1]
    if nested:
        absmax2, code2, offset = tensors[2], tensors[3], tensors[4]
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, absmax2, code2, blocksize2, torch.float32)
        absmax = absmax + offset
    weight = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type, list(shape),
                                                            saved_dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


class _QLoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, scale, dropout_p, meta, *tensors):
        x2 = x.reshape(-1, x.shape[-1])
        a = lora_a.to(x.dtype)
        b = (lora_b * scale).to(x.dtype)
        keep = torch.empty_like(x2).bernoulli_(1.0 - dropout_p).bool() if dropout_p > 0 else None
        xa = _dropped(x2, keep, dropout_p) @ a.t()
        y = F.linear(x2, dequantize(tensors, meta, x.dtype), None if bias is None else bias.to(x.dtype))
        y.addmm_(xa, b.t())
        ctx.save_for_backward(x2, xa, a, b, keep, *tensors)
        ctx.meta, ctx.dropout_p, ctx.scale = meta, dropout_p, scale
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, a, b, keep, *tensors = ctx.saved_tensors
        p = ctx.dropout_p
        dy2 = dy.reshape(-1, dy.shape[-1])
        dxa = dy2 @ b
        grad_b = (dy2.t() @ xa).to(ctx.param_dtypes[1]) * ctx.scale
        grad_a = (dxa.t() @ _dropped(x2, keep, p)).to(ctx.param_dtypes[0])
        low = dxa @ a
        dx = torch.addmm(_dropped(low, keep, p) if keep is not None else low, dy2, dequantize(tensors, ctx.meta, dy.dtype))
        n_tensors = len(tensors)
        return (dx.view(ctx.x_shape), None, grad_a, grad_b, None, None, None) + (None,) * n_tensors


def qlora_linear(x, packed: tuple[tuple[torch.Tensor, ...], tuple], bias, lora_a, lora_b, scale: float,
                 dropout_p: float = 0.0) -> torch.Tensor:
    """x [..., in]; packed: `packed_4bit(base)`; bias [out] or None (frozen); lora_a [r, in]; lora_b [out, r]."""
    tensors, meta = packed
    return _QLoRALinearFn.apply(x, bias, lora_a, lora_b, scale, dropout_p, meta, *tensors)


def is_linear_4bit(layer) -> bool:
    """A bitsandbytes Linear4bit holding a quantized weight (what qlora_linear computes over)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is optional
        return False
    return isinstance(layer, bnb.nn.Linear4bit) and getattr(layer.weight, "quant_state", None) is not None
