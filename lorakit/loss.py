"""Causal language-model loss as a pure function of (model, batch).

Two paths compute the same number:
- reference: body -> hidden states -> lm_head -> full fp32 logits -> cross-entropy (sum);
- fused (chunked): the lm_head matmul and the cross-entropy run over chunks of rows, so the
  [tokens, vocab] fp32 logits (2.5 GB per 4096 tokens on a 152k vocabulary) never exist at once,
  and rows without a target are skipped before the head runs.

The reference builds [N, V] logits in bf16 and again in fp32 (6 bytes x 4096 x 152064 = 3.7 GB
per 4096 tokens), plus the same again for their gradient. The chunked path computes each
chunk's gradient during the forward pass (the loss is a sum, so d loss / d logits =
softmax - onehot needs nothing from later), keeps only d hidden (and d weight, if the head
trains), and backward() just scales them. Extra memory: about 10 bytes x chunk_size x V
(1.5 GB at 1024 x 152064).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.kv_cache import cache_of, with_cache

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """Summed token loss and the number of tokens it sums over (the loop divides)."""

    loss_sum: torch.Tensor  # fp32 scalar, differentiable
    n_tokens: torch.Tensor  # int64 scalar (the normalising unit: tokens for sft, pairs for preference losses)
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # name -> (detached sum, count), logged as means


class MetricSums:
    """Running (sum, count) of the values losses report in LossOutput.metrics; means when logged.

    Sums stay tensors (on the GPU no sync per micro-batch); `means` reads them once. When both
    rewards/chosen and rewards/rejected are present, rewards/margins is their difference (TRL's value).
    """

    def __init__(self):
        self.sums: dict[str, tuple[Any, Any]] = {}

    def add(self, metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        for key, (total, count) in (metrics or {}).items():
            old_total, old_count = self.sums.get(key, (0.0, 0))
            self.sums[key] = (old_total + total, old_count + count)

    def means(self, prefix: str = "") -> dict[str, float]:
        out = {key: float(total) / max(int(count), 1) for key, (total, count) in self.sums.items() if int(count) > 0}
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return {prefix + key: round(value, 6) for key, value in out.items()}


def shift_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets aligned with each position: target[t] = labels[t + 1], -100 at the end.

    labels: [B, T] int64 (-100 = no loss), NOT shifted. position_ids: [B, T], restarting at 0 at
    each packed sample; a token whose position is 0 starts a sample, so the previous sample's last
    position must not predict it. Returns [B, T] int64.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if position_ids is not None:
        starts = F.pad(position_ids[:, 1:] == 0, (0, 1), value=False)
        targets = targets.masked_fill(starts, IGNORE_INDEX)
    return targets


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of `batch` that carry loss once labels are shifted (what causal_lm_loss sums over)."""
    return int((shift_targets(batch["labels"], batch.get("position_ids")) != IGNORE_INDEX).sum())


def _causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning hidden states, lm_head) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the decoder body (no lm_head): [B, T] ids -> [B, T, H] final-norm hidden states.

    With prefix_ids [1, P] (collate(shared_prefix=True)): the prefix runs once, its keys and values
    (gradients included) are shared by every row, and the rows continue from position P (rows marked False
    in prefix_rows [B], when given, do not: they start at 0 and see only themselves). Under the GPU's packed
    attention (lorakit.fast) prefix and rows run as one packed row; elsewhere through a KV cache.
    """
    body, _ = _causal_lm_parts(model)
    if "prefix_ids" in batch and getattr(body, "_lorakit_joins_prefix", False):
        from lorakit.fast import joined_prefix_hidden

        return joined_prefix_hidden(body, batch)
    if "prefix_ids" in batch:
        return _hidden_after_prefix(body, batch)
    out = body(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def shift_teacher(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The teacher's top-k (ids, probs) aligned like `shift_targets`, or None when the batch has none.

    batch["teacher_ids"] / ["teacher_probs"]: [B, T, K], unshifted like labels (entry t is the teacher's
    distribution over token t); probs are 0 where a position has no teacher (it then uses its label).
    """
    if "teacher_ids" not in batch:
        return None
    ids = F.pad(batch["teacher_ids"][:, 1:], (0, 0, 0, 1))
    probs = F.pad(batch["teacher_probs"][:, 1:], (0, 0, 0, 1))
    position_ids = batch.get("position_ids")
    if position_ids is not None:
        starts = F.pad(position_ids[:, 1:] == 0, (0, 1), value=False)
        probs = probs.masked_fill(starts.unsqueeze(-1), 0.0)
    return ids, probs


def shift_loss_scale(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Each target's loss weight, aligned like `shift_targets` ([B, T] fp32), or None when the batch has none.

    batch["loss_scale"]: [B, T], unshifted like labels (entry t: the loss_scale of token t's sample).
    """
    if "loss_scale" not in batch:
        return None
    return F.pad(batch["loss_scale"][:, 1:].float(), (0, 1), value=1.0)


def soft_targets(targets: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
                 scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, K], weights [N, K]): the teacher's distribution where it has one, else the one-hot label;
    each row's weights times its loss `scale`.

    targets: [N] (-100 ignored); teacher: ([N, K] ids, [N, K] probs, 0 on padding entries), or None (K = 1:
    the labels); scale: [N] per-target loss weights (`shift_loss_scale`), or None (1). A row with a label and
    a teacher learns the teacher's probabilities (soft-label cross-entropy), a row with only a label plain
    cross-entropy; either times its scale (a label at scale s is the one-hot target with weight s).
    """
    valid = targets != IGNORE_INDEX
    hard_ids, hard_w = targets.clamp_min(0).unsqueeze(1), valid.float().unsqueeze(1)
    if teacher is None:
        ids, weights = hard_ids, hard_w
    else:
        ids, probs = teacher
        probs = probs.float()
        has_teacher = ((probs.sum(-1) > 0) & valid).unsqueeze(1)
        k = ids.shape[1]
        ids = torch.where(has_teacher, ids, F.pad(hard_ids, (0, k - 1)))
        weights = torch.where(has_teacher, probs, F.pad(hard_w, (0, k - 1)))
    if scale is not None:
        weights = weights * scale.float().unsqueeze(1)
    return ids, weights


def _hidden_after_prefix(body: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    prefix = body(input_ids=batch["prefix_ids"], use_cache=True)
    cache = cache_of(prefix)
    rows, width = batch["input_ids"].shape
    for layer in cache.layers:  # one copy of the prefix, broadcast to every row
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    n = batch["prefix_ids"].shape[1]
    ids = batch["input_ids"]
    shares = batch.get("prefix_rows", torch.ones(rows, dtype=torch.bool, device=ids.device)).bool()[:, None]
    mask = torch.cat([shares.expand(rows, n), batch.get("attention_mask", torch.ones_like(ids)).bool()], dim=1).long()
    positions = torch.arange(width, device=ids.device) + n * shares.long()  # rows not continuing the prefix: from 0
    out = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
               **with_cache(cache))
    return out.last_hidden_state


def reference_linear_ce(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
    soft: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum over rows of CE(hidden @ weight.T (+ bias), target) with full fp32 logits.

    hidden: [N, H]; weight: [V, H]; targets: [N] (-100 ignored); soft: optional targets from
    `soft_targets`, which then replace the labels. Returns fp32 scalar.
    """
    logits = F.linear(hidden, weight, bias).float()
    if soft is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    ids, weights = soft
    return -(torch.log_softmax(logits, dim=-1).gather(1, ids) * weights).sum()


def _softmax_and_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax of each row, its log-sum-exp) of fp32 logits [n, V], with one [n, V] buffer: on a CPU each
    extra buffer of a 49k-152k vocabulary is a fresh allocation and a pass over memory."""
    top = x.amax(1, keepdim=True)
    probs = (x - top).exp_()
    total = probs.sum(1, keepdim=True)
    return probs.div_(total), (top + total.log()).squeeze(1)


def ce_chunk_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over rows, d sum / d logits in logits' dtype) for one chunk.

    logits: [n, V] (any float dtype, upcast to fp32 as the reference does); targets: [n],
    -100 rows contribute neither loss nor gradient.
    """
    x = logits.float()
    valid = targets != IGNORE_INDEX
    safe = targets.clamp_min(0).unsqueeze(1)
    picked = x.gather(1, safe).squeeze(1)
    grad, lse = _softmax_and_lse(x)
    loss = ((lse - picked) * valid).sum()
    grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
    grad.mul_(valid.unsqueeze(1))
    return loss, grad.to(logits.dtype)


def soft_ce_chunk_grad(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ce_chunk_grad for weighted targets (`soft_targets`): ids, weights [n, K] (a row's weights sum to its
    loss weight: its loss_scale for a label or a teacher, 0 for no loss).

    loss = sum_k w_k (lse - x_k); d loss / d logits = softmax * sum_k w_k - scatter(w).
    """
    x = logits.float()
    weights = weights.to(x.dtype)
    total = weights.sum(1)
    picked = (x.gather(1, ids) * weights).sum(1)
    grad, lse = _softmax_and_lse(x)
    loss = (lse * total - picked).sum()
    grad.mul_(total.unsqueeze(1))
    grad.scatter_add_(1, ids, -weights)
    return loss, grad.to(logits.dtype)


@functools.lru_cache(maxsize=None)
def chunk_fn_for(device: torch.device, soft: bool = False):
    """ce_chunk_grad (or soft_ce_chunk_grad), compiled on CUDA (one fused pass instead of six over the chunk's logits)."""
    fn = soft_ce_chunk_grad if soft else ce_chunk_grad
    if torch.device(device).type != "cuda":
        return fn
    return torch.compile(fn, dynamic=True)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, chunk_fn, soft=None):
        n = hidden.shape[0]
        want_h, want_w = hidden.requires_grad, weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            logits = F.linear(h, weight, bias)
            if soft is None:
                loss_c, dlogits = chunk_fn(logits, targets[start : start + chunk_size])
            else:
                loss_c, dlogits = chunk_fn(logits, *(part[start : start + chunk_size] for part in soft))
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
        return gh, gw, gb, None, None, None, None


def chunked_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    chunk_fn=None,
    soft: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum over rows of CE(hidden @ weight.T (+ bias), targets), never holding all logits.

    hidden: [N, H]; weight: [V, H]; targets: [N] (-100 ignored). Rows without a target are
    dropped before the matmul. chunk_fn defaults to ce_chunk_grad, or soft_ce_chunk_grad with
    `soft` (from `soft_targets`); lorakit.fast may pass a compiled copy.
    Returns an fp32 scalar with the same value and gradients as the reference.
    """
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if keep.numel() < targets.numel():
        hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
        if soft is not None:
            soft = tuple(part.index_select(0, keep) for part in soft)
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float()
    default = ce_chunk_grad if soft is None else soft_ce_chunk_grad
    return _ChunkedLinearCE.apply(hidden, weight, bias, targets, chunk_size, chunk_fn or default, soft)


def causal_lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = False, chunk_size: int = 1024
) -> LossOutput:
    """Summed next-token cross-entropy of `batch` under `model`.

    batch: input_ids [B, T]; labels [B, T] (-100 masked, unshifted); position_ids [B, T] (restart
    per packed sample, optional); attention_mask [B, T] (optional); teacher_ids / teacher_probs
    [B, T, K] (optional, see `shift_teacher`: distillation targets that replace the labels where
    given); loss_scale [B, T] (optional, see `shift_loss_scale`: each token's loss is multiplied by its
    sample's scale; n_tokens still counts tokens, as ms-swift's loss_scale does). Labels with a teacher or a
    scale go through the soft-target paths (`soft_targets`). fused=True uses the chunked linear+CE (same
    value, far less memory); chunk_size is its rows per chunk.
    """
    hidden = hidden_states(model, batch)
    _, head = _causal_lm_parts(model)
    targets = shift_targets(batch["labels"], batch.get("position_ids")).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    n_tokens = (targets != IGNORE_INDEX).sum()
    teacher, scale = shift_teacher(batch), shift_loss_scale(batch)
    soft = None
    if teacher is not None or scale is not None:
        if teacher is not None:
            k = teacher[0].shape[-1]
            teacher = (teacher[0].reshape(-1, k), teacher[1].reshape(-1, k))
        soft = soft_targets(targets, teacher, None if scale is None else scale.reshape(-1))
    if fused:
        chunk_fn = chunk_fn_for(hidden.device, soft is not None)
        loss_sum = chunked_linear_ce(hidden, head.weight, targets, head.bias, chunk_size=chunk_size,
                                     chunk_fn=chunk_fn, soft=soft)
    else:
        loss_sum = reference_linear_ce(hidden, head.weight, targets, head.bias, soft=soft)
    return LossOutput(loss_sum=loss_sum, n_tokens=n_tokens)
