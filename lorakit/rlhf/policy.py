"""The policy rlhf trains: a fresh LoRA on --model, or the --adapters SFT adapter continued (it is also the
reference), its tokenizer, and the GPU fast paths sft uses. Shared by the preference types and GRPO."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.args import RlhfArgs
from lorakit.checkpoint import find_checkpoint
from lorakit.data.render import set_chat_template
from lorakit.errors import UserError
from lorakit.fast import prepare_for_training
from lorakit.loader import SavedArgs, saved_args, trained_on
from lorakit.model import load_tokenizer, resolve_model_path
from lorakit.tuners import attach_tuner, summarize


@dataclass
class StartingPolicy:
    """Where training starts: the base model, and the SFT adapter continued (None: a fresh LoRA)."""

    model_path: Path
    adapter: Path | None
    adapter_args: SavedArgs
    "The SFT checkpoint's args.json (empty without --adapters)."


def starting_policy(args: RlhfArgs) -> StartingPolicy:
    """Resolve --adapters (an SFT checkpoint or run folder) and the base model under it (or --model)."""
    adapters = args.rlhf.adapters
    if len(adapters) > 1:
        raise UserError(f"--adapters: rlhf continues one SFT checkpoint, got {len(adapters)}: {' '.join(adapters)}")
    if not adapters:
        return StartingPolicy(resolve_model_path(args.model.model, use_hf=args.model.use_hf,
                                                 gguf_file=args.model.gguf_file), None, SavedArgs())
    ckpt = find_checkpoint(adapters[0])
    if not (ckpt / "adapter_config.json").is_file():
        raise UserError(f"--adapters {adapters[0]}: {ckpt} holds full weights, not a LoRA adapter; pass it as "
                        f"--model to preference-train it (a fresh LoRA on top), or give an adapter checkpoint.")
    if args.lora.train_type != "lora":
        raise UserError("--adapters continues a LoRA adapter: use --train_type lora (the default).")
    base = args.model.model or trained_on(ckpt)
    if not base:
        raise UserError(f"--adapters {ckpt}: its args.json names no base model; pass --model.")
    return StartingPolicy(resolve_model_path(base, use_hf=args.model.use_hf, gguf_file=args.model.gguf_file), ckpt,
                          saved_args(ckpt))


def load_policy_tokenizer(start: StartingPolicy, args: RlhfArgs):
    """The adapter's own tokenizer (its chat template as SFT trained it), else the base model's; --template applies."""
    source = start.adapter if start.adapter and (start.adapter / "tokenizer_config.json").is_file() else start.model_path
    tokenizer = load_tokenizer(source)
    set_chat_template(tokenizer, args.model.template)
    return tokenizer


def attach_policy(model, start: StartingPolicy, args: RlhfArgs):
    """The model to train: the SFT adapter loaded trainable, or a fresh tuner as sft attaches it."""
    if start.adapter is None:
        return attach_tuner(model, args.lora)
    from peft import PeftModel  # lazy: peft imports bitsandbytes, which warns on import

    peft_model = PeftModel.from_pretrained(model, str(start.adapter), is_trainable=True)
    return peft_model, summarize(peft_model, sorted(peft_model.peft_config["default"].target_modules))


def prepare_policy(model, start: StartingPolicy, args: RlhfArgs, device: torch.device):
    """Attach the policy's adapter, then the same GPU fast paths as sft (plain computation on the CPU)."""
    model.config.use_cache = False
    if device.type != "cuda" and args.fast.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, summary = attach_policy(model, start, args)
    if device.type == "cuda":
        model = prepare_for_training(model, args.fast)
    start_note = f"continuing the SFT adapter {start.adapter}" if start.adapter else "a fresh LoRA on the base model"
    print(f"{summary.line()}\nstarting policy and reference: {start_note}", file=sys.stderr)
    return model
