"""Every preference loss equals TRL 1.16's own code on the same log-probabilities (float64, 1e-6)."""

from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lorakit.rlhf.losses import CPO_LOSS_TYPES, DPO_LOSS_TYPES, cpo_loss, dpo_loss, kto_loss, orpo_loss

trl = pytest.importorskip("trl")
B, T = 6, 12
TOL = dict(rtol=1e-6, atol=1e-6)


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _fake_self(**attrs):
    base = dict(accelerator=_accelerator(), _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
                _tp_size=1, aux_loss_enabled=False, precompute_ref_logps=True, model=SimpleNamespace(training=True))
    return SimpleNamespace(**(base | attrs))


class _FakeModel:
    """Stands in for a model patched with TRL's fused lm_head: returns given per-token log-probs."""

    def __init__(self, by_input: dict[int, torch.Tensor]):
        self.by_input = by_input

    def __call__(self, input_ids, **kwargs):
        lp = self.by_input[id(input_ids)]
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool))


def _token_logps(rows: int, seed: int):
    """Per-token log-probs [rows, T-1] (0 outside the completion) and completion masks [rows, T]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, T, dtype=torch.long)
    for r in range(rows):
        start = int(torch.randint(2, 6, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[r, start:end] = 1
    lp = -torch.rand(rows, T - 1, generator=g, dtype=torch.float64) * 2.0
    return lp * mask[:, 1:], mask


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_losses_equal_trl(loss_type, label_smoothing):
    from trl import DPOTrainer

    if loss_type == "exo_pair" and label_smoothing == 0:
        pytest.skip("exo_pair needs label_smoothing > 0")
    if loss_type == "sigmoid" and label_smoothing:
        pytest.skip("TRL 1.16's sigmoid has no label smoothing; checked against its formula below")
    lp, mask = _token_logps(2 * B, seed=1)
    ref = -torch.rand(2 * B, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 10 - 5
    input_ids = torch.zeros(2 * B, T, dtype=torch.long)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=mask,
                  ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    beta = 0.3
    fake = _fake_self(ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
                      beta=beta, label_smoothing=label_smoothing, use_weighting=False,
                      args=SimpleNamespace(discopop_tau=0.05))
    trl_loss = DPOTrainer._compute_loss(fake, _FakeModel({id(input_ids): lp}), inputs, False)

    sums, lengths = lp.sum(1), mask.sum(1).double()
    ours = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing, len_c=lengths[:B], len_r=lengths[B:])
    torch.testing.assert_close(ours.losses.mean(), trl_loss, **TOL)
    m = fake._metrics["train"]
    assert ours.chosen_rewards.mean().item() == pytest.approx(m["rewards/chosen"][0], abs=1e-9)
    assert ours.rejected_rewards.mean().item() == pytest.approx(m["rewards/rejected"][0], abs=1e-9)
    assert (ours.chosen_rewards - ours.rejected_rewards).mean().item() == pytest.approx(m["rewards/margins"][0], abs=1e-9)
    acc = (ours.chosen_rewards > ours.rejected_rewards).double().mean().item()
    assert acc == pytest.approx(m["rewards/accuracies"][0])


def test_dpo_sigmoid_label_smoothing_is_conservative_dpo():
    """TRL 1.16 dropped cDPO from its sigmoid; ms-swift's --label_smoothing means it (older TRL's formula)."""
    pi_c, pi_r, ref_c, ref_r = (torch.randn(B, dtype=torch.float64) for _ in range(4))
    d = 0.1 * ((pi_c - ref_c) - (pi_r - ref_r))
    expected = -F.logsigmoid(d) * 0.8 - F.logsigmoid(-d) * 0.2
    torch.testing.assert_close(dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=0.2).losses, expected, **TOL)


def test_rpo_term_equals_trl_sft_loss_type():
    """--rpo_alpha a adds a x the chosen NLL per token: TRL's loss_types [sigmoid, sft] weighted [1, a] (one pair)."""
    from trl import DPOTrainer

    lp, mask = _token_logps(2, seed=3)
    ref = torch.tensor([-7.0, -9.0], dtype=torch.float64)
    input_ids = torch.zeros(2, T, dtype=torch.long)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=mask,
                  ref_chosen_logps=ref[:1], ref_rejected_logps=ref[1:])
    fake = _fake_self(ld_alpha=None, f_divergence_type="reverse_kl", loss_types=["sigmoid", "sft"],
                      loss_weights=[1.0, 0.5], beta=0.1, label_smoothing=0.0, use_weighting=False, args=None)
    trl_loss = DPOTrainer._compute_loss(fake, _FakeModel({id(input_ids): lp}), inputs, False)
    sums, lengths = lp.sum(1), mask[:, 1:].sum(1).double()
    ours = dpo_loss(sums[:1], sums[1:], ref[:1], ref[1:], beta=0.1).losses + 0.5 * (-sums[:1] / lengths[:1])
    torch.testing.assert_close(ours.mean(), trl_loss, **TOL)


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cpo_and_simpo_equal_trl(loss_type, label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    pi = -torch.rand(2 * B, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    beta, gamma = (2.0, 0.7) if loss_type == "simpo" else (0.2, 1.0)
    fake = _fake_self(alpha=0.0, beta=beta, loss_type=loss_type, simpo_gamma=gamma, label_smoothing=label_smoothing)
    losses, chosen, rejected = CPOTrainer.cpo_loss(fake, pi[:B], pi[B:])
    ours = cpo_loss(pi[:B], pi[B:], beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=gamma)
    torch.testing.assert_close(ours.losses, losses, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, chosen, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, rejected, **TOL)


def test_orpo_equals_trl():
    from trl.experimental.orpo import ORPOTrainer

    pi = -torch.rand(2 * B, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3 - 1e-3
    fake = _fake_self(beta=0.1)
    trl_losses, chosen, rejected, _, _ = ORPOTrainer.odds_ratio_loss(fake, pi[:B], pi[B:])
    ours = orpo_loss(pi[:B].float(), pi[B:].float(), beta=0.1)  # TRL computes this term in fp32
    torch.testing.assert_close(ours.losses, -trl_losses, **TOL)  # TRL: loss = nll - losses.mean()
    torch.testing.assert_close(ours.chosen_rewards, chosen, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, rejected, **TOL)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_equals_trl(loss_type):
    from trl import KTOTrainer

    n = 2 * B
    lp, mask = _token_logps(n, seed=6)
    kl_lp, kl_mask = _token_logps(n, seed=7)
    g = torch.Generator().manual_seed(8)
    ref, ref_kl = -torch.rand(n, dtype=torch.float64, generator=g) * 8, -torch.rand(n, dtype=torch.float64, generator=g) * 30
    label = torch.tensor([True, False, True, True, False, False, True, False, False, True, True, False])
    ids, kl_ids = torch.zeros(n, T, dtype=torch.long), torch.ones(n, T, dtype=torch.long)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=mask, label=label,
                  KL_input_ids=kl_ids, KL_attention_mask=torch.ones_like(kl_ids), KL_completion_mask=kl_mask,
                  ref_logps=ref, ref_KL_logps=ref_kl)
    fake = _fake_self(beta=0.1, loss_type=loss_type, calculate_KL=loss_type == "kto", desirable_weight=1.3,
                      undesirable_weight=0.8)
    fake._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, fake)
    trl_loss = KTOTrainer._compute_loss(fake, _FakeModel({id(ids): lp, id(kl_ids): kl_lp}), inputs, False)

    pi = lp.sum(1)
    kl = (kl_lp.sum(1) - ref_kl).mean().clamp(min=0) if loss_type == "kto" else torch.zeros((), dtype=torch.float64)
    ours = kto_loss(pi, ref, label, kl, beta=0.1, loss_type=loss_type, desirable_weight=1.3, undesirable_weight=0.8)
    torch.testing.assert_close(ours.losses.mean(), trl_loss, **TOL)
    m = fake._metrics["train"]
    assert ours.chosen_rewards.mean().item() == pytest.approx(m["rewards/chosen"][0], abs=1e-9)
    assert ours.rejected_rewards.mean().item() == pytest.approx(m["rewards/rejected"][0], abs=1e-9)
