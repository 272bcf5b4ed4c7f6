"""Fused LoRA linear: y = x W^T + b + s (x A^T) B^T in bf16, with a hand-written backward.

PEFT's forward (the reference, kept: `peft.tuners.lora.Linear.forward`) casts the bf16 input to
the fp32 adapter dtype (a full fp32 copy of x per projection), runs A and B in fp32, then adds
and casts back; autograd then adds d x of the base and low-rank paths in a separate pass.
Here the adapter weights are cast to the input dtype instead (they are tiny), the low-rank
product is added in the base GEMM's epilogue (addmm_), and the backward computes
d x = dy W + (dy sB) A with the second GEMM accumulating into the first's output.
The fp32 adapter parameters stay the trained (master) copy; their gradients come back in fp32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        a = lora_a.to(x.dtype)
        b = (lora_b * scale).to(x.dtype)
        xa = x2 @ a.t()
        y = F.linear(x2, weight, bias)
        y.addmm_(xa, b.t())
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scale = scale
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, a, b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dxa = dy2 @ b
        grad_b = (dy2.t() @ xa).to(ctx.param_dtypes[1]) * ctx.scale
        grad_a = (dxa.t() @ x2).to(ctx.param_dtypes[0])
        dx = dxa @ a
        dx.addmm_(dy2, weight)
        return dx.view(ctx.x_shape), None, None, grad_a, grad_b, None


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
    """x [..., in]; weight [out, in] (frozen); bias [out] or None (frozen); lora_a [r, in]; lora_b [out, r]."""
    return _LoRALinearFn.apply(x, weight, bias, lora_a, lora_b, scale)


def lora_linear_ops(x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
    """lora_linear as plain ops: under torch.compile the partitioner then sees the whole layer and
    may recompute cheap tensors (norm outputs, SwiGLU product) instead of keeping them."""
    low = F.linear(F.linear(x, lora_a.to(x.dtype)), (lora_b * scale).to(x.dtype))
    return F.linear(x, weight, bias) + low


LORA_IMPLS = {"function": lora_linear, "ops": lora_linear_ops}


def can_fuse(module) -> bool:
    """True for a plain PEFT LoRA Linear: one adapter, no dropout, no DoRA/variant, frozen base."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover
        return False
    if type(module) is not LoraLinear or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    base = module.base_layer
    return (
        name in module.lora_A
        and not module.lora_variant.get(name)
        and isinstance(module.lora_dropout[name], torch.nn.Identity)
        and module.lora_A[name].bias is None
        and module.lora_B[name].bias is None
        and type(base) is torch.nn.Linear
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
    )


def _fused_forward(self, x: torch.Tensor, *args, lora_impl=lora_linear, **kwargs) -> torch.Tensor:
    if self.disable_adapters or self.merged or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    return lora_impl(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])


def fuse_lora_layers(model: torch.nn.Module, impl: str = "function") -> int:
    """Route every fusable PEFT LoRA Linear through LORA_IMPLS[impl]; returns how many were fused.

    Only the instance's forward changes: parameters, names and saved adapters stay PEFT's.
    """
    count = 0
    for module in model.modules():
        if can_fuse(module):
            current = vars(module).get("forward")
            # keep an identical forward object: compiled layers guard on it and would recompile
            if not (isinstance(current, functools.partial) and current.keywords.get("lora_impl") is LORA_IMPLS[impl]):
                module.forward = functools.partial(_fused_forward, module, lora_impl=LORA_IMPLS[impl])
            count += 1
    return count


def unfuse_lora_layers(model: torch.nn.Module) -> None:
    """Undo fuse_lora_layers (back to PEFT's own forward)."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "func", None) is _fused_forward:
            del module.forward
