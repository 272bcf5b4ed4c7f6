"""The preference loss of one batch as a `loss_fn(model, batch) -> LossOutput`, the sft loop's seam.

A pair batch (data.collate_pairs) holds chosen rows then rejected rows (then any replay anchor rows) and runs
as ONE forward; the per-sequence log-probs come from logps.token_logps (chunked lm_head over the answer
tokens only).
`LossOutput.loss_sum` sums per-pair losses and `n_tokens` counts pairs, so the loop's division gives
the mean over the pairs of a whole optimizer step. Metrics are (sum, count) pairs named as TRL and
ms-swift log them: rewards/chosen, rewards/rejected, rewards/accuracies, logps/chosen, logps/rejected
(rewards/margins is derived from the first two), plus nll and kl where the loss has them, and replay_kl
(the anchor's KL to the reference, anchor.py) when the batch carries anchor rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from lorakit.args import RlhfGroup
from lorakit.loss import LossOutput, hidden_states
from lorakit.rlhf.anchor import anchor_kl
from lorakit.rlhf.data import anchor_rows, joined_anchor_rows, sub_batch
from lorakit.rlhf.logps import TokenLogps, token_logps
from lorakit.rlhf.losses import PreferenceLoss, cpo_loss, dpo_loss, kto_loss, orpo_loss

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]


def _metric(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return values.detach().float().sum(), torch.tensor(values.numel())


def policy_pass(model, batch: dict[str, torch.Tensor], cfg: RlhfGroup, metrics: dict, *,
                fused: bool) -> tuple[TokenLogps, torch.Tensor | float]:
    """One forward of the batch's rows: the log-probs of its pair (or completion) rows, and --replay_kl x the
    weighted sum of its anchor rows' (the batch's last rows) KL to the reference (0.0 without anchor rows; logs
    replay_kl)."""
    hidden = hidden_states(model, batch)
    joined = joined_anchor_rows(batch)
    main = hidden[:hidden.shape[0] - joined]
    labels = {k: v[:main.shape[0]] for k, v in batch.items() if k in ("labels", "position_ids")}
    logps = token_logps(model, labels, fused=fused, hidden=main)
    if not joined or not cfg.replay_kl:
        return logps, 0.0
    anchor = anchor_rows(batch)
    kl = anchor_kl(model, anchor, hidden=hidden[main.shape[0]:])
    metrics["replay_kl"] = _metric(kl)
    return logps, cfg.replay_kl * (kl * anchor["weight"].to(kl.dtype)).sum()


def pair_loss(model, batch: dict[str, torch.Tensor], cfg: RlhfGroup, *, fused: bool = True) -> LossOutput:
    """DPO / CPO / SimPO / ORPO loss of a pair batch (see losses.py for each formula)."""
    metrics: dict = {}
    logps, anchor = policy_pass(model, batch, cfg, metrics, fused=fused)
    sums, counts = logps.sum(), logps.count().float()
    b = sums.shape[0] // 2
    pi_c, pi_r, len_c, len_r = sums[:b], sums[b:], counts[:b], counts[b:]
    nll_c = -pi_c / len_c.clamp(min=1)
    kind, extra = cfg.rlhf_type, None
    if kind == "dpo":
        out = dpo_loss(pi_c, pi_r, batch["ref_chosen"], batch["ref_rejected"], beta=cfg.beta, loss_type=cfg.loss_type,
                       label_smoothing=cfg.label_smoothing, len_c=len_c, len_r=len_r)
        shown_c, shown_r = pi_c, pi_r
        extra = cfg.rpo_alpha * nll_c if cfg.rpo_alpha else None
    elif kind in ("cpo", "simpo"):
        mean = cfg.loss_type in ("ipo", "simpo")  # TRL: per-token means for these two
        shown_c, shown_r = (pi_c / len_c.clamp(min=1), pi_r / len_r.clamp(min=1)) if mean else (pi_c, pi_r)
        out = cpo_loss(shown_c, shown_r, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                       simpo_gamma=cfg.simpo_gamma)
        extra = cfg.cpo_alpha * nll_c if cfg.cpo_alpha else None
    elif kind == "orpo":
        shown_c, shown_r = pi_c / len_c.clamp(min=1), pi_r / len_r.clamp(min=1)
        out = orpo_loss(shown_c, shown_r, beta=cfg.beta)
        extra = nll_c
    else:
        raise ValueError(f"pair_loss does not handle --rlhf_type {kind}")
    losses = out.losses + extra if extra is not None else out.losses
    metrics |= pair_metrics(out, shown_c, shown_r)
    if extra is not None:
        metrics["nll_loss"] = _metric(nll_c)
    return LossOutput(loss_sum=losses.sum() + anchor, n_tokens=torch.tensor(b), metrics=metrics)


def pair_metrics(out: PreferenceLoss, logps_c: torch.Tensor, logps_r: torch.Tensor) -> dict:
    """TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies (chosen > rejected), logps/*."""
    return {
        "rewards/chosen": _metric(out.chosen_rewards),
        "rewards/rejected": _metric(out.rejected_rewards),
        "rewards/accuracies": _metric((out.chosen_rewards > out.rejected_rewards).float()),
        "logps/chosen": _metric(logps_c),
        "logps/rejected": _metric(logps_r),
    }


def completion_loss(model, batch: dict[str, torch.Tensor], cfg: RlhfGroup, *, fused: bool = True) -> LossOutput:
    """KTO loss of a batch of labelled completions; the KL estimate runs the mismatched rows without grad."""
    metrics: dict = {}
    logps, anchor = policy_pass(model, batch, cfg, metrics, fused=fused)
    pi = logps.sum()
    with torch.no_grad():
        own = "kl_input_ids" not in batch  # each KL row is its own completion (collate_completions)
        kl_pi = pi.detach() if own else token_logps(model, sub_batch(batch, "kl_"), fused=fused).sum()
        kl = (kl_pi - batch["ref_kl"]).mean().clamp(min=0) if cfg.loss_type == "kto" else torch.zeros((), device=pi.device)
    desirable = batch["desirable"]
    out = kto_loss(pi, batch["ref"], desirable, kl, beta=cfg.beta, loss_type=cfg.loss_type,
                   desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    metrics |= {
        "rewards/chosen": _metric(out.chosen_rewards),
        "rewards/rejected": _metric(out.rejected_rewards),
        "logps/chosen": _metric(pi[desirable]),
        "logps/rejected": _metric(pi[~desirable]),
        "kl": (kl.detach().float(), torch.tensor(1)),
    }
    return LossOutput(loss_sum=out.losses.sum() + anchor, n_tokens=torch.tensor(pi.shape[0]), metrics=metrics)


def make_preference_loss_fn(cfg: RlhfGroup, *, fused: bool = True) -> LossFn:
    """The loss_fn the sft loop calls for --rlhf_type (one visible dispatch)."""
    if cfg.rlhf_type == "kto":
        return lambda model, batch: completion_loss(model, batch, cfg, fused=fused)
    if cfg.rlhf_type in ("dpo", "cpo", "simpo", "orpo"):
        return lambda model, batch: pair_loss(model, batch, cfg, fused=fused)
    raise ValueError(f"no preference loss for --rlhf_type {cfg.rlhf_type}")
