"""The loop's pure parts: schedule, data plan, gradient accumulation; and seeded runs repeat exactly."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.args import DataArgs, FastOptions, LoraArgs, ModelArgs, SftArgs, TrainArgs
from lorakit.data.packing import collate
from lorakit.data.render import Rendered
from lorakit.schedule import lr_factor, plan_steps, warmup_steps_for
from lorakit.loop import accumulate_gradients
from lorakit.loss import count_loss_tokens
from lorakit.train import train


def test_schedule_warmup_then_decay():
    assert warmup_steps_for(100, warmup_ratio=0.05) == 5
    assert warmup_steps_for(100, warmup_steps=3, warmup_ratio=0.5) == 3
    f = [lr_factor(s, total_steps=10, warmup=2, kind="cosine") for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == 1.0
    assert all(a > b for a, b in zip(f[2:], f[3:]))  # strictly falling after warm-up
    assert f[6] == pytest.approx(0.5)  # half-way through the 8 decay steps
    assert lr_factor(6, total_steps=10, warmup=2, kind="linear") == pytest.approx(0.5)
    assert lr_factor(9, total_steps=10, warmup=2, kind="constant") == 1.0


def test_plan_sees_every_sample_once_per_epoch_in_a_seeded_order():
    plan = plan_steps(10, batch_size=2, grad_accum=2, epochs=2, max_steps=-1, seed=7)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 6)
    epoch0 = [i for step in range(3) for mb in plan.micro_batches(step) for i in mb]
    epoch1 = [i for step in range(3, 6) for mb in plan.micro_batches(step) for i in mb]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # reshuffled each epoch
    assert [len(mb) for mb in plan.micro_batches(2)] == [2]  # the epoch's last step takes what is left
    assert plan.micro_batches(4) == plan_steps(10, batch_size=2, grad_accum=2, epochs=2, max_steps=-1, seed=7).micro_batches(4)
    assert plan_steps(10, batch_size=2, grad_accum=2, epochs=2, max_steps=4, seed=7).total_steps == 4
    assert plan_steps(10, batch_size=1, grad_accum=1, epochs=0.5, max_steps=-1, seed=7).total_steps == 5


def test_group_by_length_batches_similar_lengths_and_still_sees_every_sample_once():
    lengths = [(i * 37) % 101 + 10 for i in range(203)]  # 203 samples: 50 full batches of 4 and one of 3
    kwargs = dict(batch_size=4, grad_accum=1, epochs=2, max_steps=-1, seed=3)
    grouped, plain = plan_steps(203, **kwargs, lengths=lengths), plan_steps(203, **kwargs)

    def epoch(plan, e):
        return [mb for step in range(e * 51, (e + 1) * 51) for mb in plan.micro_batches(step)]

    def padding(batches):
        return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb) for mb in batches)

    for e in (0, 1):
        batches = epoch(grouped, e)
        assert sorted(i for mb in batches for i in mb) == list(range(203))
        assert [len(mb) for mb in batches] == [4] * 50 + [3]  # the short batch stays last
        assert padding(batches) < padding(epoch(plain, e)) / 5
    assert epoch(grouped, 0) != epoch(grouped, 1)  # reshuffled each epoch
    firsts = [max(lengths[i] for i in mb) for mb in epoch(grouped, 0)[:16]]
    assert firsts != sorted(firsts, reverse=True)  # batches are not served longest-first
    assert epoch(grouped, 1) == epoch(plan_steps(203, **kwargs, lengths=lengths), 1)  # a pure function of the seed
    saved = json.loads(json.dumps(grouped.data_order()))  # as a checkpoint stores it: a resume compares equal
    assert saved == grouped.data_order() and saved["group_by_length"] and "lengths" not in saved
    assert saved != plain.data_order()


def _samples():
    lengths = [5, 9, 7, 12]
    out = []
    for n, length in enumerate(lengths):
        ids = [(37 * n + 11 * t) % 5000 + 10 for t in range(length)]
        labels = [-100] * (length // 2) + ids[length // 2 :]  # prompt masked, different loss tokens per row
        out.append(Rendered(input_ids=ids, labels=labels))
    return out


def _grads(model, split, normalise_per_micro_batch=False):
    from lorakit.loss import causal_lm_loss

    model.zero_grad(set_to_none=True)
    samples = _samples()
    batches = [collate(samples[i : i + split], 0) for i in range(0, 4, split)]
    if normalise_per_micro_batch:  # the common mistake: mean per micro-batch, then mean of means
        for b in batches:
            out = causal_lm_loss(model, b)
            (out.loss_sum / out.n_tokens / len(batches)).backward()
    else:
        loss, n_tokens = accumulate_gradients(model, batches, causal_lm_loss)
        assert n_tokens == sum(count_loss_tokens(b) for b in batches) == 3 + 5 + 4 + 6
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulated_gradients_do_not_depend_on_the_micro_batch_split(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    from lorakit.tuners import attach_tuner

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    model, _ = attach_tuner(base, LoraArgs(lora_rank=4, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.train()
    whole, halves, singles = _grads(model, 4), _grads(model, 2), _grads(model, 1)
    naive = _grads(model, 1, normalise_per_micro_batch=True)

    def rel_error(grads):  # worst relative error over parameter tensors
        return max(float((grads[n] - whole[n]).norm() / whole[n].norm()) for n in whole)

    assert rel_error(halves) < 1e-5 and rel_error(singles) < 1e-5
    assert rel_error(naive) > 1e-2  # the test can tell right from wrong normalisation


def _write_rows(path, n=6):
    rows = [{"query": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def _args(model_dir, data, out, **train):
    settings = dict(output_dir=str(out), max_steps=3, logging_steps=1, save_steps=100, learning_rate=1e-3,
                    per_device_train_batch_size=2, report_to=["none"])
    settings.update(train)
    return SftArgs(model=ModelArgs(model=str(model_dir)), data=DataArgs(dataset=[str(data)], data_cache=False),
                   lora=LoraArgs(lora_rank=4), train=TrainArgs(**settings))


def test_same_seed_same_losses_and_in_memory_model_matches_checkpoint(tiny_qwen2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _write_rows(tmp_path / "rows.json")
    first = train(_args(tiny_qwen2_dir, data, tmp_path / "a"))
    second = train(_args(tiny_qwen2_dir, data, tmp_path / "b"))
    losses = [r["loss"] for r in first.log_history if "loss" in r]
    assert len(losses) == 3 and losses == [r["loss"] for r in second.log_history if "loss" in r]
    other_seed = _args(tiny_qwen2_dir, data, tmp_path / "c", max_steps=1)
    other_seed.data.seed = 1
    assert [r["loss"] for r in train(other_seed).log_history if "loss" in r] != losses[:1]
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 16, 5519, 30, 151645]])
    with torch.no_grad():
        in_memory = first.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, str(first.last_checkpoint)).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, in_memory)


def test_short_run_warning(capsys):
    from lorakit.run_advice import warn_if_short

    args = SftArgs(train=TrainArgs(gradient_accumulation_steps=16, num_train_epochs=3))
    warn_if_short(plan_steps(64, batch_size=1, grad_accum=16, epochs=3, max_steps=-1, seed=0), args)
    err = capsys.readouterr().err
    assert "only 12 optimizer steps" in err and "--gradient_accumulation_steps" in err
    warn_if_short(plan_steps(640, batch_size=1, grad_accum=16, epochs=3, max_steps=-1, seed=0), args)
    assert capsys.readouterr().err == ""


def test_replay_adds_cached_distillation_samples(tiny_qwen2_dir, tmp_path, monkeypatch):
    """--replay N: the base's answers to N built-in prompts are generated (cached) and trained on, every
    answer token with the base's distribution as its target; the run records the replay settings."""
    import lorakit.model
    from lorakit.replay import replay_samples

    monkeypatch.setattr(lorakit.model, "CACHE_DIR", tmp_path / "cache")
    data = _write_rows(tmp_path / "rows.json", n=2)
    result = train(_args(tiny_qwen2_dir, data, tmp_path / "run", replay=6, replay_max_new_tokens=6, max_steps=4))
    assert result.steps == 4
    saved = json.loads((result.run_dir / "args.json").read_text())
    assert saved["train"]["replay"] == 6 and saved["train"]["replay_max_new_tokens"] == 6
    cached = list((tmp_path / "cache" / "replay").glob("replay-6-*.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 6
    from lorakit.model import load_model, load_tokenizer

    model, tok = load_model(tiny_qwen2_dir, device="cpu"), load_tokenizer(tiny_qwen2_dir)
    samples = replay_samples(model, tok, 6, system=None, cache_dir=tmp_path / "cache" / "replay", max_new_tokens=6)
    assert all(s.teacher and len(s.teacher) == s.num_loss_tokens for s in samples)


def test_training_starts_by_saying_which_fast_paths_run(tiny_qwen2_dir, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.train import prepare_model

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    args = SftArgs(lora=LoraArgs(lora_rank=4), fast=FastOptions(fused_loss=False))
    capsys.readouterr()
    prepare_model(model, args, torch.device("cpu"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[0] == ("fast paths: chunked loss off (--fused_loss false); fused LoRA, packed attention and "
                        "torch.compile are GPU paths, off on cpu (this run computes the plain reference)")
    assert lines[1].startswith("trainable parameters: ")
