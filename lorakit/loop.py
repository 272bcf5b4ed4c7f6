"""The training loop, top to bottom: optimizer steps over the data it is handed.

`start_run(args, model, tokenizer, data, ...)` plans the steps, makes the run folder and the
optimizer; `fit(run)` = (resume) -> loop over optimizer steps (log, evaluate, save) -> TrainResult.
It takes the model ready to train (tuner attached) and the data already rendered (replay included):
callers build both (`lorakit.train` for `sft`). The loss is a parameter,
`loss_fn(model, batch) -> LossOutput`, so other objectives reuse the loop.

One optimizer step = `gradient_accumulation_steps` micro-batches whose summed token loss is divided
by the number of loss tokens in the WHOLE step, so the gradient does not depend on how the tokens
fall into micro-batches. The run's state is run_state.py, its checkpoints (save, exact resume)
run_checkpoint.py, what to tell the user when it fails run_advice.py.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from lorakit import distributed
from lorakit.args import SftArgs
from lorakit.checkpoint import best_checkpoint
from lorakit.data.loading import TrainData
from lorakit.data.packing import collate, pack_sequences
from lorakit.errors import UserError
from lorakit.loss import LossOutput, MetricSums, count_loss_tokens
from lorakit.run_advice import memory_gb, oom_message, stop_on_non_finite, warn_if_short
from lorakit.run_checkpoint import resume, save
from lorakit.run_log import RunLog, new_run_dir
from lorakit.run_state import LossFn, TrainingRun, TrainResult
from lorakit.schedule import StepPlan, lr_factor, plan_steps, warmup_steps_for
from lorakit.tuners import trainable_parameters

# Test hook: make the loss of this optimizer step (1-based) NaN, to exercise the non-finite guard.
_INJECT_NAN_ENV = "LORAKIT_INJECT_NAN_AT_STEP"


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch to the training device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def accumulate_gradients(model, micro_batches: list[dict], loss_fn: LossFn, scaler=None,
                         n_tokens: int | None = None, metrics: MetricSums | None = None) -> tuple[float, int]:
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
        if metrics is not None:  # what the loss reports beside its value (rewards/chosen, ...)
            metrics.add(out.metrics)
        part = out.loss_sum / denominator
        (scaler.scale(part) if scaler is not None else part).backward()
        total = total.to(part.device) + out.loss_sum.detach().float()
    return float(total) / denominator, n_tokens  # one device sync per optimizer step


@torch.no_grad()
def evaluate_loss(model, batches, loss_fn: LossFn, metrics: MetricSums | None = None) -> float:
    """Mean loss per loss token over the validation batches."""
    was_training = model.training
    model.eval()
    loss_sum, n_tokens = 0.0, 0
    for batch in batches:
        out = loss_fn(model, batch)
        if metrics is not None:
            metrics.add(out.metrics)
        loss_sum += float(out.loss_sum)
        n_tokens += int(out.n_tokens)
    model.train(was_training)
    return loss_sum / max(n_tokens, 1)


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


def shares_prefix(device: torch.device, *, prefix_on_gpu: bool, sharded: bool = False) -> bool:
    """Whether a batch's rows run their common start (the system prompt; a pair's prompt) once: on the CPU, and on
    a GPU where the run asks (rlhf, under packed attention; sft's GPU rows keep fixed shapes for the compiled
    layers); not under FSDP2, whose backward regathers a layer's weights from its outputs, not from the shared
    keys/values."""
    return (device.type != "cuda" or prefix_on_gpu) and not sharded


def optimizer_step(s: TrainingRun) -> tuple[float, float, int]:
    """One optimizer step: set the lr, accumulate, clip, check, apply. Returns (loss, grad norm, tokens seen)."""
    lr = s.learning_rate * lr_factor(s.step, total_steps=s.plan.total_steps, warmup=s.warmup,
                                     kind=s.args.train.lr_scheduler_type)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    indices = s.plan.micro_batches(s.step)
    mine, weights = s.par.share(indices)  # several processes: this rank's micro-batches (weight 0: a repeat)
    pad_id = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
    shared = shares_prefix(s.device, prefix_on_gpu=s.prefix_on_gpu, sharded=s.par.sharded)
    cpu_batches = [s.collate_fn([s.train_samples[i] for i in idx], pad_id, shared_prefix=shared) for idx in mine]
    real = [(idx, b) for idx, b, w in zip(mine, cpu_batches, weights) if w]
    n_tokens = sum(s.count_fn(b) for _, b in real)
    seen = sum(sample_length(s.train_samples[i]) for idx, _ in real for i in idx)  # real tokens, never padding
    n_tokens, seen = map(int, distributed.all_sum(s.par.env, [n_tokens, seen]))  # the WHOLE step's loss tokens
    batches = [to_device(b, s.device) for b in cpu_batches]
    loss_fn = s.par.loss_fn(inject_nan_at(s.step + 1, s.loss_fn), weights)
    loss, _ = accumulate_gradients(s.model, batches, loss_fn, scaler=s.scaler, n_tokens=n_tokens, metrics=s.metrics)
    loss = distributed.all_sum(s.par.env, [loss])[0]  # each rank's share of the step's mean
    if s.scaler is not None:
        s.scaler.unscale_(s.optimizer)
    max_norm = s.args.train.max_grad_norm if s.args.train.max_grad_norm > 0 else float("inf")
    grad_norm = s.par.clip_grad_norm(trainable_parameters(s.model), max_norm)
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


def run_loop(s: TrainingRun) -> None:
    """Step until the plan's total: log every --logging_steps, evaluate every --eval_steps, save every --save_steps."""
    t = s.args.train
    eval_every = t.eval_steps or t.save_steps
    window: list[float] = []
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    s.model.train()
    # `with` closes the bar on errors too, so an error message starts on a line of its own
    with tqdm(total=s.plan.total_steps, initial=s.step, desc=s.name, unit="step", dynamic_ncols=True,
              disable=not s.par.env.is_main) as bar:
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
                s.log.record(dict(step=s.step, epoch=round(s.plan.epoch_of(s.step), 4), loss=sum(window) / len(window),
                                   learning_rate=lr, grad_norm=grad_norm, tokens_per_second=round(tok_s, 1),
                                   memory_gb=round(memory_gb(s.device), 3),
                                   elapsed_s=round(time.perf_counter() - started, 2),
                                  **distributed.reduce_metrics(s.par.env, s.metrics).means()))
                window, window_tokens, window_start = [], 0, time.perf_counter()
                s.metrics = MetricSums()
            if s.val_samples and (s.step % eval_every == 0 or last):
                evaluated = MetricSums()
                s.eval_loss = evaluate_loss(s.model, val_batches(s), s.par.eval_loss_fn(s.loss_fn), evaluated)
                s.log.record(dict(step=s.step, epoch=round(s.plan.epoch_of(s.step), 4), eval_loss=s.eval_loss,
                                  **evaluated.means("eval_")))
                bar.write(f"step {s.step}: eval loss {s.eval_loss:.4f}")
            if s.step % t.save_steps == 0 or last:
                save(s)


def val_batches(s: TrainingRun):
    """Validation batches, collated one at a time (the whole set need not sit on the GPU)."""
    size = s.args.train.per_device_eval_batch_size
    pad_id = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
    for i in range(0, len(s.val_samples), size):
        yield to_device(s.collate_fn(s.val_samples[i : i + size], pad_id, shared_prefix=False), s.device)


def sample_length(sample) -> int:
    """Tokens of a training sample (a preference pair's: both rows)."""
    return sample.length if hasattr(sample, "length") else len(sample.input_ids)


def plan_run(args: SftArgs, data: TrainData, world_size: int = 1) -> tuple[list, StepPlan]:
    """(training rows, step plan): the samples packed when --packing, the steps over them.

    With several processes the plan is the global one: --gradient_accumulation_steps x processes
    micro-batches per step, which the processes share (lorakit.distributed.Parallel.share)."""
    t = args.train
    train_samples = pack_sequences(data.train, args.data.max_length) if args.data.packing else data.train
    plan = plan_steps(len(train_samples), batch_size=t.per_device_train_batch_size,
                      grad_accum=t.gradient_accumulation_steps * world_size, epochs=t.num_train_epochs,
                      max_steps=t.max_steps,
                      seed=args.data.seed,
                      lengths=[sample_length(x) for x in train_samples] if t.group_by_length else None)
    warn_if_short(plan, args)
    return train_samples, plan


def start_run(args: SftArgs, model, tokenizer: PreTrainedTokenizerBase, data: TrainData, *, saved_args: dict[str, Any],
              device: torch.device, loss_fn: LossFn, scaler=None,
              par: distributed.Parallel | None = None, collate_fn: Callable = collate,
              count_fn: Callable = count_loss_tokens, name: str = "sft", prefix_on_gpu: bool = False) -> TrainingRun:
    """Plan the steps, make the run folder (its args.json is `saved_args`) and build the optimizer.

    `par`: the processes and the wrapped model (lorakit.distributed.wrap); rank 0 makes the run
    folder and every rank learns its name. collate_fn / count_fn / name: another objective's batches,
    normalising unit and progress label (`lorakit rlhf`: pairs); the defaults are sft's. prefix_on_gpu: see
    TrainingRun."""
    t = args.train
    par = par or distributed.Parallel()
    learning_rate = default_learning_rate(args)
    train_samples, plan = plan_run(args, data, par.env.world_size)
    run_dir = distributed.broadcast(par.env, new_run_dir(t.output_dir, t.add_version) if par.env.is_main else None)
    log = RunLog(run_dir, saved_args, writes=par.env.is_main)
    packed = f" packed into {len(train_samples)} rows" if args.data.packing else ""
    print(f"run folder: {log.run_dir}\n{plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch), "
          f"{len(data.train)} training samples{packed}, {len(data.val)} validation samples", file=sys.stderr)
    return TrainingRun(
        args=args, log=log, model=model, tokenizer=tokenizer,
        optimizer=build_optimizer(model, args, learning_rate), plan=plan, train_samples=train_samples,
        val_samples=data.val, device=device, loss_fn=loss_fn, learning_rate=learning_rate,
        warmup=warmup_steps_for(plan.total_steps, warmup_steps=t.warmup_steps, warmup_ratio=t.warmup_ratio),
        scaler=scaler, par=par, collate_fn=collate_fn, count_fn=count_fn, name=name, prefix_on_gpu=prefix_on_gpu,
    )


def fit(s: TrainingRun) -> TrainResult:
    """Resume when asked, run the loop to the plan's end, close the run's log; returns what the run produced."""
    args = s.args
    if args.train.resume_from_checkpoint:
        resume(s, args.train.resume_from_checkpoint, args.train.resume_only_model)
    s.log.open_writers(args.train.report_to)
    try:
        run_loop(s)
    except torch.OutOfMemoryError as exc:
        raise UserError(oom_message(s.device, args)) from exc
    except KeyboardInterrupt:
        where = (f"continue with --resume_from_checkpoint {s.last_checkpoint}" if s.last_checkpoint
                 else "no checkpoint was saved yet")
        print(f"\ninterrupted at step {s.step}/{s.plan.total_steps}: {where}", file=sys.stderr)
        raise
    finally:
        s.log.close()
    return TrainResult(run_dir=s.log.run_dir, last_checkpoint=s.last_checkpoint,
                       best_checkpoint=best_checkpoint(s.log.run_dir), train_loss=s.log.last("loss"),
                       eval_loss=s.eval_loss, steps=s.step, tokens=s.tokens, log_history=s.log.history,
                       model=s.model.eval(), tokenizer=s.tokenizer)
