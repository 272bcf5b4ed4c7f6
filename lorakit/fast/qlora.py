"""Fused LoRA over a bitsandbytes 4-bit base weight: y = x deq(W)^T + b + s (x A^T) B^T.

The reference (kept: PEFT's `peft.tuners.lora.bnb.Linear4bit.forward`) runs bitsandbytes'
`matmul_4bit` (de-quantize W, GEMM, and in the backward de-quantize W again for d x), clones the
result, casts x to the fp32 adapter dtype for the low-rank branch, and adds. Here W is de-quantized
by bitsandbytes' own kernels (`torch.ops.bitsandbytes.dequantize_4bit`) to the input dtype, the
low-rank product is added in the base GEMM's epilogue, and the backward de-quantizes W once more
(never stored: memory holds the 4-bit weight only, and one de-quantized weight at a time) and
computes d x = dy W + (dy sB) A with the second GEMM accumulating into the first's output, as
`lorakit.fast.lora` does for plain weights. Forward and backward are custom ops, opaque to
torch.compile (see below). CPU tests compare forward and gradients with PEFT's, and check what the
layer saves for its backward, eager and compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _dropped(x2: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """x2 with dropout's bool keep-mask applied and the kept values scaled by 1/(1-p), in one kernel (x2 itself
    when no mask). lorakit.fast.lora uses it too (it lives here because lora.py imports this file)."""
    return x2 if keep is None else torch.ops.aten.native_dropout_backward(x2, keep, 1.0 / (1.0 - p))


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


# The layer is two custom ops (forward, backward) rather than an autograd.Function: torch.compile traces an
# autograd.Function's forward and backward into one joint graph, merges the backward's de-quantization with
# the forward's (common-subexpression elimination) and then keeps the de-quantized weight for the backward:
# 12 GiB more on a 7B (every linear weight in bf16; the H200 run of 2026-12-03). An opaque op keeps exactly
# what setup_context saves (the 4-bit tensors), compiled or not. The 4-bit tensors travel as five optional
# tensors (absmax2, code2, offset: None without double quantization), not a list: a custom op's autograd
# over a tensor list differs between torch releases.
Tensor = torch.Tensor


@torch.library.custom_op("lorakit::qlora_forward", mutates_args=())
def _forward_op(x2: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, keep: Tensor | None, dropout_p: float,
                packed: Tensor, absmax: Tensor, absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None,
                blocksize: int, quant_type: str, shape: list[int], dtype: torch.dtype,
                blocksize2: int) -> tuple[Tensor, Tensor]:
    """(y, xa): y = x2 deq(W)^T + bias + xa b^T with xa = dropped(x2) a^T (a, b in x2's dtype, b scaled)."""
    weight = dequantize(_tensors(packed, absmax, absmax2, code2, offset),
                        _meta(blocksize, quant_type, shape, dtype, absmax2, blocksize2), x2.dtype)
    xa = _dropped(x2, keep, dropout_p) @ a.t()
    y = F.linear(x2, weight, bias)
    y.addmm_(xa, b.t())
    return y, xa


@_forward_op.register_fake
def _(x2, bias, a, b, keep, dropout_p, packed, absmax, absmax2, code2, offset, blocksize, quant_type, shape, dtype,
      blocksize2):
    return x2.new_empty((x2.shape[0], shape[0])), x2.new_empty((x2.shape[0], a.shape[0]))


@torch.library.custom_op("lorakit::qlora_backward", mutates_args=())
def _backward_op(dy2: Tensor, x2: Tensor, xa: Tensor, a: Tensor, b: Tensor, keep: Tensor | None, dropout_p: float,
                 packed: Tensor, absmax: Tensor, absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None,
                 blocksize: int, quant_type: str, shape: list[int], dtype: torch.dtype,
                 blocksize2: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, da, db): W de-quantized once more (never stored); dx = dy W + (dy b) a through the dropout mask."""
    weight = dequantize(_tensors(packed, absmax, absmax2, code2, offset),
                        _meta(blocksize, quant_type, shape, dtype, absmax2, blocksize2), dy2.dtype)
    dxa = dy2 @ b
    grad_b = dy2.t() @ xa
    grad_a = dxa.t() @ _dropped(x2, keep, dropout_p)
    return torch.addmm(_dropped(dxa @ a, keep, dropout_p), dy2, weight), grad_a, grad_b


@_backward_op.register_fake
def _(dy2, x2, xa, a, b, keep, dropout_p, packed, absmax, absmax2, code2, offset, blocksize, quant_type, shape, dtype,
      blocksize2):
    return torch.empty_like(x2), torch.empty_like(a), torch.empty_like(b)


def _tensors(packed, absmax, absmax2, code2, offset) -> tuple[Tensor, ...]:
    return (packed, absmax) if absmax2 is None else (packed, absmax, absmax2, code2, offset)


def _meta(blocksize, quant_type, shape, dtype, absmax2, blocksize2) -> tuple:
    return blocksize, quant_type, tuple(shape), dtype, absmax2 is not None, blocksize2


def _setup_context(ctx, inputs, output):
    x2, _bias, a, b, keep, dropout_p, *rest = inputs
    ctx.save_for_backward(x2, output[1], a, b, keep, *rest[:5])
    ctx.dropout_p, ctx.meta = dropout_p, tuple(rest[5:])


def _backward(ctx, dy2, _dxa):
    x2, xa, a, b, keep, *tensors = ctx.saved_tensors
    dx, grad_a, grad_b = _backward_op(dy2, x2, xa, a, b, keep, ctx.dropout_p, *tensors, *ctx.meta)
    return (dx, None, grad_a, grad_b) + (None,) * (2 + len(tensors) + len(ctx.meta))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def qlora_linear(x, packed: tuple[tuple[Tensor, ...], tuple], bias, lora_a, lora_b, scale: float,
                 dropout_p: float = 0.0) -> Tensor:
    """x [..., in]; packed: `packed_4bit(base)`; bias [out] or None (frozen); lora_a [r, in]; lora_b [out, r].

    The adapter weights are cast to x's dtype (and B scaled) outside the op, so autograd returns their
    gradients in their own (fp32) dtype: d lora_b = s (dy^T xa), as PEFT computes it.
    """
    tensors, (blocksize, quant_type, shape, dtype, nested, blocksize2) = packed
    four_bit = tuple(tensors) + (None,) * (5 - len(tensors))
    x2 = x.reshape(-1, x.shape[-1])
    keep = torch.empty_like(x2).bernoulli_(1.0 - dropout_p).bool() if dropout_p > 0 else None
    y, _ = _forward_op(x2, None if bias is None else bias.to(x.dtype), lora_a.to(x.dtype),
                       (lora_b * scale).to(x.dtype), keep, float(dropout_p), *four_bit, blocksize, quant_type,
                       list(shape), dtype, blocksize2)
    return y.view(*x.shape[:-1], y.shape[-1])


def is_linear_4bit(layer) -> bool:
    """A bitsandbytes Linear4bit holding a quantized weight (what qlora_linear computes over)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is optional
        return False
    return isinstance(layer, bnb.nn.Linear4bit) and getattr(layer.weight, "quant_state", None) is not None
