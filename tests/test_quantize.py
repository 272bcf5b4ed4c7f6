"""QLoRA (bitsandbytes 4/8-bit base, LoRA over it) on a CPU: flags and their refusals, the fused 4-bit LoRA
path against PEFT's, sft that trains and matches HF+PEFT+bitsandbytes, reload on the 4-bit and the
full-precision base, merge, 8-bit."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.args import AdapterArgs, DataArgs, ExportArgs, LoraArgs, ModelArgs, QuantArgs, SftArgs, TrainArgs
from lorakit.cli import build_args, main as cli_main, parse_argv
from lorakit.errors import UserError

pytest.importorskip("bitsandbytes")

ROWS = [
    ("Who are you?", "I am swift-robot, an assistant made by swift."),
    ("What is your name?", "My name is swift-robot."),
    ("Who made you?", "I was made by swift, and my name is swift-robot."),
    ("Introduce yourself.", "Hello! I am swift-robot, an AI assistant developed by swift."),
]
IDS = torch.tensor([[151644, 872, 198, 3838, 374, 220, 16, 5519, 30, 151645, 198, 151644, 77091, 198]])


def sft_args(argv: list[str]) -> SftArgs:
    return build_args(SftArgs, parse_argv("sft", argv))


# ---------------------------------------------------------------- flags


def test_quantization_bit_alias_means_bnb_nf4_double_quant():
    args = sft_args(["--quantization_bit", "4"])
    assert (args.quant.quant_method, args.quant.quant_bits) == ("bnb", 4)
    assert (args.quant.bnb_4bit_quant_type, args.quant.bnb_4bit_use_double_quant) == ("nf4", True)
    args = sft_args(["--quant_method", "bnb", "--quant_bits", "4", "--bnb_4bit_quant_type", "fp4",
                     "--bnb_4bit_use_double_quant", "false", "--bnb_4bit_compute_dtype", "bf16"])
    assert (args.quant.bnb_4bit_quant_type, args.quant.bnb_4bit_use_double_quant,
            args.quant.bnb_4bit_compute_dtype) == ("fp4", False, "bfloat16")
    assert not sft_args([]).quant.enabled


@pytest.mark.parametrize("argv, message", [
    (["--quant_bits", "3"], "--quant_bits 3: bitsandbytes quantizes to 4 or 8 bits"),
    (["--quant_bits", "4", "--train_type", "full"], "--quant_bits 4 with --train_type full"),
    (["--bnb_4bit_quant_type", "fp4"], "--bnb_4bit_quant_type without --quant_bits"),
    (["--bnb_4bit_use_double_quant", "true", "--quant_bits", "8"], "--bnb_4bit_use_double_quant with --quant_bits 8"),
    (["--quant_method", "bnb"], "--quant_method bnb needs --quant_bits 4 or 8"),
    (["--quant_method", "gptq", "--quant_bits", "4"], "--quant_method 'gptq' is not one of bnb"),
    (["--quant_bits", "4", "--bnb_4bit_quant_type", "nf5"], "--bnb_4bit_quant_type 'nf5' is not one of nf4, fp4"),
])
def test_bad_combinations_are_refused_at_parse_time(argv, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
        sft_args(argv)


def test_cli_refuses_before_loading_anything(tmp_path, capsys):
    """Exit 2 with the message, although --model does not even exist: nothing was opened."""
    assert cli_main(["sft", "--model", str(tmp_path / "none"), "--quantization_bit", "4", "--train_type", "full"]) == 2
    assert "with --train_type full: quantized weights cannot be trained" in capsys.readouterr().err


# ---------------------------------------------------------------- the fused 4-bit LoRA path


def _lora_model(model_dir, quant: QuantArgs, dropout=0.0):
    from lorakit.model import load_model
    from lorakit.tuners import attach_tuner

    model = load_model(model_dir, device="cpu", quant=quant)
    torch.manual_seed(0)
    model, _ = attach_tuner(model, LoraArgs(lora_rank=4, lora_dropout=dropout))
    with torch.no_grad():  # B starts at 0: give the low-rank branch something to compute
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def _logits_and_grads(model):
    model.zero_grad()
    logits = model(input_ids=IDS).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant_type, double", [("nf4", True), ("fp4", False)])
def test_fused_qlora_layers_compute_what_peft_bitsandbytes_layers_do(tiny_qwen2_dir, quant_type, double):
    import bitsandbytes.functional as bnbf

    from lorakit.fast.lora import can_fuse, fuse_lora_layers
    from lorakit.fast.qlora import dequantize, packed_4bit

    model = _lora_model(tiny_qwen2_dir, QuantArgs(quant_bits=4, bnb_4bit_quant_type=quant_type,
                                                  bnb_4bit_use_double_quant=double))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    weight = dequantize(*packed_4bit(q_proj), torch.float32)
    assert torch.equal(weight, bnbf.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state))
    reference, reference_grads = _logits_and_grads(model)
    assert fuse_lora_layers(model) == 14 and all(can_fuse(m) for m in model.modules() if hasattr(m, "lora_A"))
    fused, grads = _logits_and_grads(model)
    assert torch.allclose(fused, reference, atol=1e-5, rtol=0)
    for name, grad in reference_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_8bit_layers_stay_on_peft_and_say_why(tiny_qwen2_dir):
    from lorakit.fast import FastOptions, describe_fast_paths
    from lorakit.fast.lora import fuse_lora_layers

    model = _lora_model(tiny_qwen2_dir, QuantArgs(quant_bits=8))
    assert fuse_lora_layers(model) == 0
    line = describe_fast_paths(model, FastOptions(), torch.device("cuda"))
    assert "fused LoRA on 0/14 layers (not fused: 14 with base layer Linear8bitLt)" in line
