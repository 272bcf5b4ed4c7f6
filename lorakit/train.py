"""`lorakit sft`: the fine-tuning loop, top to bottom.

train() = resolve the model -> tokenizer -> data summary (before any weights load) -> weights ->
tuner (LoRA or full) -> optimizer -> loop over optimizer steps -> checkpoints -> summary.

One optimizer step = `gradient_accumulation_steps` micro-batches whose summed token loss is divided
by the number of loss tokens in the WHOLE step, so the gradient does not depend on how the tokens
fall into micro-batches. The data order is a pure function of (seed, epoch), and the learning rate
a pure function of the step, so a checkpoint's step, optimizer state and RNG states are all that
exact resumption needs.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit import __version__
from lorakit.args import SftArgs
from lorakit.checkpoint import (
    TrainState,
    best_checkpoint,
    capture_rng,
    find_checkpoint,
    load_train_state,
    load_weights_into,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from lorakit.data.packing import collate, pack_sequences
from lorakit.errors import UserError
from lorakit.loss import IGNORE_INDEX, LossOutput, causal_lm_loss, shift_targets
from lorakit.plots import plot_loss
from lorakit.schedule import StepPlan, lr_factor, plan_steps, warmup_steps_for
from lorakit.tuners import attach_tuner, check_lora_flags, trainable_parameters

# Test hook: make the loss of this optimizer step (1-based) NaN, to exercise the non-finite guard.
_INJECT_NAN_ENV = "LORAKIT_INJECT_NAN_AT_STEP"
_FEW_STEPS = 30


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    train_loss: float | None
    eval_loss: float | None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the trained model, still in memory (quickstart evaluates it without reloading)
    tokenizer: Any = None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch to the training device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of `batch` that carry loss once labels are shifted (what causal_lm_loss sums over)."""
    return int((shift_targets(batch["labels"], batch.get("position_ids")) != IGNORE_INDEX).sum())


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]


def accumulate_gradients(model, micro_batches: list[dict], loss_fn: LossFn, scaler=None,
                         n_tokens: int | None = None) -> tuple[float, int]:
    """Backward through every micro-batch of one optimizer step; return (mean loss per token, tokens).

    Each micro-batch's summed loss is divided by the loss tokens of the whole step, so the
    accumulated gradient equals that of one big batch, whatever the split. Pass `n_tokens` when
    already counted (on the CPU, before the batches moved to the GPU) to spare a device sync.
    """
    if n_tokens is None:
        n_tokens = sum(count_loss_tokens(b) for b in micro_batches)
    denominator = max(n_tokens, 1)
    total = torch.zeros((), dtype=torch.float32)
    for batch in micro_batches:
        out = loss_fn(model, batch)
        part = out.loss_sum / denominator
        (scaler.scale(part) if scaler is not None else part).backward()
        total = total.to(part.device) + out.loss_sum.detach().float()
    return float(total) / denominator, n_tokens  # one device sync per optimizer step


@torch.no_grad()
def evaluate_loss(model, batches, loss_fn: LossFn) -> float:
    """Mean loss per loss token over the validation batches."""
    was_training = model.training
    model.eval()
    loss_sum, n_tokens = 0.0, 0
    for batch in batches:
        out = loss_fn(model, batch)
        loss_sum += float(out.loss_sum)
        n_tokens += int(out.n_tokens)
    model.train(was_training)
    return loss_sum / max(n_tokens, 1)


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: GPU allocations on CUDA, the process's resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (LoRA init, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def new_run_dir(output_dir: str, add_version: bool) -> Path:
    """output_dir/vN-YYYYMMDD-HHMMSS (N one past the highest existing), or output_dir itself."""
    root = Path(output_dir).expanduser().resolve()
    if not add_version:
        root.mkdir(parents=True, exist_ok=True)
        return root
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[1:].split("-")[0]) for p in root.glob("v*-*") if p.name[1:].split("-")[0].isdigit()]
    run = root / f"v{max(taken, default=-1) + 1}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run.mkdir()
    return run


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


def load_data(args: SftArgs, tokenizer):
    """Render the datasets and print the check-data summary; a dataset with zero rows is an error."""
    from lorakit.data.check import format_report
    from lorakit.data.loading import build_datasets

    data = build_datasets(args.data, tokenizer, use_hf=args.model.use_hf, template=args.model.template)
    print(format_report(data, tokenizer, data_args=args.data), file=sys.stderr)
    return data


def add_replay(args: SftArgs, model, tokenizer, data):
    """--replay N: the base model's answers to N built-in prompts, with its distributions, added to the training data."""
    from dataclasses import replace

    from lorakit.model import CACHE_DIR
    from lorakit.replay import replay_samples

    samples = replay_samples(model, tokenizer, args.train.replay, system=data.system, cache_dir=CACHE_DIR / "replay",
                             max_new_tokens=args.train.replay_max_new_tokens, weight=args.train.replay_weight,
                             weight_zh=args.train.replay_weight_zh)
    samples = [s for s in samples if len(s.input_ids) <= args.data.max_length]
    tokens = sum(len(s.input_ids) for s in samples)
    print(f"replay: {len(samples)} samples ({tokens} tokens) of the base model's answers, learned as its "
          f"distributions; {len(data.train) + len(samples)} training samples in all", file=sys.stderr)
    return replace(data, train=data.train + samples)


def prepare_model(model, args: SftArgs, device: torch.device):
    """Attach the tuner, then GPU fast paths (or plain gradient checkpointing); prints the trainable share."""
    from lorakit.fast import FastOptions, prepare_for_training

    wanted = args.train.gradient_checkpointing
    model.config.use_cache = False
    if device.type == "cuda":
        mode = {None: "auto", True: "full", False: "none"}[wanted]
        model, summary = attach_tuner(model, args.lora)
        fast = args.fast
        model = prepare_for_training(model, FastOptions(
            fused_loss=fast.fused_loss, fused_lora=fast.fused_lora, packed_attention=fast.packed_attention,
            compile=fast.torch_compile, checkpointing=mode, memory_limit_gib=fast.gpu_memory_limit))
    else:  # CPU/MPS: the plain reference computation
        if wanted:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model, summary = attach_tuner(model, args.lora)
    print(summary.line(), file=sys.stderr)
    return model


def make_loss_fn(device: torch.device, args: SftArgs) -> LossFn:
    """causal_lm_loss with the chunked head+CE (same value; far less memory, and the head skips every
    position without a target: 10% of a CPU step on SmolLM2 chat rows). --fused_loss false: plain."""
    fused = args.fast.fused_loss
    return lambda model, batch: causal_lm_loss(model, batch, fused=fused)


def inject_nan_at(step: int, loss_fn: LossFn) -> LossFn:
    """The loss function, made NaN at optimizer step `step` when the test hook asks for it."""
    target = int(os.environ.get(_INJECT_NAN_ENV, "0") or 0)
    if target != step:
        return loss_fn

    def poisoned(model, batch):
        out = loss_fn(model, batch)
        return LossOutput(loss_sum=out.loss_sum * float("nan"), n_tokens=out.n_tokens)

    return poisoned


def build_optimizer(model, args: SftArgs, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters."""
    params = trainable_parameters(model)
    return torch.optim.AdamW(params, lr=learning_rate, betas=(args.train.adam_beta1, args.train.adam_beta2),
                             weight_decay=args.train.weight_decay,
                             fused=any(p.is_cuda for p in params) or None)


def default_learning_rate(args: SftArgs) -> float:
    """--learning_rate, else 1e-4 for LoRA and 1e-5 for full fine-tuning."""
    if args.train.learning_rate is not None:
        return args.train.learning_rate
    return 1e-4 if args.lora.train_type == "lora" else 1e-5


@dataclass
class Session:
    """Everything the loop reads and updates; built by train(), stepped by run_loop()."""

    args: SftArgs
    saved_args: dict[str, Any]
    run_dir: Path
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    plan: StepPlan
    train_samples: list
    val_samples: list
    device: torch.device
    loss_fn: LossFn
    learning_rate: float
    warmup: int
    scaler: Any = None
    step: int = 0
    eval_loss: float | None = None
    last_checkpoint: Path | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    writer: Any = None


def open_writers(run_dir: Path, report_to: list[str], config: dict) -> Any:
    """A TensorBoard SummaryWriter when asked for and installed (wandb is started beside it)."""
    writer = None
    if "tensorboard" in report_to:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(run_dir / "runs"))
        except ImportError:
            print("notice: --report_to tensorboard, but tensorboard is not installed (pip install tensorboard); "
                  "logging.jsonl still has every value.", file=sys.stderr)
    if "wandb" in report_to:
        try:
            import wandb

            wandb.init(project="lorakit", name=run_dir.name, dir=str(run_dir), config=config)
        except Exception as exc:  # missing package or no login: the run goes on, logging.jsonl has it all
            print(f"notice: --report_to wandb failed ({type(exc).__name__}: {exc}); continuing without it.",
                  file=sys.stderr)
    return writer


def log_record(s: Session, record: dict[str, Any]) -> None:
    """Append one record to logging.jsonl, the log history, TensorBoard and wandb."""
    s.log_history.append(record)
    with open(s.run_dir / "logging.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    scalars = {k: v for k, v in record.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
    if s.writer is not None:
        for key, value in scalars.items():
            s.writer.add_scalar(("eval/" if key.startswith("eval") else "train/") + key, value, record["step"])
    if "wandb" in s.args.train.report_to and "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.log(scalars, step=record["step"])


def save(s: Session) -> Path:
    """Checkpoint the current step (atomic), then prune to --save_total_limit."""
    state = TrainState(
        step=s.step, epoch=s.plan.epoch_of(s.step), total_steps=s.plan.total_steps,
        train_loss=next((r["loss"] for r in reversed(s.log_history) if "loss" in r), None),
        eval_loss=s.eval_loss, data_order=s.plan.data_order(), log_history=s.log_history,
        optimizer=None if s.args.train.save_only_model else s.optimizer.state_dict(),
        rng=None if s.args.train.save_only_model else capture_rng(),
    )
    s.last_checkpoint = save_checkpoint(s.run_dir / f"checkpoint-{s.step}", model=s.model, tokenizer=s.tokenizer,
                                        args=s.saved_args, train_state=state)
    if s.args.train.save_total_limit:
        prune_checkpoints(s.run_dir, s.args.train.save_total_limit)
    return s.last_checkpoint


def describe_sample(s: Session, index: int) -> str:
    """'training sample #3 ("I am swift-robot, an ...")': the start of what it teaches."""
    sample = s.train_samples[index]
    learned = [t for t in sample.labels if t != IGNORE_INDEX][:24]
    text = s.tokenizer.decode(learned, skip_special_tokens=True).strip().replace("\n", " ")
    return f"training sample #{index} ({text[:60]!r})"


def stop_on_non_finite(s: Session, loss: float, grad_norm: float, rows: list[int]) -> None:
    """Raise a UserError naming the step and what to change when the loss or gradient norm blew up."""
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    value = loss if what == "loss" else grad_norm
    where = [describe_sample(s, i) for i in rows[:4]]
    kept = f"The last good checkpoint is {s.last_checkpoint}." if s.last_checkpoint else (
        f"No checkpoint was saved yet (--save_steps {s.args.train.save_steps}).")
    advice = [f"lower --learning_rate (now {s.learning_rate:g}; try {s.learning_rate / 10:g}) or add warm-up "
              f"(--warmup_ratio 0.05)"]
    if s.saved_args.get("torch_dtype") == "float16":
        advice.append("use --torch_dtype bfloat16 (or float32): float16 overflows easily")
    advice.append(f"check the rows of this step for broken text: {', '.join(where)}")
    raise UserError(
        f"Training stopped at step {s.step + 1}/{s.plan.total_steps} (epoch {s.plan.epoch_of(s.step):.2f}): "
        f"the {what} is {value}. This step was not applied. {kept} To fix: " + "; ".join(advice) + "."
    )


def optimizer_step(s: Session) -> tuple[float, float, int]:
    """One optimizer step: set the lr, accumulate, clip, check, apply. Returns (loss, grad norm, tokens seen)."""
    lr = s.learning_rate * lr_factor(s.step, total_steps=s.plan.total_steps, warmup=s.warmup,
                                     kind=s.args.train.lr_scheduler_type)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    indices = s.plan.micro_batches(s.step)
    pad_id = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
    # Off the GPU fast path, the rows of a micro-batch share the run of their common start (the system prompt).
    shared = s.device.type != "cuda"
    cpu_batches = [collate([s.train_samples[i] for i in idx], pad_id, shared_prefix=shared) for idx in indices]
    n_tokens = sum(count_loss_tokens(b) for b in cpu_batches)
    seen = sum(len(idx) * b["prefix_ids"].shape[1] if "prefix_ids" in b else 0 for idx, b in zip(indices, cpu_batches))
    seen += sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in cpu_batches)
    batches = [to_device(b, s.device) for b in cpu_batches]
    loss, _ = accumulate_gradients(s.model, batches, inject_nan_at(s.step + 1, s.loss_fn), scaler=s.scaler,
                                   n_tokens=n_tokens)
    if s.scaler is not None:
        s.scaler.unscale_(s.optimizer)
    max_norm = s.args.train.max_grad_norm if s.args.train.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable_parameters(s.model), max_norm))
    if not math.isfinite(loss) or (s.scaler is None and not math.isfinite(grad_norm)):
        s.optimizer.zero_grad(set_to_none=True)
        stop_on_non_finite(s, loss, grad_norm, [i for idx in indices for i in idx])
    if s.scaler is not None:  # fp16: the scaler skips steps whose gradients overflowed and lowers its scale
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    return loss, grad_norm, seen


def run_loop(s: Session) -> None:
    """Step until the plan's total: log every --logging_steps, evaluate every --eval_steps, save every --save_steps."""
    from tqdm import tqdm

    t = s.args.train
    eval_every = t.eval_steps or t.save_steps
    window: list[float] = []
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    s.model.train()
    # `with` closes the bar on errors too, so an error message starts on a line of its own
    with tqdm(total=s.plan.total_steps, initial=s.step, desc="sft", unit="step", dynamic_ncols=True) as bar:
        while s.step < s.plan.total_steps:
            loss, grad_norm, seen = optimizer_step(s)
            s.tokens += seen
            window.append(loss)
            window_tokens += seen
            last = s.step == s.plan.total_steps
            tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            lr = s.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", mem=f"{memory_gb(s.device):.1f}G")
            bar.update(1)
            if s.step % t.logging_steps == 0 or last:
                log_record(s, dict(step=s.step, epoch=round(s.plan.epoch_of(s.step), 4), loss=sum(window) / len(window),
                                   learning_rate=lr, grad_norm=grad_norm, tokens_per_second=round(tok_s, 1),
                                   memory_gb=round(memory_gb(s.device), 3),
                                   elapsed_s=round(time.perf_counter() - started, 2)))
                window, window_tokens, window_start = [], 0, time.perf_counter()
            if s.val_samples and (s.step % eval_every == 0 or last):
                s.eval_loss = evaluate_loss(s.model, val_batches(s), s.loss_fn)
                log_record(s, dict(step=s.step, epoch=round(s.plan.epoch_of(s.step), 4), eval_loss=s.eval_loss))
                bar.write(f"step {s.step}: eval loss {s.eval_loss:.4f}")
            if s.step % t.save_steps == 0 or last:
                save(s)


def val_batches(s: Session):
    """Validation batches, collated one at a time (the whole set need not sit on the GPU)."""
    size = s.args.train.per_device_eval_batch_size
    pad_id = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
    for i in range(0, len(s.val_samples), size):
        yield to_device(collate(s.val_samples[i : i + size], pad_id), s.device)


def oom_message(device: torch.device, args: SftArgs) -> str:
    """What to do after running out of GPU memory, with the peak the run reached."""
    peak = memory_gb(device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
    options = [f"--max_length {max(256, args.data.max_length // 2)} (now {args.data.max_length})"]
    if not args.train.gradient_checkpointing:
        options.append("--gradient_checkpointing true")
    if args.train.per_device_train_batch_size > 1:
        options.append(f"--per_device_train_batch_size 1 with --gradient_accumulation_steps "
                       f"{args.train.gradient_accumulation_steps * args.train.per_device_train_batch_size}")
    if args.lora.train_type == "full":
        options.append("--train_type lora")
    elif args.lora.lora_rank > 8:
        options.append(f"--lora_rank 8 (now {args.lora.lora_rank})")
    options.append("a smaller model, or QLoRA (4-bit base weights; not built into lorakit yet)")
    return (f"Out of GPU memory: peak {peak:.1f} GiB allocated of {total:.1f} GiB. Options: " + "; ".join(options) + ".")


def warn_if_short(plan: StepPlan, args: SftArgs) -> None:
    """Say so when a run has too few optimizer steps to learn much."""
    if args.train.max_steps > 0 or plan.total_steps >= _FEW_STEPS:
        return
    print(f"warning: only {plan.total_steps} optimizer steps ({plan.n_samples} samples, batch "
          f"{plan.micro_batch_size} x {plan.grad_accum} accumulation, {args.train.num_train_epochs:g} epochs): "
          f"too few to learn much. Use fewer --gradient_accumulation_steps or more --num_train_epochs "
          f"(about {_FEW_STEPS} steps or more).", file=sys.stderr)


def resume(s: Session, checkpoint: str, only_model: bool) -> None:
    """Load a checkpoint's weights; unless only_model, also its optimizer, step, history and RNG."""
    ckpt = find_checkpoint(checkpoint)
    if only_model:
        load_weights_into(s.model, ckpt)
        print(f"starting a new run from the weights of {ckpt}", file=sys.stderr)
        return
    state = load_train_state(ckpt)
    if state.data_order and state.data_order != s.plan.data_order():
        print(f"warning: {ckpt} was trained with a different data plan ({state.data_order}); resuming at step "
              f"{state.step} with the current one, so the data order will differ from the original run.",
              file=sys.stderr)
    if state.step >= s.plan.total_steps:
        raise UserError(f"{ckpt} is already at step {state.step} of {s.plan.total_steps}: raise --max_steps or "
                        f"--num_train_epochs to train further.")
    load_weights_into(s.model, ckpt)
    s.optimizer.load_state_dict(state.optimizer)
    s.step, s.eval_loss = state.step, state.eval_loss
    for record in state.log_history:  # the new run's logging.jsonl reads like one uninterrupted run
        log_record(s, record)
    if state.rng is not None:
        restore_rng(state.rng)
    print(f"resuming from {ckpt} at step {state.step} of {s.plan.total_steps}", file=sys.stderr)


def new_session(args: SftArgs, model, tokenizer, data, *, model_path: Path, device: torch.device,
                dtype: torch.dtype) -> Session:
    """Plan the steps, make the run folder with its args.json, and build the optimizer."""
    t = args.train
    learning_rate = default_learning_rate(args)
    train_samples = pack_sequences(data.train, args.data.max_length) if args.data.packing else data.train
    plan = plan_steps(len(train_samples), batch_size=t.per_device_train_batch_size,
                      grad_accum=t.gradient_accumulation_steps, epochs=t.num_train_epochs, max_steps=t.max_steps,
                      seed=args.data.seed,
                      lengths=[len(x.input_ids) for x in train_samples] if t.group_by_length else None)
    warn_if_short(plan, args)
    run_dir = new_run_dir(t.output_dir, t.add_version)
    saved = resolved_args(args, model_path=model_path, tokenizer=tokenizer, system=data.system, device=device,
                          dtype=dtype, learning_rate=learning_rate)
    (run_dir / "args.json").write_text(json.dumps(saved, indent=2, ensure_ascii=False, default=str) + "\n")
    packed = f" packed into {len(train_samples)} rows" if args.data.packing else ""
    print(f"run folder: {run_dir}\n{plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch), "
          f"{len(data.train)} training samples{packed}, {len(data.val)} validation samples", file=sys.stderr)
    return Session(
        args=args, saved_args=saved, run_dir=run_dir, model=model, tokenizer=tokenizer,
        optimizer=build_optimizer(model, args, learning_rate), plan=plan, train_samples=train_samples,
        val_samples=data.val, device=device, loss_fn=make_loss_fn(device, args), learning_rate=learning_rate,
        warmup=warmup_steps_for(plan.total_steps, warmup_steps=t.warmup_steps, warmup_ratio=t.warmup_ratio),
        scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None,
    )


def train(args: SftArgs) -> TrainResult:
    """Fine-tune as `args` says; returns where the checkpoints are, the final losses and the trained model."""
    from lorakit.data.render import set_chat_template
    from lorakit.model import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path

    started = time.perf_counter()
    device = pick_device(args.model.device)
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
    seed_everything(args.data.seed)
    model = load_model(model_path, torch_dtype=str(dtype).removeprefix("torch."), device=device,
                       attn_impl=args.model.attn_impl)
    if args.train.replay > 0:
        data = add_replay(args, model, tokenizer, data)
    model = prepare_model(model, args, device)
    s = new_session(args, model, tokenizer, data, model_path=model_path, device=device, dtype=dtype)
    if args.train.resume_from_checkpoint:
        resume(s, args.train.resume_from_checkpoint, args.train.resume_only_model)
    s.writer = open_writers(s.run_dir, args.train.report_to, s.saved_args)
    try:
        run_loop(s)
    except torch.OutOfMemoryError as exc:
        raise UserError(oom_message(device, args)) from exc
    except KeyboardInterrupt:
        where = (f"continue with --resume_from_checkpoint {s.last_checkpoint}" if s.last_checkpoint
                 else "no checkpoint was saved yet")
        print(f"\ninterrupted at step {s.step}/{s.plan.total_steps}: {where}", file=sys.stderr)
        raise
    finally:
        if s.writer is not None:
            s.writer.close()
        plot_loss(s.log_history, s.run_dir / "images" / "loss.png")
    train_loss = next((r["loss"] for r in reversed(s.log_history) if "loss" in r), None)
    return TrainResult(run_dir=s.run_dir, last_checkpoint=s.last_checkpoint, best_checkpoint=best_checkpoint(s.run_dir),
                       train_loss=train_loss, eval_loss=s.eval_loss, steps=s.step, tokens=s.tokens,
                       seconds=time.perf_counter() - started, log_history=s.log_history, model=s.model.eval(),
                       tokenizer=tokenizer)


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
    """`lorakit sft`."""
    print_summary(train(args), args)
    return 0
