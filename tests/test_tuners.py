"""tuners: all-linear means every linear layer but the head; unknown names fail with the model's names."""

from __future__ import annotations

import pytest
import torch

from lorakit.args import LoraArgs
from lorakit.errors import UserError
from lorakit.tuners import attach_tuner, linear_module_names


@pytest.fixture
def tiny_model(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)


def test_all_linear_is_every_linear_but_the_head(tiny_model):
    assert linear_module_names(tiny_model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    model, summary = attach_tuner(tiny_model, LoraArgs(lora_rank=4))
    lora_a = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == 2 * 7  # 2 layers x 7 linear layers
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    # r=4 on 7 linears of 2 layers: A is r x in, B is out x r
    h, i, kv = 64, 128, 32
    per_layer = 4 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    assert summary.trainable == 2 * per_layer
    assert "0.0" in summary.line() and "q_proj" in summary.line()


def test_unknown_target_lists_module_names(tiny_model):
    with pytest.raises(UserError) as err:
        attach_tuner(tiny_model, LoraArgs(target_modules=["q_proj", "query_key_value"]))
    message = str(err.value)
    assert "query_key_value" in message and "q_proj" in message and "down_proj" in message
    assert "--target_modules" in message


def test_explicit_targets_rslora_dora_modules_to_save(tiny_model):
    args = LoraArgs(target_modules=["q_proj", "v_proj"], use_rslora=True, use_dora=True, modules_to_save=["lm_head"])
    model, summary = attach_tuner(tiny_model, args)
    config = model.peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.use_rslora and config.use_dora
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n and "modules_to_save" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable)
    assert not any("k_proj" in n for n in trainable)
    with pytest.raises(UserError, match="--modules_to_save"):
        attach_tuner(type(tiny_model)(tiny_model.config), LoraArgs(modules_to_save=["score_head"]))


def test_full_trains_everything(tiny_model):
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    model, summary = attach_tuner(tiny_model, LoraArgs(train_type="full"))
    assert model is tiny_model
    assert summary.trainable == summary.total == sum(p.numel() for p in tiny_model.parameters())


def test_layers_to_transform_puts_lora_only_there_and_backward_stops_below(tiny_model):
    n = tiny_model.config.num_hidden_layers
    model, _ = attach_tuner(tiny_model, LoraArgs(layers_to_transform=[n - 1]))
    adapted = {name.split(".layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {str(n - 1)}
    seen = []
    model.get_base_model().model.layers[0].register_full_backward_hook(lambda *a: seen.append(0))
    model.get_base_model().model.layers[n - 1].register_full_backward_hook(lambda *a: seen.append(n - 1))
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [n - 1]  # no gradient flows into the frozen layers below the adapted one


def test_layers_to_transform_out_of_range_is_a_user_error(tiny_model):
    with pytest.raises(UserError, match="layers 0.."):
        attach_tuner(tiny_model, LoraArgs(layers_to_transform=[99]))
