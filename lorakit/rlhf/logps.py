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

    logps: torch.Tensor  # [R, T] fp32 (fp64 for a fp64 model), differentiable
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


def _at_least_fp32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def reference_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """[N] log-softmax(hidden @ weight.T + bias) / temperature)[target] with full logits (fp32, or fp64 inputs' fp64)."""
    logits = F.linear(hidden, weight, bias).to(_at_least_fp32(hidden)) / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def logp_chunk(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[n] log-prob of each target under one chunk of logits [n, V] divided by the sampling temperature."""
    x = logits.to(_at_least_fp32(logits)) / temperature
    return x.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(x, dim=-1)


def logp_chunk_backward(logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """d (sum_i grad_i logp_i) / d logits = grad_i (onehot_i - softmax_i) / temperature, in logits' dtype."""
    d = torch.softmax(logits.to(_at_least_fp32(logits)) / temperature, dim=-1).mul_(-grad.unsqueeze(1))
    d.scatter_add_(1, targets.unsqueeze(1), grad.unsqueeze(1).to(d.dtype))
    return (d / temperature).to(logits.dtype)


@functools.lru_cache(maxsize=None)
def _chunk_fns(device_type: str):
    if device_type != "cuda":
        return logp_chunk, logp_chunk_backward
    return torch.compile(logp_chunk, dynamic=True), torch.compile(logp_chunk_backward, dynamic=True)


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size):
        fwd, _ = _chunk_fns(hidden.device.type)
        out = torch.empty(hidden.shape[0], dtype=_at_least_fp32(hidden), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            out[start:end] = fwd(F.linear(hidden[start:end], weight, bias), targets[start:end], temperature)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        _, bwd = _chunk_fns(hidden.device.type)
        acc = _at_least_fp32(hidden)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):  # recompute each chunk's logits
            end = start + ctx.chunk_size
            h = hidden[start:end]
            dlogits = bwd(F.linear(h, weight, bias), targets[start:end], grad_out[start:end].to(acc), ctx.temperature)
            if want_h:
                torch.matmul(dlogits, weight, out=grad_h[start:end])
            if want_w:
                grad_w.add_(dlogits.t().to(acc) @ h.to(acc))
            if want_b:
                grad_b.add_(dlogits.to(acc).sum(0))
        return (grad_h, grad_w.to(weight.dtype) if want_w else None, grad_b.to(bias.dtype) if want_b else None,
                None, None, None)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None = None, temperature: float = 1.0, *,
                        chunk_size: int = 1024) -> torch.Tensor:
    """reference_token_logps, chunked: [N] with the same value and gradients, chunk_size x V logits at most."""
    if hidden.shape[0] == 0:
        return (hidden.sum(-1) * 0.0).to(_at_least_fp32(hidden))
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, float(temperature), chunk_size)


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = True,
                chunk_size: int = 1024, hidden: torch.Tensor | None = None) -> TokenLogps:
    """Log-probs of every labelled token of `batch` (collate's layout: input_ids, labels, attention_mask or
    position_ids, optional prefix_ids) under `model`, through the decoder body and a chunked lm_head.
    hidden: the rows' final hidden states when a forward shared with other rows already made them."""
    if hidden is None:
        hidden = hidden_states(model, batch)
    _, head = _causal_lm_parts(model)
    targets = shift_targets(batch["labels"], batch.get("position_ids"))
    mask = targets != IGNORE_INDEX
    keep = mask.reshape(-1).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    t = targets.reshape(-1).index_select(0, keep)
    fn = chunked_token_logps if fused else reference_token_logps
    picked = fn(h, head.weight, t, head.bias, chunk_size=chunk_size) if fused else fn(h, head.weight, t, head.bias)
    logps = torch.zeros(mask.numel(), dtype=picked.dtype, device=hidden.device).index_put((keep,), picked)
    return TokenLogps(logps=logps.view(mask.shape), mask=mask)
