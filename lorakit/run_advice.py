"""What to tell the user when a run goes wrong or is set up to learn little: a non-finite loss, out of
GPU memory, too few optimizer steps; and the peak memory the progress bar and the log show."""

from __future__ import annotations

import math
import resource
import sys

import torch

from lorakit.args import SftArgs
from lorakit.errors import UserError
from lorakit.loss import IGNORE_INDEX
from lorakit.run_state import TrainingRun
from lorakit.schedule import StepPlan

_FEW_STEPS = 30


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: GPU allocations on CUDA, the process's resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def describe_sample(s: TrainingRun, index: int) -> str:
    """'training sample #3 ("I am swift-robot, an ...")': the start of what it teaches."""
    sample = s.train_samples[index]
    learned = [t for t in sample.labels if t != IGNORE_INDEX][:24]
    text = s.tokenizer.decode(learned, skip_special_tokens=True).strip().replace("\n", " ")
    return f"training sample #{index} ({text[:60]!r})"


def stop_on_non_finite(s: TrainingRun, loss: float, grad_norm: float, rows: list[int]) -> None:
    """Raise a UserError naming the step and what to change when the loss or gradient norm blew up."""
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    value = loss if what == "loss" else grad_norm
    where = [describe_sample(s, i) for i in rows[:4]]
    kept = f"The last good checkpoint is {s.last_checkpoint}." if s.last_checkpoint else (
        f"No checkpoint was saved yet (--save_steps {s.args.train.save_steps}).")
    advice = [f"lower --learning_rate (now {s.learning_rate:g}; try {s.learning_rate / 10:g}) or add warm-up "
              f"(--warmup_ratio 0.05)"]
    if s.log.saved_args.get("torch_dtype") == "float16":
        advice.append("use --torch_dtype bfloat16 (or float32): float16 overflows easily")
    advice.append(f"check the rows of this step for broken text: {', '.join(where)}")
    raise UserError(
        f"Training stopped at step {s.step + 1}/{s.plan.total_steps} (epoch {s.plan.epoch_of(s.step):.2f}): "
        f"the {what} is {value}. This step was not applied. {kept} To fix: " + "; ".join(advice) + "."
    )


def oom_message(device: torch.device, args: SftArgs) -> str:
    """What to do after running out of GPU memory, with the peak the run reached."""
    peak = memory_gb(device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
    options = [f"--max_length {max(256, args.data.max_length // 2)} (now {args.data.max_length})"]
    if not args.fast.gradient_checkpointing:
        options.append("--gradient_checkpointing true")
    if args.train.per_device_train_batch_size > 1:
        options.append(f"--per_device_train_batch_size 1 with --gradient_accumulation_steps "
                       f"{args.train.gradient_accumulation_steps * args.train.per_device_train_batch_size}")
    if args.lora.train_type == "full":
        options.append("--train_type lora")
    elif args.lora.lora_rank > 8:
        options.append(f"--lora_rank 8 (now {args.lora.lora_rank})")
    options.append("a smaller model" if args.quant.quant_bits == 4 else "--quant_bits 4 (QLoRA: 4-bit base weights)")
    return (f"Out of GPU memory: peak {peak:.1f} GiB allocated of {total:.1f} GiB. Options: " + "; ".join(options) + ".")


def warn_if_short(plan: StepPlan, args: SftArgs) -> None:
    """Say so when a run has too few optimizer steps to learn much."""
    if args.train.max_steps > 0 or plan.total_steps >= _FEW_STEPS:
        return
    print(f"warning: only {plan.total_steps} optimizer steps ({plan.n_samples} samples, batch "
          f"{plan.micro_batch_size} x {plan.grad_accum} accumulation, {args.train.num_train_epochs:g} epochs): "
          f"too few to learn much. Use fewer --gradient_accumulation_steps or more --num_train_epochs "
          f"(about {_FEW_STEPS} steps or more).", file=sys.stderr)
