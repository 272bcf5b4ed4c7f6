"""Preference losses as pure functions of per-sequence log-probabilities.

Notation (B pairs, or N unpaired completions for KTO; every tensor fp32 or fp64, shape [B]):
  pi_c, pi_r   policy log-prob of the chosen / rejected response, summed over its tokens
  ref_c, ref_r the reference policy's (the starting policy; precomputed)
  len_c, len_r response lengths in tokens
  nll_c        the policy's mean per-token negative log-likelihood of the chosen response

Every function returns a PreferenceLoss whose `losses` are per pair (per completion for KTO): the
loop sums them and divides by the pairs of the whole optimizer step, so gradient accumulation does
not change the gradient. The formulas follow TRL 1.16 (DPOTrainer._compute_loss, experimental
CPOTrainer.cpo_loss / ORPOTrainer.odds_ratio_loss, KTOTrainer._compute_loss) and the tests compare
them with TRL's own code. Where TRL averages an NLL term over the tokens of the whole batch, it is
averaged per pair here (the same number at one pair per batch), for the reason above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "sigmoid_norm")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class PreferenceLoss:
    """Per-example losses (differentiable) and the implicit rewards TRL logs (detached)."""

    losses: torch.Tensor            # [B] (pairs) or [N] (KTO completions)
    chosen_rewards: torch.Tensor    # [B] ([n_desirable] for KTO)
    rejected_rewards: torch.Tensor  # [B] ([n_undesirable] for KTO)


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x): the conservative (cDPO) loss; e = 0 is plain DPO."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             len_c: torch.Tensor | None = None, len_r: torch.Tensor | None = None) -> PreferenceLoss:
    """DPO and its variants; rewards are beta * (pi - ref) for each side.

    With h_c = pi_c - ref_c, h_r = pi_r - ref_r and d = h_c - h_r:
      sigmoid      -(1-e) log s(beta d) - e log s(-beta d)       (e = label_smoothing; TRL 1.16 has e = 0)
      hinge        relu(1 - beta d)
      ipo          (h_c/len_c - h_r/len_r - 1/(2 beta))^2        (TRL's length-normalised IPO)
      exo_pair     KL(softmax(beta d) || [1-e, e])               (needs e > 0)
      nca_pair     -log s(beta h_c) - 0.5 log s(-beta h_c) - 0.5 log s(-beta h_r)
      robust       ((1-e) (-log s(beta d)) + e log s(-beta d)) / (1 - 2e)
      bco_pair     -log s(beta h_c) - log s(-beta h_r)
      sppo_hard    (h_c - 0.5/beta)^2 + (h_r + 0.5/beta)^2
      aot          smoothed sigmoid of beta (sort(pi_c - pi_r) - sort(ref_c - ref_r)) over the batch
      aot_unpaired smoothed sigmoid of beta (sort(h_c) - sort(h_r))
      apo_zero     1 - s(beta h_c) + s(beta h_r)
      apo_down     s(beta h_c) + 1 - s(beta d)
      sigmoid_norm -log s(beta (h_c/len_c - h_r/len_r))
    len_c, len_r: [B] response token counts, needed by ipo and sigmoid_norm.
    """
    h_c, h_r = pi_c - ref_c, pi_r - ref_r
    d = h_c - h_r
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * d, e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type in ("ipo", "sigmoid_norm"):
        if len_c is None or len_r is None:
            raise ValueError(f"loss_type {loss_type} needs the response lengths len_c and len_r")
        d_avg = h_c / len_c.clamp(min=1) - h_r / len_r.clamp(min=1)
        losses = (d_avg - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * d_avg)
    elif loss_type == "exo_pair":
        eps = torch.tensor(e, dtype=d.dtype, device=d.device)
        losses = (torch.sigmoid(beta * d) * (F.logsigmoid(beta * d) - torch.log1p(-eps))
                  + torch.sigmoid(-beta * d) * (F.logsigmoid(-beta * d) - torch.log(eps)))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * h_c) - 0.5 * F.logsigmoid(-beta * h_c) - 0.5 * F.logsigmoid(-beta * h_r)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * d) + e * F.logsigmoid(-beta * d)) / (1 - 2 * e)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * h_c) - F.logsigmoid(-beta * h_r)
    elif loss_type == "sppo_hard":
        losses = (h_c - 0.5 / beta) ** 2 + (h_r + 0.5 / beta) ** 2
    elif loss_type == "aot":
        delta = torch.sort(pi_c - pi_r, dim=0)[0] - torch.sort(ref_c - ref_r, dim=0)[0]
        losses = _smoothed_sigmoid(beta * delta, e)
    elif loss_type == "aot_unpaired":
        losses = _smoothed_sigmoid(beta * (torch.sort(h_c, dim=0)[0] - torch.sort(h_r, dim=0)[0]), e)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * h_c) + torch.sigmoid(beta * h_r)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * h_c) + 1 - torch.sigmoid(beta * d)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; one of {', '.join(DPO_LOSS_TYPES)}")
    return PreferenceLoss(losses, beta * h_c.detach(), beta * h_r.detach())


def cpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, simpo_gamma: float = 1.0) -> PreferenceLoss:
    """CPO (and SimPO as its loss_type 'simpo'): DPO without a reference; rewards are beta * pi.

    pi_c, pi_r are summed log-probs for sigmoid/hinge and per-token means for ipo/simpo (TRL's
    choice). With d = pi_c - pi_r:
      sigmoid  smoothed sigmoid of beta d;   hinge  relu(1 - beta d);   ipo  (d - 1/(2 beta))^2
      simpo    smoothed sigmoid of beta (d - gamma/beta) = beta d - gamma (SimPO's target margin)
    The caller adds cpo_alpha * nll_c (the behaviour-cloning term of CPO).
    """
    d = pi_c - pi_r
    if loss_type == "simpo":
        losses = _smoothed_sigmoid(beta * (d - simpo_gamma / beta), label_smoothing)
    elif loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * d, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; one of {', '.join(CPO_LOSS_TYPES)}")
    return PreferenceLoss(losses, beta * pi_c.detach(), beta * pi_r.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.693147, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, *, beta: float) -> PreferenceLoss:
    """ORPO's odds-ratio term: -beta log s(log odds(y_c) - log odds(y_r)), odds(y) = p / (1 - p).

    pi_c, pi_r: per-token MEAN log-probs of the responses (TRL). log odds = pi - log(1 - exp(pi)).
    The caller adds the chosen NLL, so the full ORPO loss is nll_c + this. Rewards: beta * pi.
    """
    log_odds = (pi_c - pi_r) - (log1mexp(pi_c) - log1mexp(pi_r))
    return PreferenceLoss(-beta * F.logsigmoid(log_odds), beta * pi_c.detach(), beta * pi_r.detach())


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *, beta: float,
             loss_type: str = "kto", desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PreferenceLoss:
    """KTO on unpaired completions; `losses` lists the desirable ones first, then the undesirable.

    pi, ref: [N] summed log-probs; desirable: [N] bool; kl: scalar, the detached estimate
    max(0, mean(pi - ref) over mismatched prompt/completion pairs) (z_ref of the KTO paper).
    With h = pi - ref:
      kto                desirable: w_d (1 - s(beta (h - kl)));  undesirable: w_u (1 - s(beta (kl - h)))
      apo_zero_unpaired  desirable: w_d (1 - s(beta h));         undesirable: w_u s(beta h)
    The loss is the mean over the N completions (TRL: losses.nanmean()).
    """
    h = pi - ref
    h_d, h_u = h[desirable], h[~desirable]
    if loss_type == "kto":
        loss_d, loss_u = 1 - torch.sigmoid(beta * (h_d - kl)), 1 - torch.sigmoid(beta * (kl - h_u))
    elif loss_type == "apo_zero_unpaired":
        loss_d, loss_u = 1 - torch.sigmoid(beta * h_d), torch.sigmoid(beta * h_u)
    else:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; one of {', '.join(KTO_LOSS_TYPES)}")
    losses = torch.cat([desirable_weight * loss_d, undesirable_weight * loss_u])
    return PreferenceLoss(losses, beta * h_d.detach(), beta * h_u.detach())
