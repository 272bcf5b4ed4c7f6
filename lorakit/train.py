"""`lorakit sft`: set up the model and the training data, then hand both to the loop (lorakit.loop).

train() = resolve the model -> tokenizer -> data summary (before any weights load) -> weights ->
replay rows (the base's own answers, while the weights are still the base's) -> tuner (LoRA or full,
GPU fast paths) -> lorakit.loop.fit -> summary.
"""

from __future__ import annotations

import random
import sys
import functools
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lorakit.model as model_lib
from lorakit import __version__, distributed
from lorakit.args import SftArgs
from lorakit.data.check import format_report
from lorakit.data.loading import TrainData, build_datasets
from lorakit.data.packing import collate
from lorakit.data.render import Rendered, set_chat_template
from lorakit.errors import UserError
from lorakit.fast import describe_fast_paths, prepare_for_training
from lorakit.loop import default_learning_rate, fit, start_run
from lorakit.loss import causal_lm_loss
from lorakit.model import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path
from lorakit.quantize import LOSS_CHUNK, prepare_kbit_training, training_line
from lorakit.replay import replay_samples
from lorakit.run_state import LossFn, TrainResult
from lorakit.tuners import attach_tuner, check_lora_flags


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (LoRA init, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def resolved_args(args: SftArgs, *, model_path: Path, tokenizer, system: str | None, device: torch.device,
                  dtype: torch.dtype, learning_rate: float) -> dict[str, Any]:
    """args.json: every flag group plus what it resolved to (absolute model path, template, system, lr)."""
    out = asdict(args)
    out["model"]["model"] = str(model_path)
    out["train"]["learning_rate"] = learning_rate
    out["train"]["output_dir"] = str(Path(args.train.output_dir).expanduser().resolve())
    out.update(
        model_path=str(model_path),
        train_type=args.lora.train_type,
        template=args.model.template or "tokenizer",
        chat_template=getattr(tokenizer, "chat_template", None),
        system=system,
        model_name=list(args.data.model_name),
        model_author=list(args.data.model_author),
        torch_dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        lorakit_version=__version__,
    )
    return out


def load_data(args: SftArgs, tokenizer) -> TrainData:
    """Render the datasets and print the check-data summary; a dataset with zero rows is an error."""
    data = build_datasets(args.data, tokenizer, use_hf=args.model.use_hf, template=args.model.template)
    print(format_report(data, tokenizer, data_args=args.data), file=sys.stderr)
    return data


def build_replay(args: SftArgs, model, tokenizer, system: str | None) -> list[Rendered]:
    """--replay N: the base model's answers to N built-in prompts, with its distributions (cached per model)."""
    return replay_samples(model, tokenizer, args.train.replay, system=system,
                          cache_dir=model_lib.CACHE_DIR / "replay", max_new_tokens=args.train.replay_max_new_tokens,
                          weight=args.train.replay_weight, weight_zh=args.train.replay_weight_zh)


def add_replay(args: SftArgs, data: TrainData, samples: list[Rendered]) -> TrainData:
    """The training data with the replay samples that fit --max_length added."""
    samples = [s for s in samples if len(s.input_ids) <= args.data.max_length]
    tokens = sum(len(s.input_ids) for s in samples)
    print(f"replay: {len(samples)} samples ({tokens} tokens) of the base model's answers, learned as its "
          f"distributions; {len(data.train) + len(samples)} training samples in all", file=sys.stderr)
    return replace(data, train=data.train + samples)


def prepare_model(model, args: SftArgs, device: torch.device):
    """Attach the tuner, then GPU fast paths (or plain gradient checkpointing); prints the trainable share."""
    opts = args.fast
    model.config.use_cache = False
    if args.quant.enabled:
        model = prepare_kbit_training(model)
    if device.type == "cuda":
        model, summary = attach_tuner(model, args.lora)
        print(describe_fast_paths(model, opts, device), file=sys.stderr)
        model = prepare_for_training(model, opts)
    else:  # CPU/MPS: the plain reference computation
        if opts.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model, summary = attach_tuner(model, args.lora)
        print(describe_fast_paths(model, opts, device), file=sys.stderr)
    print(summary.line(), file=sys.stderr)
    if args.quant.enabled:
        print(training_line(model, args.quant, device, fused_lora=args.fast.fused_lora), file=sys.stderr)
    return model


def make_loss_fn(device: torch.device, args: SftArgs) -> LossFn:
    """causal_lm_loss with the chunked head+CE (same value; far less memory, and the head skips every
    position without a target: 10% of a CPU step on SmolLM2 chat rows). --fused_loss false: plain."""
    fused = args.fast.fused_loss
    chunk = LOSS_CHUNK if args.quant.enabled else 1024
    return lambda model, batch: causal_lm_loss(model, batch, fused=fused, chunk_size=chunk)


def train(args: SftArgs, *, replay: list[Rendered] | None = None,
          env: distributed.DistEnv | None = None) -> TrainResult:
    """Fine-tune as `args` says; returns where the checkpoints are, the final losses and the trained model.

    `replay`: replay samples the caller already built from the base model (quickstart holds it loaded);
    None: built here when --replay N > 0. `env`: this process's place among several
    (lorakit.distributed.start); None: one process.
    """
    started = time.perf_counter()
    env = env or distributed.DistEnv(device=pick_device(args.model.device))
    device = env.device
    dtype = pick_dtype(args.model.torch_dtype, device)
    model_path = resolve_model_path(args.model.model, use_hf=args.model.use_hf, gguf_file=args.model.gguf_file)
    tokenizer = load_tokenizer(model_path)
    set_chat_template(tokenizer, args.model.template)
    check_lora_flags(model_path, args.lora)
    data = load_data(args, tokenizer)  # before any weights load: a data mistake costs seconds, not minutes
    if args.train.eval_steps and not data.val:
        print(f"note: --eval_steps {args.train.eval_steps} changes nothing: there are no validation rows "
              f"(add --val_dataset, or --split_dataset_ratio 0.05).", file=sys.stderr)
    if args.train.dry_run:
        print("--dry_run: data checked, stopping before loading weights.", file=sys.stderr)
        return TrainResult(None, None, None, None, None)
    if dtype == torch.float16 and args.lora.train_type == "full":
        raise UserError("--train_type full with float16 weights cannot use loss scaling: use --torch_dtype "
                        "bfloat16 (or float32), or --train_type lora.")
    sharded = env.active and env.strategy.kind == "fsdp"
    if sharded and dtype == torch.float16:
        raise UserError("FSDP2 (--fsdp / --deepspeed / full fine-tuning on several processes) with float16 weights "
                        "cannot use loss scaling: use --torch_dtype bfloat16 (or float32).")
    seed_everything(args.data.seed)
    # FSDP2 loads on the CPU and moves each rank's shards to its GPU: a model need not fit one GPU whole
    model = load_model(model_path, torch_dtype=str(dtype).removeprefix("torch."),
                       device=torch.device("cpu") if sharded else device, attn_impl=args.model.attn_impl,
                       quant=args.quant)
    if replay is None and args.train.replay > 0:
        replay = build_replay(args, model, tokenizer, data.system)
    if replay:
        data = add_replay(args, data, replay)
    model = prepare_model(model, args, device)
    saved = resolved_args(args, model_path=model_path, tokenizer=tokenizer, system=data.system, device=device,
                          dtype=dtype, learning_rate=default_learning_rate(args))
    par = distributed.wrap(model, env)  # DDP / FSDP2 under torchrun; before the optimizer (FSDP2 swaps parameters)
    # packed rows on a GPU: one shape for every step, so the compiled layers compile once
    static = args.data.packing and device.type == "cuda"
    run = start_run(args, model, tokenizer, data, saved_args=saved, device=device, loss_fn=make_loss_fn(device, args),
                    scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None,
                    par=par, collate_fn=functools.partial(collate, width=args.data.max_length) if static else collate)
    result = fit(run)
    return replace(result, seconds=time.perf_counter() - started)


def format_duration(seconds: float) -> str:
    """1h 02m 03s / 2m 03s / 3.2s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def print_summary(result: TrainResult, args: SftArgs) -> None:
    """What the run did, where the checkpoint is, and the command to try it."""
    if result.run_dir is None:
        return
    losses = f"final train loss {result.train_loss:.4f}" if result.train_loss is not None else "no train loss"
    if result.eval_loss is not None:
        losses += f", eval loss {result.eval_loss:.4f}"
    flag = "--adapters" if args.lora.train_type == "lora" else "--model"
    lines = [
        f"Training finished in {format_duration(result.seconds)}: {result.steps} steps, {result.tokens:,} tokens.",
        f"  {losses}",
        f"  run folder: {result.run_dir}",
        f"  checkpoint: {result.last_checkpoint}",
    ]
    if result.best_checkpoint and result.best_checkpoint != result.last_checkpoint:
        lines.append(f"  best by eval loss: {result.best_checkpoint}")
    lines += ["Try it:", f"  lorakit infer {flag} {result.last_checkpoint}"]
    print("\n".join(lines))


def main(args: SftArgs) -> int:
    """`lorakit sft` (under torchrun: one of several processes; rank 0 prints)."""
    with distributed.processes(args.dist, train_type=args.lora.train_type, device=args.model.device) as env:
        print_summary(train(args, env=env), args)
    return 0
