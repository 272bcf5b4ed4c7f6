"""Quantized base weights (QLoRA): the quantization flags -> a transformers BitsAndBytesConfig, the
quantized load, and the setup for training LoRA over the frozen 4/8-bit base.

What is quantized: every nn.Linear of the decoder (bitsandbytes Linear4bit / Linear8bitLt); the
embeddings, norms and output head stay in the compute dtype (transformers keeps the head
unquantized). Unlike PEFT's `prepare_model_for_kbit_training`, nothing is up-cast to fp32: the
embeddings and head of a 7B model would take 2.2 GB more in fp32 and gain nothing (they are frozen,
and lorakit's chunked loss computes the cross-entropy in fp32 from bf16 logits anyway). The LoRA
weights are fp32 (PEFT's default), so the optimizer updates full-precision masters.

The adapter is an ordinary PEFT adapter: args.json records the quantization (`quant`), so infer,
eval and deploy load the base as it was trained (`checkpoint_quant`), and export merges into the
full-precision base.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from lorakit.args import QuantArgs
from lorakit.errors import UserError

# Rows per chunk of the chunked loss on a quantized base: about 10 bytes x 256 x vocabulary (0.4 GB at
# Qwen2.5's 152k) instead of 1.5 GB at the default 1024; a QLoRA run is one that counts its gigabytes.
LOSS_CHUNK = 256


def compute_dtype(quant: QuantArgs, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """--bnb_4bit_compute_dtype, else the model's dtype; float32 on a CPU (no fast half arithmetic there)."""
    if quant.bnb_4bit_compute_dtype is None or device.type == "cpu":
        if quant.bnb_4bit_compute_dtype not in (None, "float32") and device.type == "cpu":
            print(f"notice: --bnb_4bit_compute_dtype {quant.bnb_4bit_compute_dtype} on CPU: computing in float32.",
                  file=sys.stderr)
        return model_dtype
    return getattr(torch, quant.bnb_4bit_compute_dtype)  # a name QuantArgs checked: bfloat16, float16, float32


def bnb_config(quant: QuantArgs, dtype: torch.dtype):
    """The transformers BitsAndBytesConfig the flags describe (dtype: the compute dtype)."""
    from transformers import BitsAndBytesConfig

    if quant.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=bool(quant.bnb_4bit_use_double_quant),
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def load_quantized(path: Path | str, quant: QuantArgs, *, dtype: torch.dtype, device: torch.device,
                   attn_impl: str = "sdpa"):
    """Load a causal LM from a local folder with its linear layers quantized on the way in."""
    from transformers import AutoModelForCausalLM

    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--quant_bits {quant.quant_bits} on {device.type}: bitsandbytes quantizes on CUDA GPUs "
                        f"and CPUs; use --device cuda or cpu, or drop --quant_bits.")
    config = bnb_config(quant, compute_dtype(quant, dtype, device))
    with warnings.catch_warnings():
        # 8-bit on a CPU: bitsandbytes notes once per layer that it casts inputs to fp16 for the int8 matmul
        warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_impl,
                                                         quantization_config=config, device_map={"": str(device)})
        except (OSError, ValueError) as exc:
            raise UserError(f"Could not load the model from {path} quantized to {quant.quant_bits} bits: {exc}") from exc
    keep_trainable_layout(model)
    return model


def keep_trainable_layout(model) -> None:
    """Stop bitsandbytes re-packing CPU 4-bit weights for its bf16 inference kernel.

    It does so on the first eval-mode forward without gradients, and that kernel has no backward:
    training afterwards (sft after --replay's generation) silently loses every gradient through the
    base weights. The plain layout also keeps CPU outputs in fp32, identical before and after a reload.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_kbit_training(model) -> Any:
    """Freeze the quantized base for LoRA training, keeping every unquantized weight in its own dtype.

    PEFT's prepare_model_for_kbit_training also up-casts embeddings, norms and head to fp32 and turns on
    reentrant gradient checkpointing with input gradients; lorakit's loop needs neither (its
    checkpointing is non-reentrant, and the loss runs in fp32 from half-precision logits).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


def is_quantized(model) -> bool:
    """True when a (PEFT-wrapped or plain) model holds bitsandbytes-quantized layers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def describe(quant: QuantArgs, dtype: torch.dtype) -> str:
    """'4-bit nf4 (double quant, bfloat16 compute)' / '8-bit (LLM.int8)'."""
    if quant.quant_bits == 8:
        return "8-bit (bitsandbytes LLM.int8)"
    double = "double quant" if quant.bnb_4bit_use_double_quant else "no double quant"
    return f"4-bit {quant.bnb_4bit_quant_type} ({double}, {str(dtype).removeprefix('torch.')} compute)"


def training_line(model, quant: QuantArgs, device: torch.device, *, fused_lora: bool) -> str:
    """One line for the start of a QLoRA run: the quantization, what stays unquantized, how LoRA computes
    (the fast-paths line beside it counts the fused layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings().weight.dtype
    dtype = compute_dtype(quant, head, device)
    if device.type != "cuda":
        how = f"LoRA through PEFT's bitsandbytes layers on {device.type} (the reference path)"
    elif quant.quant_bits == 8 or not fused_lora:
        why = "the fused path is 4-bit only" if quant.quant_bits == 8 else "--fused_lora false"
        how = f"LoRA through PEFT's bitsandbytes layers ({why})"
    else:
        how = "LoRA fused over each weight de-quantized on the fly (never kept), forward and backward"
    return (f"quantized base: {describe(quant, dtype)} by bitsandbytes; embeddings, norms and head stay "
            f"{str(head).removeprefix('torch.')} (no fp32 up-cast); {how}; loss in {LOSS_CHUNK}-row chunks")


def quant_from_saved(saved: dict[str, Any]) -> QuantArgs | None:
    """The quantization an args.json records (None: trained on a full-precision base)."""
    group = saved.get("quant") or {}
    if not group.get("quant_bits"):
        return None
    fields = ("quant_method", "quant_bits", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
    values = {k: group.get(k) for k in fields}
    if values["quant_bits"] != 4:  # 8-bit runs record the (unused) 4-bit defaults as None
        values.update(bnb_4bit_quant_type=None, bnb_4bit_use_double_quant=None, bnb_4bit_compute_dtype=None)
    return QuantArgs(**values)


def checkpoint_quant(flags: QuantArgs | None, saved: dict[str, Any], *, full_precision: bool = False) -> QuantArgs | None:
    """The quantization to load a checkpoint's base with: none when `full_precision`, else the command's
    --quant_* flags when given, else what its args.json records (a QLoRA base loads as it was trained)."""
    if full_precision:
        return None
    if flags is not None and flags.enabled:
        return flags
    return quant_from_saved(saved)


def base_note(checkpoint_name: str, quant: QuantArgs, *, from_flags: bool) -> str:
    """The line saying a checkpoint's base loads quantized, and why."""
    why = f"as --quant_bits {quant.quant_bits} asks" if from_flags else "as it was trained (its args.json)"
    return (f"note: the base of {checkpoint_name} loads {quant.quant_bits}-bit, {why}; --full_precision_base true "
            f"loads it unquantized, and --merge_lora true merges into the full-precision base.")
