"""GRPO's math as pure functions: group advantages, the clipped policy loss with its KL term, and the
per-token log-probabilities they need.

Shapes: N completions = P prompts x G generations, rows of a prompt's group adjacent; F reward
functions; a micro-batch holds B completions padded to T completion tokens. The formulas and the
normalisation of every `loss_type` are TRL's GRPOTrainer's (`_generate_and_score_completions` for
the advantages, `_compute_loss` for the loss); tests/test_grpo_loss.py calls TRL's own code on the
same inputs and asserts equality in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


@dataclass
class Advantages:
    """Per-completion advantages and what the log reports about the rewards behind them."""

    advantages: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N] weighted sum over functions (NaN where every function returned None)
    zero_std: torch.Tensor  # [N] bool: the completion's group (or batch, with scale "batch") had one reward
    zero_signal_groups: int  # groups whose rewards are all equal: they teach nothing
    groups: int


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = (variance * correction).sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


def group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                     scale_rewards: str = "group") -> Advantages:
    """A_i = (r_i - mean of its group) / (std + 1e-4); r_i = sum_f w_f r_if over the functions that scored it.

    rewards_per_func: [N, F] (NaN where a function returned None); weights: [F]. scale_rewards: "group"
    divides by the group's std, "batch" by the std of all N rewards, "none" does not divide (Dr. GRPO).
    A completion no function scored gets advantage 0 and is left out of its group's mean.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = float("nan")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    group_std = nanstd(grouped, dim=1) if num_generations > 1 else torch.zeros(grouped.shape[0]).to(rewards)
    flat = torch.isclose(group_std, torch.zeros_like(group_std)) | torch.isnan(group_std)
    return Advantages(advantages=torch.nan_to_num(advantages, nan=0.0), rewards=rewards, zero_std=zero_std,
                      zero_signal_groups=int(flat.sum()), groups=grouped.shape[0])


@dataclass
class GrpoLossOutput:
    """The micro-batch's loss (already divided for gradient accumulation) and its logged parts."""

    loss: torch.Tensor  # scalar, differentiable
    kl: torch.Tensor | None  # scalar: mean k3 KL over completion tokens (None with beta 0)
    clip_low: torch.Tensor  # scalar: share of tokens whose ratio was clipped below (negative advantage)
    clip_high: torch.Tensor  # scalar: share clipped above (positive advantage)
    clip_region: torch.Tensor  # scalar: either


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3; >= 0). [B, T] -> [B, T]."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
              loss_type: str = "grpo", beta: float = 0.04, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, max_completion_length: int = 512,
              num_items_in_batch: float | torch.Tensor | None = None, gradient_accumulation_steps: int = 1,
              steps_per_generation: int = 1) -> GrpoLossOutput:
    """Clipped surrogate loss + beta * KL of one micro-batch.

    logps: [B, T] log pi_theta(o_t | q, o_<t) (temperature-scaled logits, differentiable);
    advantages: [B]; mask: [B, T] 1 on completion tokens that count; old_logps: [B, T] the policy that
    sampled them (None: logps.detach(), ratio 1); ref_logps: [B, T] the reference (needed when beta != 0).
    ratio r = exp(logps - old); per token l = -min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta KL.
    Normalisation (then / gradient_accumulation_steps, except dapo):
      grpo: each completion's mean over its tokens, mean over completions;
      bnpo: sum over the micro-batch's tokens / their count;
      dr_grpo: sum / (B * max_completion_length);
      dapo: sum / (num_items_in_batch * gradient_accumulation_steps / steps_per_generation), with
            num_items_in_batch the completion tokens of the whole generation batch.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        per_token_kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * per_token_kl
        kl = (per_token_kl * mask).sum() / mask.sum().clamp(min=1.0)
    loss = _normalise(per_token * mask, mask, loss_type, max_completion_length, num_items_in_batch,
                      gradient_accumulation_steps, steps_per_generation)
    tokens = mask.sum().clamp(min=1.0)
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(logps.dtype)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(logps.dtype)
    return GrpoLossOutput(loss=loss, kl=kl.detach() if kl is not None else None,
                          clip_low=(low * mask).sum() / tokens, clip_high=(high * mask).sum() / tokens,
                          clip_region=(((low + high) > 0).to(logps.dtype) * mask).sum() / tokens)


def _normalise(masked: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
               num_items_in_batch, gradient_accumulation_steps: int, steps_per_generation: int) -> torch.Tensor:
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / gradient_accumulation_steps
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / gradient_accumulation_steps
    if loss_type == "dr_grpo":
        return masked.sum() / (masked.shape[0] * max_completion_length) / gradient_accumulation_steps
    if num_items_in_batch is None:
        raise ValueError("loss_type dapo needs num_items_in_batch (completion tokens of the generation batch)")
    items = torch.as_tensor(num_items_in_batch, dtype=masked.dtype, device=masked.device).clamp(min=1.0)
    return masked.sum() / (items * gradient_accumulation_steps / steps_per_generation)
