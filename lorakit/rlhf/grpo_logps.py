"""Per-token log-probabilities of sampled completions under a model, as GRPO's loss needs them.

Rows are a left-padded prompt followed by a right-padded completion (what rollouts produce). The
decoder body runs once per row; the lm_head and log-softmax run only at completion positions, in
chunks of rows, and never keep the [tokens, vocab] logits: `chunked_token_logps` recomputes a chunk's logits
in the backward pass (GRPO's upstream gradient differs per token, so unlike lorakit.loss's summed
CE the gradient cannot be finished in the forward pass). `reference_token_logps` is the plain
computation it is tested against (both in lorakit.rlhf.logps, shared with the preference losses); both
divide the logits by the sampling temperature first, as TRL and ms-swift do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.loss import _causal_lm_parts, hidden_states
from lorakit.rlhf.logps import chunked_token_logps, reference_token_logps


@dataclass
class RolloutBatch:
    """Completions padded into tensors: prompt left-padded, completion right-padded."""

    prompt_ids: torch.Tensor  # [B, P] long
    prompt_mask: torch.Tensor  # [B, P] long, 0 on padding
    completion_ids: torch.Tensor  # [B, C] long
    completion_mask: torch.Tensor  # [B, C] long, 1 on tokens the loss sees

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(*(t.to(device) for t in (self.prompt_ids, self.prompt_mask, self.completion_ids,
                                                      self.completion_mask)))


def pad_rollouts(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                 keep: list[bool] | None = None) -> RolloutBatch:
    """Stack prompts (left-padded) and completions (right-padded); keep[i] False masks a completion out."""
    width, length = max(map(len, prompts)), max(1, max(map(len, completions)))
    rows = len(prompts)
    prompt_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((rows, width), dtype=torch.long)
    completion_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((rows, length), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[i, width - len(p):] = torch.tensor(p)
        prompt_mask[i, width - len(p):] = 1
        if c:
            completion_ids[i, :len(c)] = torch.tensor(c)
            completion_mask[i, :len(c)] = 0 if keep is not None and not keep[i] else 1
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask)


def completion_logps(model, batch: RolloutBatch, *, temperature: float = 1.0, fused: bool = True,
                     share_prefix: bool | None = None) -> torch.Tensor:
    """log pi(completion token | prompt, earlier completion tokens) for every completion position. -> [B, C] fp32.

    Padding positions get a value too (the loss masks them out). share_prefix: the prompts' common start (a
    group's whole prompt, or the template's system prompt) runs once for all rows (lorakit.loss's shared
    prefix); the same numbers as running every row whole. None: on the CPU only. On a GPU the whole rows
    take the training fast paths (flash attention, layers compiled once for a fixed shape), while a prefix
    would send the rows through the KV-cache path (masked SDPA, a compile per shape) to save a prompt that
    is a small share of prompt + completion."""
    if share_prefix is None:
        share_prefix = batch.prompt_ids.device.type != "cuda"
    prefix = _shared_prefix(batch) if share_prefix else 0
    if prefix:
        hidden = _hidden_after_shared_prefix(model, batch, prefix)
    else:
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        mask = torch.cat([batch.prompt_mask, torch.ones_like(batch.completion_mask)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = hidden_states(model, {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions})
        width = batch.prompt_ids.shape[1]
        hidden = hidden[:, width - 1: width - 1 + batch.completion_ids.shape[1]]  # position t predicts t + 1
    length = batch.completion_ids.shape[1]
    _, head = _causal_lm_parts(model)
    fn = chunked_token_logps if fused else reference_token_logps
    out = fn(hidden.reshape(-1, hidden.shape[-1]), head.weight, batch.completion_ids.reshape(-1), head.bias, temperature)
    return out.view(-1, length)


MIN_SHARED_PREFIX = 8  # fewer common tokens are not worth a separate prefix pass


def _shared_prefix(batch: RolloutBatch) -> int:
    """Tokens every row's prompt starts with (each row keeps at least its last prompt token), 0 when few or one row."""
    rows = batch.prompt_ids.shape[0]
    if rows < 2:
        return 0
    lengths = batch.prompt_mask.sum(1)
    width = batch.prompt_ids.shape[1]
    shortest = int(lengths.min())
    starts = width - lengths  # left padding
    aligned = torch.stack([batch.prompt_ids[i, int(starts[i]):int(starts[i]) + shortest] for i in range(rows)])
    same = (aligned == aligned[:1]).all(0).long()
    n = int(same.cumprod(0).sum())
    n = min(n, shortest - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def _hidden_after_shared_prefix(model, batch: RolloutBatch, n: int) -> torch.Tensor:
    """[B, C, H] hidden states predicting each completion token, the first n prompt tokens run once.

    Each row continues the prefix with the rest of its prompt and its completion, right-padded."""
    rows, width = batch.prompt_ids.shape
    length = batch.completion_ids.shape[1]
    lengths = batch.prompt_mask.sum(1).tolist()
    rest = [int(p) - n for p in lengths]
    span = max(rest) + length
    ids = batch.prompt_ids.new_zeros(rows, span)
    mask = batch.prompt_mask.new_zeros(rows, span)
    for i in range(rows):
        ids[i, :rest[i]] = batch.prompt_ids[i, width - rest[i]:]
        ids[i, rest[i]:rest[i] + length] = batch.completion_ids[i]
        mask[i, :rest[i] + length] = 1
    start = width - lengths[0]
    prefix = batch.prompt_ids[:1, start:start + n]
    hidden = hidden_states(model, {"input_ids": ids, "attention_mask": mask, "prefix_ids": prefix})
    index = torch.tensor(rest, device=ids.device)[:, None] - 1 + torch.arange(length, device=ids.device)[None, :]
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
