"""Chunked linear + cross-entropy: the lm_head and the loss without full-vocabulary logits.

The reference (lorakit.loss.reference_linear_ce) builds [N, V] logits in bf16 and again in fp32:
6 bytes x 4096 x 152064 = 3.7 GB per 4096 tokens, plus the same again for their gradient.
Here rows go through in chunks; each chunk's gradient is computed during the forward pass (the
loss is a sum, so d loss / d logits = softmax - onehot does not depend on anything later), and
only d hidden (and d weight, if the head trains) are kept. backward() just scales them.
Peak extra memory: about 10 bytes x chunk_size x V (1.5 GB at 1024 x 152064).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def ce_chunk_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over rows, d sum / d logits in logits' dtype) for one chunk.

    logits: [n, V] (any float dtype, upcast to fp32 as the reference does); targets: [n],
    -100 rows contribute neither loss nor gradient.
    """
    x = logits.float()
    valid = targets != IGNORE_INDEX
    safe = targets.clamp_min(0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, safe).squeeze(1)) * valid).sum()
    grad = torch.exp(x - lse.unsqueeze(1))
    grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
    grad.mul_(valid.unsqueeze(1))
    return loss, grad.to(logits.dtype)


@functools.lru_cache(maxsize=None)
def chunk_fn_for(device: torch.device):
    """ce_chunk_grad, compiled on CUDA (one fused pass instead of six over the chunk's logits)."""
    if torch.device(device).type != "cuda":
        return ce_chunk_grad
    return torch.compile(ce_chunk_grad, dynamic=True)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, chunk_fn):
        n = hidden.shape[0]
        want_h, want_w = hidden.requires_grad, weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            loss_c, dlogits = chunk_fn(F.linear(h, weight, bias), targets[start : start + chunk_size])
            loss += loss_c
            if want_h:
                torch.matmul(dlogits, weight, out=grad_h[start : start + chunk_size])
            if want_w:
                grad_w.add_(dlogits.t() @ h)
            if want_b:
                grad_b.add_(dlogits.sum(0))
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_loss).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def chunked_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    chunk_fn=None,
) -> torch.Tensor:
    """Sum over rows of CE(hidden @ weight.T (+ bias), targets), never holding all logits.

    hidden: [N, H]; weight: [V, H]; targets: [N] (-100 ignored). Rows without a target are
    dropped before the matmul. chunk_fn defaults to ce_chunk_grad (lorakit.fast may pass a
    compiled copy). Returns an fp32 scalar with the same value and gradients as the reference.
    """
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if keep.numel() < targets.numel():
        hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float()
    return _ChunkedLinearCE.apply(hidden, weight, bias, targets, chunk_size, chunk_fn or ce_chunk_grad)
