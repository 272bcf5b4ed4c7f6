"""Causal language-model loss as a pure function of (model, batch).

Two paths compute the same number:
- reference: body -> hidden states -> lm_head -> full fp32 logits -> cross-entropy (sum);
- fused (chunked): the lm_head matmul and the cross-entropy run over chunks of rows, so the
  [tokens, vocab] fp32 logits (2.5 GB per 4096 tokens on a 152k vocabulary) never exist at once,
  and rows without a target are skipped before the head runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """Summed token loss and the number of tokens it sums over (the loop divides)."""

    loss_sum: torch.Tensor  # fp32 scalar, differentiable
    n_tokens: torch.Tensor  # int64 scalar


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


def _causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning hidden states, lm_head) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the decoder body (no lm_head): [B, T] ids -> [B, T, H] final-norm hidden states."""
    body, _ = _causal_lm_parts(model)
    out = body(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def reference_linear_ce(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over rows of CE(hidden @ weight.T (+ bias), target) with full fp32 logits.

    hidden: [N, H]; weight: [V, H]; targets: [N] (-100 ignored). Returns fp32 scalar.
    """
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = False, chunk_size: int = 1024
) -> LossOutput:
    """Summed next-token cross-entropy of `batch` under `model`.

    batch: input_ids [B, T]; labels [B, T] (-100 masked, unshifted); position_ids [B, T] (restart
    per packed sample, optional); attention_mask [B, T] (optional). fused=True uses the chunked
    linear+CE (same value, far less memory); chunk_size is its rows per chunk.
    """
    hidden = hidden_states(model, batch)
    _, head = _causal_lm_parts(model)
    targets = shift_targets(batch["labels"], batch.get("position_ids")).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    n_tokens = (targets != IGNORE_INDEX).sum()
    if fused:
        from lorakit.fast.linear_ce import chunk_fn_for, chunked_linear_ce

        chunk_fn = chunk_fn_for(hidden.device)
        loss_sum = chunked_linear_ce(hidden, head.weight, targets, head.bias, chunk_size=chunk_size, chunk_fn=chunk_fn)
    else:
        loss_sum = reference_linear_ce(hidden, head.weight, targets, head.bias)
    return LossOutput(loss_sum=loss_sum, n_tokens=n_tokens)
