"""Per-token log-probabilities of the labelled tokens, without the full-vocabulary logits.

Preference losses need log p(y_t | y_<t) of each response token, summed per sequence. The
reference path builds [N, V] fp32 logits and takes a log-softmax; the chunked path runs the
lm_head over chunks of the labelled rows only (a response is usually a fraction of the row) and
recomputes each chunk in backward, so at most chunk_size x V logits exist at a time. The hidden
states come from `lorakit.loss.hidden_states`, so every sft fast path (shared prefix on the CPU;
fused LoRA, packed attention and compiled layers on the GPU) applies unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorakit.loss import IGNORE_INDEX, _causal_lm_parts, hidden_states, shift_targets


@dataclass
class TokenLogps:
    """log p of each labelled token, laid out like the batch's rows (0 where there is no label)."""

    logps: torch.Tensor  # [R, T] fp32, differentiable
    mask: torch.Tensor   # [R, T] bool: the token at t + 1 is labelled

    def sum(self) -> torch.Tensor:
        """[R] summed log-prob of each row's labelled tokens."""
        return self.logps.sum(-1)

    def count(self) -> torch.Tensor:
        """[R] labelled tokens per row."""
        return self.mask.sum(-1)

    def mean(self) -> torch.Tensor:
        """[R] mean log-prob per labelled token."""
        return self.sum() / self.count().clamp(min=1)


def reference_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """[N] fp32 log-softmax(hidden @ weight.T + bias)[target] with full fp32 logits (targets all valid)."""
    logits = F.linear(hidden, weight, bias).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def logp_chunk(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[n] fp32 log-prob of each target under one chunk of logits [n, V]."""
    x = logits.float()
    return x.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(x, dim=-1)


def logp_chunk_backward(logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d (sum_i grad_i logp_i) / d logits = grad_i (onehot_i - softmax_i), in logits' dtype."""
    d = torch.softmax(logits.float(), dim=-1).mul_(-grad.unsqueeze(1))
    d.scatter_add_(1, targets.unsqueeze(1), grad.unsqueeze(1).to(d.dtype))
    return d.to(logits.dtype)


@functools.lru_cache(maxsize=None)
def _chunk_fns(device_type: str):
    if device_type != "cuda":
        return logp_chunk, logp_chunk_backward
    return torch.compile(logp_chunk, dynamic=True), torch.compile(logp_chunk_backward, dynamic=True)


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        fwd, _ = _chunk_fns(hidden.device.type)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            out[start:end] = fwd(F.linear(hidden[start:end], weight, bias), targets[start:end])
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        _, bwd = _chunk_fns(hidden.device.type)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):  # recompute each chunk's logits
            end = start + ctx.chunk_size
            h = hidden[start:end]
            dlogits = bwd(F.linear(h, weight, bias), targets[start:end], grad_out[start:end].float())
            if want_h:
                torch.matmul(dlogits, weight, out=grad_h[start:end])
            if want_w:
                grad_w.add_(dlogits.t().float() @ h.float())
            if want_b:
                grad_b.add_(dlogits.float().sum(0))
        return (grad_h, grad_w.to(weight.dtype) if want_w else None, grad_b.to(bias.dtype) if want_b else None,
                None, None)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None = None, *, chunk_size: int = 1024) -> torch.Tensor:
    """reference_token_logps, chunked: [N] fp32 with the same value and gradients, chunk_size x V logits at most."""
    if hidden.shape[0] == 0:
        return (hidden.sum(-1) * 0.0).float()
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk_size)


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = True,
                chunk_size: int = 1024) -> TokenLogps:
    """Log-probs of every labelled token of `batch` (collate's layout: input_ids, labels, attention_mask or
    position_ids, optional prefix_ids) under `model`, through the decoder body and a chunked lm_head."""
    hidden = hidden_states(model, batch)
    _, head = _causal_lm_parts(model)
    targets = shift_targets(batch["labels"], batch.get("position_ids"))
    mask = targets != IGNORE_INDEX
    keep = mask.reshape(-1).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    t = targets.reshape(-1).index_select(0, keep)
    fn = chunked_token_logps if fused else reference_token_logps
    picked = fn(h, head.weight, t, head.bias, chunk_size=chunk_size) if fused else fn(h, head.weight, t, head.bias)
    logps = torch.zeros(mask.numel(), dtype=torch.float32, device=hidden.device).index_put((keep,), picked)
    return TokenLogps(logps=logps.view(mask.shape), mask=mask)
