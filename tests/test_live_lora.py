"""The fast decoder with a live (unmerged, still training) LoRA adapter picks the reference decoder's greedy
tokens, on the CPU (no graph, no compile), before and after the adapter's weights change."""

from __future__ import annotations

import pytest
import torch

from lorakit.infer.engine import Engine, SamplingParams
from lorakit.infer.fast_decode import unsupported_reason
from tests.conftest import tiny_qwen2_config

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora_model(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    _perturb(peft_model, 1)
    return peft_model.eval()


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def prompts(qwen_tokenizer):
    from lorakit.data.render import render_prompt

    questions = ["Who are you?", "Write a poem about the sea and the old lighthouse keeper.", "2+2?"]
    return [render_prompt(qwen_tokenizer, [{"role": "user", "content": q}]) for q in questions]


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                     ["v_proj", "up_proj"], ["o_proj", "down_proj"]])  # all, some, none of q/k/v
def test_live_adapter_fast_path_equals_reference_and_follows_updates(qwen_tokenizer, prompts, targets):
    model = _lora_model(targets)
    assert "merge_lora" in unsupported_reason(model) and unsupported_reason(model, live_lora=True) is None
    fast = Engine(model, qwen_tokenizer, fast=True, live_adapter=True, compile=False, cuda_graphs=False)
    assert fast.uses_fast_path
    reference = Engine(model, qwen_tokenizer, fast=False)
    before = [g.token_ids for g in reference.generate(prompts, GREEDY)]
    assert [g.token_ids for g in fast.generate(prompts, GREEDY)] == before
    with model.disable_adapter():
        base = [g.token_ids for g in Engine(model, qwen_tokenizer, fast=False).generate(prompts, GREEDY)]
    assert base != before  # the adapter changes the replies, so equality above is not the base model's

    _perturb(model, 2)  # an optimizer step
    after = [g.token_ids for g in reference.generate(prompts, GREEDY)]
    assert after != before
    fast.refresh_adapter()
    assert [g.token_ids for g in fast.generate(prompts, GREEDY)] == after


@pytest.mark.parametrize("fused", [False, True])
def test_rollouts_after_an_optimizer_step_read_the_new_adapter(qwen_tokenizer, prompts, fused):
    """GRPO's own path on the CPU: rollouts on the fast decoder (live adapter) -> GRPO loss -> AdamW step ->
    rollouts again. The second round's completions are the reference decoder's under the updated weights (the
    rollout refreshes the adapter by itself), and the decode step's LoRA buffers are the same tensors as before
    (a captured CUDA graph keeps reading their addresses), holding the new values. fused: the LoRA layers as
    the GPU trains them (lorakit.fast's fused forward), the rest of the GPU set-up being CUDA-only."""
    from lorakit.fast import FastOptions, prepare_for_training
    from lorakit.rlhf.grpo_logps import completion_logps, pad_rollouts
    from lorakit.rlhf.grpo_loss import grpo_loss
    from lorakit.rlhf.grpo_rollout import SamplingSettings, generate_rollouts

    model = _lora_model(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if fused:
        prepare_for_training(model, FastOptions(fused_lora=True, packed_attention=False, torch_compile=False,
                                                gradient_checkpointing=False))
    fast = Engine(model, qwen_tokenizer, fast=True, live_adapter=True, compile=False, cuda_graphs=False)
    reference = Engine(model, qwen_tokenizer, fast=False)
    greedy = SamplingSettings(max_completion_length=12, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    rollout = lambda engine: [r.completion_ids for r in generate_rollouts(  # noqa: E731
        engine, prompts, num_generations=2, sampling=greedy, seed=0, round_index=0, end_of_turn=None)]
    groups = [g for layer in fast._fast.layers for g in layer.lora]
    buffers = [(g.a.data_ptr(), g.b.data_ptr()) for g in groups]
    before = rollout(fast)
    assert before == rollout(reference)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batch = pad_rollouts([p for p in prompts for _ in range(2)], before, pad_id=0)
    logps = completion_logps(model, batch)
    advantages = torch.tensor([1.0, -1.0] * len(prompts))
    grpo_loss(logps, advantages, batch.completion_mask, beta=0.0).loss.backward()
    optimizer.step()

    after = rollout(fast)
    assert after == rollout(reference) and after != before
    assert [(g.a.data_ptr(), g.b.data_ptr()) for g in groups] == buffers
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    rank = q.lora_A["default"].weight.shape[0]
    assert torch.equal(groups[0].a[:rank], q.lora_A["default"].weight.detach())
