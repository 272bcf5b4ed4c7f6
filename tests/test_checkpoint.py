"""checkpoint: atomic saves, self-contained folders, PEFT-compatible adapters, run folder -> last checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.args import LoraArgs
from lorakit.checkpoint import (
    TrainState,
    best_checkpoint,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_train_state,
    load_weights_into,
    prune_checkpoints,
    save_checkpoint,
)
from lorakit.errors import UserError
from lorakit.tuners import attach_tuner


def _base(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)


def _trained_lora(tiny_qwen2_dir, **lora):
    torch.manual_seed(1)
    model, _ = attach_tuner(_base(tiny_qwen2_dir), LoraArgs(lora_rank=4, **lora))
    with torch.no_grad():  # LoRA B starts at zero; give it values so the adapter changes the logits
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645]])


@pytest.fixture
def tokenizer(tiny_qwen2_dir):
    from lorakit.model import load_tokenizer

    return load_tokenizer(tiny_qwen2_dir)


def test_lora_checkpoint_is_self_contained_and_peft_loads_it(tiny_qwen2_dir, tokenizer, tmp_path):
    from peft import PeftModel

    model = _trained_lora(tiny_qwen2_dir)
    args = {"model_path": str(tiny_qwen2_dir), "system": "Be brief."}
    state = TrainState(step=3, epoch=1.5, total_steps=6, eval_loss=1.25, optimizer={"x": torch.ones(2)}, rng={"a": 1})
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint-3", model=model, tokenizer=tokenizer, args=args, train_state=state)
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "args.json", "trainer_state.json",
            "optimizer.pt", "rng_state.pt", "tokenizer_config.json"} <= names
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary folder left
    expected = _logits(model, IDS)
    assert not torch.allclose(expected, _logits(_base(tiny_qwen2_dir), IDS))  # the adapter matters
    via_peft = PeftModel.from_pretrained(_base(tiny_qwen2_dir), str(ckpt)).eval()
    assert torch.equal(_logits(via_peft, IDS), expected)
    loaded = load_checkpoint(tmp_path / "run")  # a run folder means its last checkpoint
    assert loaded.path == ckpt and loaded.args["system"] == "Be brief."
    assert torch.equal(_logits(loaded.model, IDS), expected)
    assert loaded.tokenizer.chat_template == tokenizer.chat_template
    merged = load_checkpoint(ckpt, merge_lora=True).model
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(_logits(merged, IDS), expected, atol=1e-4)
    resumed = load_train_state(ckpt)
    assert (resumed.step, resumed.eval_loss, resumed.rng) == (3, 1.25, {"a": 1})
    assert torch.equal(resumed.optimizer["x"], torch.ones(2))


def test_load_weights_into_fresh_adapter_and_full(tiny_qwen2_dir, tokenizer, tmp_path):
    model = _trained_lora(tiny_qwen2_dir, modules_to_save=["lm_head"])
    ckpt = save_checkpoint(tmp_path / "checkpoint-1", model=model, tokenizer=tokenizer, args={})
    fresh, _ = attach_tuner(_base(tiny_qwen2_dir), LoraArgs(lora_rank=4, modules_to_save=["lm_head"]))
    load_weights_into(fresh, ckpt)
    assert torch.equal(_logits(fresh.eval(), IDS), _logits(model, IDS))
    full = _base(tiny_qwen2_dir)
    with torch.no_grad():
        full.model.norm.weight.mul_(1.5)
    full_ckpt = save_checkpoint(tmp_path / "full" / "checkpoint-2", model=full, tokenizer=tokenizer, args={})
    assert (full_ckpt / "config.json").is_file() and list(full_ckpt.glob("*.safetensors"))
    other = _base(tiny_qwen2_dir)
    load_weights_into(other, full_ckpt)
    assert torch.equal(_logits(other.eval(), IDS), _logits(full.eval(), IDS))
    assert torch.equal(_logits(load_checkpoint(full_ckpt).model, IDS), _logits(full, IDS))
    with pytest.raises(UserError, match="exactly"):
        load_train_state(full_ckpt)  # saved without training state


def test_not_a_checkpoint_names_missing_file_and_lists_checkpoints(tmp_path):
    run = tmp_path / "v0-run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "README.md").write_text("half a checkpoint")
    with pytest.raises(UserError) as err:
        find_checkpoint(run)
    assert "adapter_config.json" in str(err.value) and "checkpoint-5" in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")


def _fake_checkpoint(run, step, eval_loss):
    c = run / f"checkpoint-{step}"
    c.mkdir(parents=True)
    (c / "adapter_config.json").write_text("{}")
    (c / "trainer_state.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
    return c


def test_prune_keeps_newest_and_best(tmp_path):
    run = tmp_path / "run"
    for step, loss in [(10, 2.0), (20, 0.5), (30, 1.0), (40, 1.5), (50, 1.7)]:
        _fake_checkpoint(run, step, loss)
    (run / ".checkpoint-60.tmp-123").mkdir()  # a save killed half-way is never listed
    assert [c.name for c in list_checkpoints(run)] == [f"checkpoint-{s}" for s in (10, 20, 30, 40, 50)]
    assert best_checkpoint(run).name == "checkpoint-20"
    removed = prune_checkpoints(run, keep=2)
    assert sorted(c.name for c in removed) == ["checkpoint-10", "checkpoint-30"]
    assert [c.name for c in list_checkpoints(run)] == ["checkpoint-20", "checkpoint-40", "checkpoint-50"]
    assert find_checkpoint(run).name == "checkpoint-50"
    assert find_checkpoint(tmp_path).name == "checkpoint-50"  # an output folder: its newest run
