"""Fused LoRA linear: y = x W^T + b + s (x A^T) B^T in bf16, with a hand-written backward.

PEFT's forward (the reference, kept: `peft.tuners.lora.Linear.forward`) casts the bf16 input to
the fp32 adapter dtype (a full fp32 copy of x per projection), runs A and B in fp32, then adds
and casts back; autograd then adds d x of the base and low-rank paths in a separate pass.
Here the adapter weights are cast to the input dtype instead (they are tiny), the low-rank
product is added in the base GEMM's epilogue (addmm_), and the backward computes
d x = dy W + (dy sB) A with the second GEMM accumulating into the first's output.
The fp32 adapter parameters stay the trained (master) copy; their gradients come back in fp32.

LoRA dropout (PEFT: `lora_B(lora_A(dropout(x)))`, the base path sees x undropped) is applied to the
low-rank branch's input only, by ATen's fused `native_dropout` (one kernel writes the dropped input and
the bool keep-mask; on the CPU its draw and output are F.dropout's, so a CPU test compares with PEFT mask
for mask). The mask is kept for the backward, which rebuilds the dropped input from x with
`native_dropout_backward` (one kernel) instead of storing a second copy. (Drawing the mask with
bernoulli_ and applying it in separate elementwise ops cost the 7B packed step about 8% on an H200.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lorakit.fast import lora_dropout
from lorakit.fast.qlora import _dropped, is_linear_4bit, packed_4bit, qlora_linear


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0):
        x2 = x.reshape(-1, x.shape[-1])
        a = lora_a.to(x.dtype)
        b = (lora_b * scale).to(x.dtype)
        dropped, keep = torch.native_dropout(x2, dropout_p, True) if dropout_p > 0 else (x2, None)
        xa = dropped @ a.t()
        del dropped
        y = F.linear(x2, weight, bias)
        y.addmm_(xa, b.t())
        ctx.save_for_backward(x2, xa, weight, a, b, keep)
        ctx.dropout_p = dropout_p
        ctx.scale = scale
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, a, b, keep = ctx.saved_tensors
        p = ctx.dropout_p
        dy2 = dy.reshape(-1, dy.shape[-1])
        dxa = dy2 @ b
        grad_b = (dy2.t() @ xa).to(ctx.param_dtypes[1]) * ctx.scale
        grad_a = (dxa.t() @ _dropped(x2, keep, p)).to(ctx.param_dtypes[0])
        if keep is None:
            dx = dxa @ a
            dx.addmm_(dy2, weight)
        else:  # the low-rank branch saw the dropped input: its gradient passes the same mask
            dx = torch.addmm(_dropped(dxa @ a, keep, p), dy2, weight)
        return dx.view(ctx.x_shape), None, None, grad_a, grad_b, None, None


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """x [..., in]; weight [out, in] (frozen); bias [out] or None (frozen); lora_a [r, in]; lora_b [out, r];
    dropout_p: LoRA dropout on the low-rank branch's input (0 when not training)."""
    return _LoRALinearFn.apply(x, weight, bias, lora_a, lora_b, scale, dropout_p)


def lora_linear_ops(x, weight, bias, lora_a, lora_b, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """lora_linear as plain ops: under torch.compile the partitioner then sees the whole layer and
    may recompute cheap tensors (norm outputs, SwiGLU product) instead of keeping them. With dropout on a
    GPU, the A product makes its mask in the kernel (fast/lora_dropout.py) instead of storing it."""
    if dropout_p > 0 and x.is_cuda and lora_dropout.fits(x):
        low_a = lora_dropout.lora_a_through_dropout(x, lora_a, dropout_p)
    else:
        low_in = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
        low_a = F.linear(low_in, lora_a.to(x.dtype))
    return F.linear(x, weight, bias) + F.linear(low_a, (lora_b * scale).to(x.dtype))


LORA_IMPLS = {"function": lora_linear, "ops": lora_linear_ops}


def fuse_refusal(module) -> str | None:
    """Why `module` cannot take the fused path (None: it can). Only PEFT LoRA Linear layers are asked."""
    if len(module.active_adapters) != 1:
        return "several active adapters"
    name = module.active_adapters[0]
    base = module.base_layer
    if name not in module.lora_A:
        return "no LoRA weights for the active adapter"
    if module.lora_variant.get(name):
        return f"LoRA variant {type(module.lora_variant[name]).__name__} (DoRA, ...)"
    if not isinstance(module.lora_dropout[name], (torch.nn.Identity, torch.nn.Dropout)):
        return f"dropout of type {type(module.lora_dropout[name]).__name__}"
    if module.lora_A[name].bias is not None or module.lora_B[name].bias is not None:
        return "LoRA bias"
    if type(base) is not torch.nn.Linear and not is_linear_4bit(base):
        return f"base layer {type(base).__name__}"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "trainable base weights"
    return None


def is_lora_linear(module) -> bool:
    """A PEFT LoRA layer of any kind (plain, quantized base, ...)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "active_adapters")


def can_fuse(module) -> bool:
    """True for a PEFT LoRA Linear (plain, or over a bitsandbytes 4-bit base): one adapter (dropout or not),
    no DoRA/variant, frozen base."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover
        return False
    kind = peft_class(module)
    return (kind is LoraLinear or kind.__module__ == "peft.tuners.lora.bnb"
            and kind.__name__ == "Linear4bit") and fuse_refusal(module) is None


def peft_class(module) -> type:
    """The module's PEFT class (the one fuse_lora_layers' fused class stands in for)."""
    return getattr(type(module), "_lorakit_peft_class", type(module))


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.disable_adapters or self.merged or args or kwargs:
        return self._lorakit_peft_class.forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    dropout = self.lora_dropout[name]
    p = dropout.p if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    if self._lorakit_packed is not None:  # a 4-bit base: de-quantized inside the fused function, forward and backward
        return qlora_linear(x, self._lorakit_packed, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                            self.scaling[name], p)
    return self._lorakit_lora_impl(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                   self.scaling[name], p)


@functools.lru_cache(maxsize=None)
def _fused_class(peft: type) -> type:
    """PEFT's class with the fused forward, one per PEFT class: every layer's projections share the same code and
    attributes, so a compiled decoder layer's graph serves all the layers (a forward bound per module made dynamo
    guard on each one's identity: one cache entry and one trace per layer)."""
    return type(f"Fused{peft.__name__}", (peft,), {"forward": _fused_forward, "_lorakit_peft_class": peft})


def fuse_lora_layers(model: torch.nn.Module, impl: str = "function") -> int:
    """Route every fusable PEFT LoRA Linear through LORA_IMPLS[impl]; returns how many were fused.

    Only the module's class changes (to a subclass of PEFT's with the fused forward): parameters, names and saved
    adapters stay PEFT's.
    """
    count = 0
    for module in model.modules():
        if can_fuse(module):
            module._lorakit_lora_impl = LORA_IMPLS[impl]
            if type(module) is peft_class(module):
                module._lorakit_packed = packed_4bit(module.base_layer) if is_linear_4bit(module.base_layer) else None
                module.__class__ = _fused_class(type(module))
            count += 1
    return count


def unfuse_lora_layers(model: torch.nn.Module) -> None:
    """Undo fuse_lora_layers (back to PEFT's own forward)."""
    for module in model.modules():
        if type(module) is not peft_class(module):
            module.__class__ = peft_class(module)
            del module._lorakit_lora_impl, module._lorakit_packed
