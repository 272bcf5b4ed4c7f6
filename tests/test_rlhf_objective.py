"""The preference loss_fn: KTO's KL rows that are the completions themselves are not run twice."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.args import DataArgs, LoraArgs, RlhfGroup
from lorakit.data.packing import collate
from lorakit.rlhf.data import collate_completions, kl_is_own, load_preference_data
from lorakit.rlhf.objective import completion_loss
from lorakit.tuners import attach_tuner


def test_kto_batch_of_one_reuses_its_own_log_probs(tiny_qwen2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5, I think."}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    items = load_preference_data(DataArgs(dataset=[str(path)]), tokenizer, rlhf_type="kto", batch_size=1,
                                 log=lambda m: None).train
    assert len(items) == 2 and all(kl_is_own(x) for x in items)
    torch.manual_seed(0)
    model, _ = attach_tuner(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float64),
                            LoraArgs(lora_rank=4, lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter, so the policy differs from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    cfg = RlhfGroup(rlhf_type="kto")
    for item in items:
        item.ref = item.ref_kl = -100.0  # below the policy: a positive KL
        own = collate_completions([item], tokenizer.pad_token_id)
        assert not any(k.startswith("kl_") for k in own)
        explicit = own | {f"kl_{k}": v for k, v in collate([item.kl], tokenizer.pad_token_id).items()}
        outs, grads = [], []
        for batch in (own, explicit):
            model.zero_grad()
            out = completion_loss(model, batch, cfg, fused=False)
            out.loss_sum.backward()
            outs.append(out)
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        assert torch.equal(outs[0].loss_sum, outs[1].loss_sum)
        assert torch.equal(outs[0].metrics["kl"][0], outs[1].metrics["kl"][0]) and outs[0].metrics["kl"][0] > 0
        assert all(torch.equal(a, b) for a, b in zip(*grads))
