"""The replay anchor of preference training (rlhf/anchor.py): its KL equals a plain computation, it is added to
every preference loss as weighted, its prompts stay apart from the eval's, and its answers are the starting
policy's own."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.args import DataArgs, LoraArgs, RlhfArgs, RlhfGroup
from lorakit.data.packing import collate
from lorakit.errors import UserError
from lorakit.fast import FastOptions, prepare_for_training
from lorakit.evaluate import load_retention_questions
from lorakit.replay import load_general_prompts
from lorakit.rlhf.anchor import anchor_answers, anchor_kl, anchor_samples, kl_to_teacher, load_anchor_prompts
from lorakit.rlhf.data import (attach_anchors, collate_completions, collate_pairs, joined_anchor_rows,
                               load_preference_data)
from lorakit.rlhf.objective import completion_loss, pair_loss
from lorakit.tuners import attach_tuner


def test_kl_to_teacher_is_the_kl_over_the_listed_tokens_and_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, dtype=torch.float64)
    ids = torch.tensor([[2, 5, 0], [1, 3, 6], [4, 0, 0]])
    probs = torch.tensor([[0.5, 0.3, 0.1], [0.6, 0.2, 0.15], [0.9, 0.0, 0.0]], dtype=torch.float64)
    got = kl_to_teacher(logits, ids, probs)
    for n in range(3):
        q = torch.softmax(logits[n], -1).tolist()
        listed = {int(i): float(p) for i, p in zip(ids[n], probs[n]) if p > 0}
        p_rest, q_rest = 1 - sum(listed.values()), 1 - sum(q[i] for i in listed)
        want = sum(p * math.log(p / q[i]) for i, p in listed.items()) + p_rest * math.log(p_rest / q_rest)
        assert got[n].item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    # the policy as teacher: zero, whatever the top-k
    own = torch.softmax(logits, -1).gather(1, ids) * (probs > 0)
    assert torch.allclose(kl_to_teacher(logits, ids, own), torch.zeros(3, dtype=torch.float64), atol=1e-14)


@pytest.fixture
def tiny(tiny_qwen2_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    torch.manual_seed(0)
    model, _ = attach_tuner(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float64),
                            LoraArgs(lora_rank=4, lora_dropout=0.0))
    return model, tokenizer


def trained_looking(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def test_anchor_answers_are_the_starting_policys_and_cached(tiny, tmp_path):
    model, tokenizer = tiny
    answers = anchor_answers(model, tokenizer, system=None, cache_dir=tmp_path, max_new_tokens=4, top_k=5,
                             log=lambda m: None)
    assert [a.prompt for a in answers] == load_anchor_prompts()
    with torch.no_grad():  # greedy: each answer token is the model's argmax, its top-5 the model's
        ids = torch.tensor([answers[0].prompt_ids + answers[0].answer_ids])
        logits = model(ids).logits[0, len(answers[0].prompt_ids) - 1:-1]
    assert logits.argmax(-1).tolist() == answers[0].answer_ids
    top = torch.softmax(logits.float(), -1).topk(5)
    assert [list(t) for t in answers[0].top_ids] == top.indices.tolist()
    assert torch.allclose(torch.tensor(answers[0].top_probs), top.values, atol=1e-5)
    trained_looking(model)  # the cache answers for the same model, template, system and length
    again = anchor_answers(model, tokenizer, system=None, cache_dir=tmp_path, max_new_tokens=4, top_k=5,
                           log=lambda m: None)
    assert [a.answer_ids for a in again] == [a.answer_ids for a in answers]


@pytest.mark.parametrize("first_weight", [0.3, 0.0, 1.0])
def test_anchor_kl_equals_plain_transformers(tiny, tmp_path, first_weight):
    model, tokenizer = tiny
    answers = anchor_answers(model, tokenizer, system=None, cache_dir=tmp_path, max_new_tokens=5, top_k=4,
                             log=lambda m: None)[:3]
    trained_looking(model)
    samples = anchor_samples(answers)
    for shared in (False, True):
        got = anchor_kl(model, collate(samples, tokenizer.pad_token_id, shared_prefix=shared),
                        first_weight=first_weight)
        for r, a in enumerate(answers):
            with torch.no_grad():
                logits = model(torch.tensor([a.prompt_ids + a.answer_ids])).logits[0]
            logq = torch.log_softmax(logits, -1)
            total = weights = 0.0
            for j, (ids, probs) in enumerate(zip(a.top_ids, a.top_probs)):
                lq = logq[len(a.prompt_ids) + j - 1]
                rest = 1 - sum(probs)
                q_rest = 1 - sum(math.exp(lq[i]) for i in ids)
                kl = sum(p * math.log(p / math.exp(lq[i])) for i, p in zip(ids, probs) if p > 0)
                kl += rest * math.log(rest / q_rest) if rest > 0 else 0.0
                w = first_weight if j == 0 else 1.0  # the first answer token weighs first_weight
                total, weights = total + w * kl, weights + w
            assert got[r].item() == pytest.approx(total / weights, rel=1e-9)


def test_every_preference_loss_adds_the_weighted_anchor_term(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n"
                            for q, c, r in [("What is 2+2?", "4.", "5, I think."), ("Hi?", "Hello!", "Go away.")]))
    answers = anchor_answers(model, tokenizer, system=None, cache_dir=tmp_path, max_new_tokens=4, top_k=4,
                             log=lambda m: None)
    trained_looking(model)
    # the GPU's layout: the same batches through the packed layers (one packed row; on the CPU, reference attention)
    packed = prepare_for_training(copy.deepcopy(model), FastOptions(torch_compile=False, gradient_checkpointing=False))
    for kind in ("dpo", "orpo", "simpo", "cpo", "kto"):
        items = load_preference_data(DataArgs(dataset=[str(path)]), tokenizer, rlhf_type=kind, batch_size=2,
                                     log=lambda m: None).train
        every = 2 if kind == "kto" else 1
        attach_anchors(items, anchor_samples(answers), every=every)
        assert [x.anchor_weight for x in items] == [float(every) if i % every == 0 else 0.0 for i in range(len(items))]
        collate_fn, loss_fn = (collate_completions, completion_loss) if kind == "kto" else (collate_pairs, pair_loss)
        for item in items:
            item.ref_chosen = item.ref_rejected = item.ref = item.ref_kl = -30.0
        plain = collate_fn(items, tokenizer.pad_token_id, anchors=False)
        cfg = RlhfGroup(rlhf_type=kind, replay_kl=0.7)
        without = loss_fn(model, plain, cfg, fused=False)
        kl = anchor_kl(model, collate([x.anchor for x in items if x.anchor is not None], tokenizer.pad_token_id))
        assert len(kl) == len(items) // every
        want = without.loss_sum + 0.7 * every * kl.sum()
        # the anchor rows join the batch's forward as its last rows, whole (shared=False) or beside rows that run
        # their common start once (prefix_ids), which the anchor rows do not continue (prefix_rows False)
        for shared in (False, True):
            batch = collate_fn(items, tokenizer.pad_token_id, shared_prefix=shared)
            assert joined_anchor_rows(batch) == len(kl)
            assert ("prefix_ids" in batch) == shared
            if shared:
                rows = batch["input_ids"].shape[0] - len(kl)
                assert batch["prefix_rows"].tolist() == [True] * rows + [False] * len(kl)
            with_anchor = loss_fn(model, batch, cfg, fused=False)
            assert torch.allclose(with_anchor.loss_sum, want, rtol=1e-12), (kind, shared)
            assert with_anchor.n_tokens == without.n_tokens == len(items)
            for name, (total, n) in without.metrics.items():
                torch.testing.assert_close(with_anchor.metrics[name][0], total, rtol=1e-12, atol=1e-12)
            off = loss_fn(model, batch, RlhfGroup(rlhf_type=kind, replay_kl=0.0), fused=False)
            torch.testing.assert_close(off.loss_sum, without.loss_sum, rtol=1e-12, atol=1e-12)
            on_gpu_path = loss_fn(packed, batch, cfg, fused=True)
            torch.testing.assert_close(on_gpu_path.loss_sum, want, rtol=1e-9, atol=1e-9, msg=f"{kind} {shared}")


def test_anchor_prompts_are_apart_from_the_eval_and_the_general_prompts():
    anchor = load_anchor_prompts()
    assert len(anchor) == len(set(anchor)) >= 32
    assert not set(anchor) & {q["question"] for q in load_retention_questions()}
    assert not set(anchor) & {row["prompt"] for row in load_general_prompts()}


def test_replay_kl_flag_checks():
    assert {t: RlhfGroup(rlhf_type=t).replay_kl for t in ("dpo", "orpo", "simpo", "cpo", "kto", "grpo")} == {
        "dpo": 3.0, "orpo": 1.0, "simpo": 1.0, "cpo": 1.0, "kto": 1.0, "grpo": 0.0}
    assert RlhfGroup(rlhf_type="dpo", replay_kl=0.0).replay_kl == 0.0  # 0 turns the default off
    assert RlhfArgs(rlhf=RlhfGroup(rlhf_type="grpo")).rlhf.replay_kl == 0.0  # grpo: off, and accepted so
    with pytest.raises(UserError, match="--replay_kl must be >= 0"):
        RlhfGroup(rlhf_type="orpo", replay_kl=-1.0)
    with pytest.raises(UserError, match="--replay_kl"):
        RlhfArgs(rlhf=RlhfGroup(rlhf_type="grpo", replay_kl=0.5))
