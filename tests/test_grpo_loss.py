"""GRPO's advantages, loss, KL and per-token log-probs equal TRL's GRPOTrainer on the same inputs (float64).

TRL's `_compute_loss` is called itself, on a stand-in trainer whose log-prob method returns our tensor;
the advantage code is TRL's `_generate_and_score_completions` lines, which are not a separate function.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head
from trl.trainer.utils import nanstd as trl_nanstd

from lorakit.rlhf.grpo_logps import completion_logps, pad_rollouts
from lorakit.rlhf.logps import chunked_token_logps, reference_token_logps
from lorakit.rlhf.grpo_loss import LOSS_TYPES, group_advantages, grpo_loss, k3_kl, nanstd

torch.set_default_dtype(torch.float64)


@pytest.fixture(autouse=True, scope="module")
def _float32_default_after():
    yield
    torch.set_default_dtype(torch.float32)


def trl_advantages(rewards_per_func, weights, num_generations, scale_rewards):
    """TRL 1.16 `_generate_and_score_completions`, multi_objective_aggregation='sum_then_normalize', verbatim."""
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = trl_nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, 2, generator=g)
    rewards[4:8, 0] = 1.0  # a group whose first reward is flat
    rewards[4:8, 1] = 0.5  # ... and the second too: zero signal
    rewards[9, 1] = float("nan")  # a function returned None
    rewards[10] = float("nan")  # no function scored this completion
    weights = torch.tensor([1.0, 0.5])
    ours = group_advantages(rewards, weights, 4, scale)
    expected, zero = trl_advantages(rewards.clone(), weights, 4, scale)
    torch.testing.assert_close(ours.advantages, expected, rtol=0, atol=1e-12)
    assert ours.zero_std.tolist() == zero.tolist()
    assert (ours.zero_signal_groups, ours.groups) == (1, 3)
    assert ours.advantages[10] == 0.0


def test_nanstd_equals_trl():
    x = torch.tensor([[1.0, 2.0, float("nan"), 4.0], [3.0, float("nan"), float("nan"), float("nan")]])
    torch.testing.assert_close(nanstd(x, dim=1), trl_nanstd(x, dim=1), equal_nan=True)
    torch.testing.assert_close(nanstd(x), trl_nanstd(x))


def _fake_trainer(loss_type, beta, eps_low, eps_high, grad_accum, steps_per_generation, max_len, logps):
    """The attributes TRL's `_compute_loss` reads, with the log-prob method returning `logps`."""
    acc = SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                          gather_for_metrics=lambda x: x)
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum, max_completion_length=max_len, accelerator=acc,
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=steps_per_generation),
    )


def _case(seed=0, rows=6, length=7):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(rows, length, generator=g) * 3).requires_grad_(True)
    old = logps.detach() + torch.randn(rows, length, generator=g) * 0.3  # ratios well outside [0.8, 1.28]
    ref = logps.detach() + torch.randn(rows, length, generator=g) * 0.5
    adv = torch.randn(rows, generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    for i, n in enumerate([7, 3, 5, 1, 6, 0]):
        mask[i, n:] = 0
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_trl(loss_type, beta):
    logps, old, ref, adv, mask = _case()
    eps_low, eps_high, accum, spg, max_len, items = 0.2, 0.28, 2, 4, 16, 40
    ours = grpo_loss(logps, adv, mask, old_logps=old, ref_logps=ref, loss_type=loss_type, beta=beta,
                     epsilon_low=eps_low, epsilon_high=eps_high, max_completion_length=max_len,
                     num_items_in_batch=items, gradient_accumulation_steps=accum, steps_per_generation=spg)
    (ours_grad,) = torch.autograd.grad(ours.loss, logps)

    trl_logps = logps.detach().clone().requires_grad_(True)
    fake = _fake_trainer(loss_type, beta, eps_low, eps_high, accum, spg, max_len, trl_logps)
    inputs = dict(prompt_ids=torch.zeros(6, 2, dtype=torch.long), prompt_mask=torch.ones(6, 2, dtype=torch.long),
                  completion_ids=torch.zeros(6, 7, dtype=torch.long), completion_mask=mask, advantages=adv,
                  old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=torch.tensor(float(items)))
    expected = GRPOTrainer._compute_loss(fake, None, inputs)
    (trl_grad,) = torch.autograd.grad(expected, trl_logps)
    torch.testing.assert_close(ours.loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-12, atol=1e-12)
    metrics = fake._metrics["train"]
    assert ours.clip_low.item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-7)  # TRL counts in float32
    assert ours.clip_high.item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-7)
    assert ours.clip_region.item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-7)
    assert 0 < ours.clip_region.item() < 1
    if beta:
        assert ours.kl.item() == pytest.approx(metrics["kl"][0], abs=1e-7)


def test_on_policy_ratio_is_one_and_loss_is_minus_advantage():
    logps, _, _, adv, mask = _case()
    out = grpo_loss(logps, adv, mask, loss_type="grpo", beta=0.0)
    nonempty = mask.sum(1) > 0
    assert out.loss.item() == pytest.approx(-(adv[nonempty].sum() / len(adv)).item())
    assert out.clip_region.item() == 0.0


def test_k3_kl_is_zero_at_equality_and_positive_elsewhere():
    a = torch.tensor([-1.0, -2.0, -0.5])
    assert k3_kl(a, a).abs().max().item() == 0.0
    assert (k3_kl(a, a + torch.tensor([0.3, -0.3, 1.0])) > 0).all()


def test_chunked_token_logps_equal_reference_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=g)
    upstream = torch.randn(10, generator=g)
    ref = reference_token_logps(hidden, weight, targets, bias, temperature=0.7)
    ours = chunked_token_logps(hidden, weight, targets, bias, temperature=0.7, chunk_size=3)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (hidden, weight, bias))
    grads_ours = torch.autograd.grad((ours * upstream).sum(), (hidden, weight, bias))
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_completion_logps_equal_trl_fused_head(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float64)
    batch = pad_rollouts([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15]], pad_id=0)
    ours = completion_logps(model, batch, temperature=0.9)
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    keep = batch.completion_mask.bool()
    plain = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, -4:-1] / 0.9, -1)
    plain = plain.gather(2, batch.completion_ids.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(ours[keep], plain[keep], rtol=1e-8, atol=1e-8)  # a plain forward (positions shifted by padding)
    add_fused_lm_head(model, temperature=0.9)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-3] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    expected = out.log_probs[:, -3:]  # TRL's kernel computes in float32
    torch.testing.assert_close(ours[keep].float(), expected[keep], rtol=1e-5, atol=1e-5)


def test_shared_prefix_logps_equal_whole_rows_values_and_gradients(tiny_qwen2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    system = list(range(100, 112))
    batch = pad_rollouts([system + [5, 6, 7], system + [9], system + [5, 6, 7]],
                         [[11, 12, 13], [14, 15], [16]], pad_id=0)
    from lorakit.rlhf.grpo_logps import _shared_prefix

    assert _shared_prefix(batch) == 12
    weights = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for share in (False, True):
        out = completion_logps(model, batch, temperature=0.8, share_prefix=share)
        grads = torch.autograd.grad((out * weights * batch.completion_mask).sum(), params)
        results.append((out, grads))
    keep = batch.completion_mask.bool()
    torch.testing.assert_close(results[1][0][keep], results[0][0][keep], rtol=1e-9, atol=1e-9)
    for a, b in zip(results[1][1], results[0][1]):  # transformers builds the RoPE tables in float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
