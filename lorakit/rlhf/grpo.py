"""`lorakit rlhf --rlhf_type grpo`: the GRPO loop, top to bottom.

train_grpo() = model -> tokenizer -> prompts -> weights -> policy (LoRA, or the --adapters SFT adapter) ->
reward functions -> rounds until the plan's total:
  rollouts (the engine, live adapter) -> rewards -> group advantages -> old log-probs (only when a round
  spans several updates) -> reference log-probs (skipped with --beta 0) -> policy updates -> log / save.
Checkpoints, optimizer, run folder, TensorBoard and resume are sft's (lorakit.train); a checkpoint is a
plain PEFT adapter that infer/eval/export/deploy load like any other. The run's state: grpo_session.py.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from lorakit import loop
from lorakit import train as sft
from lorakit.args import RlhfArgs
from lorakit.data.loading import resolve_system
from lorakit.errors import UserError
from lorakit.model import load_model, pick_device, pick_dtype
from lorakit.rlhf import grpo_log
from lorakit.rlhf.grpo_data import PromptSet
from lorakit.rlhf.grpo_logps import RolloutBatch, completion_logps, pad_rollouts
from lorakit.rlhf.grpo_loss import group_advantages, grpo_loss
from lorakit.rlhf.grpo_rollout import Rollout, SamplingSettings, generate_rollouts
from lorakit.rlhf.grpo_session import GrpoSession, load_prompts, new_session
from lorakit.rlhf.policy import load_policy_tokenizer, prepare_policy, starting_policy
from lorakit.rlhf.rewards import RewardInputs, compute_rewards
from lorakit.run_advice import memory_gb, oom_message
from lorakit.run_checkpoint import resume, save
from lorakit.run_state import TrainResult
from lorakit.schedule import lr_factor
from lorakit.tuners import trainable_parameters

# ---------------------------------------------------------------- one round


def sampling(args) -> SamplingSettings:
    g = args.grpo
    return SamplingSettings(g.max_completion_length, g.temperature, g.top_p, g.top_k, g.repetition_penalty)


def reward_inputs(s: GrpoSession, prompts: PromptSet, indices: list[int], rollouts: list[Rollout]) -> RewardInputs:
    rows = [prompts.rows[indices[r.prompt]] for r in rollouts]
    return RewardInputs(completions=[r.text for r in rollouts], completion_ids=[r.completion_ids for r in rollouts],
                        prompts=[row.messages for row in rows],
                        columns={c: [row.columns.get(c) for row in rows] for c in prompts.columns},
                        sources=[row.source for row in rows])


def micro_batches(s: GrpoSession, rollouts: list[Rollout], round_index: int) -> list[tuple[list[int], RolloutBatch]]:
    """The round's completions shuffled (seeded) and cut into S micro-batches of B: (indices, padded batch)."""
    order = list(range(len(rollouts)))
    random.Random(s.plan.seed * 7919 + round_index).shuffle(order)
    masked = s.args.grpo.mask_truncated_completions
    pad = s.engine.pad_id
    out = []
    for start in range(0, len(order), s.plan.batch_size):
        idx = order[start:start + s.plan.batch_size]
        batch = pad_rollouts([rollouts[i].prompt_ids for i in idx], [rollouts[i].completion_ids for i in idx], pad,
                             keep=[not (masked and rollouts[i].truncated) for i in idx])
        out.append((idx, batch.to(s.device)))
    return out


@torch.no_grad()
def frozen_logps(s: GrpoSession, batches: list[tuple[list[int], RolloutBatch]],
                 as_reference: bool) -> list[torch.Tensor]:
    """Per-token log-probs of every micro-batch, no grad, eval mode: the sampling policy, or the reference."""
    temperature, fused = s.args.grpo.temperature, s.args.fast.fused_loss
    was_training = s.model.training
    s.model.eval()
    try:
        if as_reference:
            with s.reference.active():
                return [completion_logps(s.model, b, temperature=temperature, fused=fused) for _, b in batches]
        return [completion_logps(s.model, b, temperature=temperature, fused=fused) for _, b in batches]
    finally:
        s.model.train(was_training)


def update(s: GrpoSession, batches, advantages: torch.Tensor, old, ref, n_items: int) -> dict[str, float]:
    """One optimizer step over GA micro-batches; returns its loss, grad norm and loss parts."""
    g, t = s.args.grpo, s.args.train
    lr = s.learning_rate * lr_factor(s.step, total_steps=s.plan.total_steps, warmup=s.warmup,
                                     kind=t.lr_scheduler_type)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    parts: dict[str, float] = {}
    total = 0.0
    for k, (idx, batch) in batches:
        logps = completion_logps(s.model, batch, temperature=g.temperature, fused=s.args.fast.fused_loss)
        out = grpo_loss(logps, advantages[idx].to(s.device), batch.completion_mask, old_logps=old[k] if old else None,
                        ref_logps=ref[k] if ref else None, loss_type=s.args.rlhf.loss_type, beta=s.args.rlhf.beta,
                        epsilon_low=g.epsilon, epsilon_high=g.epsilon_high,
                        max_completion_length=g.max_completion_length, num_items_in_batch=n_items,
                        gradient_accumulation_steps=s.plan.grad_accum, steps_per_generation=s.plan.steps_per_generation)
        loss = out.loss * sft_nan_factor(s.step + 1)
        loss.backward()
        total += float(loss.detach())
        for name, value in (("kl", out.kl), ("clip_ratio/low_mean", out.clip_low),
                            ("clip_ratio/high_mean", out.clip_high), ("clip_ratio/region_mean", out.clip_region)):
            if value is not None:
                parts[name] = parts.get(name, 0.0) + float(value) / len(batches)
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable_parameters(s.model), max_norm))
    if not math.isfinite(total) or not math.isfinite(grad_norm):
        s.optimizer.zero_grad(set_to_none=True)
        stop_on_non_finite(s, total, grad_norm)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    return dict(loss=total, grad_norm=grad_norm, learning_rate=lr, **parts)


def sft_nan_factor(step: int) -> float:
    """NaN at the optimizer step the test hook names (lorakit.train's LORAKIT_INJECT_NAN_AT_STEP), else 1."""
    return float("nan") if int(os.environ.get(loop._INJECT_NAN_ENV, "0") or 0) == step else 1.0


def stop_on_non_finite(s: GrpoSession, loss: float, grad_norm: float) -> None:
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    kept = (f"The last good checkpoint is {s.last_checkpoint}." if s.last_checkpoint
            else f"No checkpoint was saved yet (--save_steps {s.args.train.save_steps}).")
    raise UserError(f"Training stopped at step {s.step + 1}/{s.plan.total_steps}: the {what} is {value}. This step "
                    f"was not applied. {kept} To fix: lower --learning_rate (now {s.learning_rate:g}; try "
                    f"{s.learning_rate / 10:g}), raise --beta, or check the reward functions for huge values.")


def run_round(s: GrpoSession, round_index: int, bar) -> None:
    """Sample, score, and apply this round's optimizer steps; log and save at its end."""
    g = s.args.grpo
    indices = s.plan.round_prompts(round_index)
    started = time.perf_counter()
    bar.set_description(f"grpo: rollout ({len(indices)}x{g.num_generations})")
    rollouts = generate_rollouts(s.engine, [s.prompts.prompt_ids[i] for i in indices],
                                 num_generations=g.num_generations, sampling=sampling(s.args), seed=s.plan.seed,
                                 round_index=round_index, end_of_turn=s.end_of_turn)
    rewards = compute_rewards(s.funcs, reward_inputs(s, s.prompts, indices, rollouts))
    adv = group_advantages(rewards, s.weights, g.num_generations, g.scale_rewards)
    rolled = time.perf_counter()
    batches = micro_batches(s, rollouts, round_index)
    n_items = sum(int(b.completion_mask.sum()) for _, b in batches)
    s.tokens += n_items + g.num_generations * sum(len(s.prompts.prompt_ids[i]) for i in indices)
    bar.set_description("grpo: reference")
    off_policy = s.plan.num_iterations > 1 or s.plan.steps_per_generation > s.plan.grad_accum
    old = frozen_logps(s, batches, as_reference=False) if off_policy else None
    ref = frozen_logps(s, batches, as_reference=True) if s.args.rlhf.beta != 0 else None
    referenced = time.perf_counter()
    bar.set_description("grpo: update")
    steps = []
    for _ in range(s.plan.num_iterations):
        for u in range(s.plan.steps_per_generation // s.plan.grad_accum):
            if s.step >= s.plan.total_steps:
                break
            chunk = list(enumerate(batches))[u * s.plan.grad_accum:(u + 1) * s.plan.grad_accum]
            steps.append(update(s, chunk, adv.advantages, old, ref, n_items))
            bar.update(1)
    done = time.perf_counter()
    metrics = grpo_log.round_metrics([f.name for f in s.funcs], s.weights, rewards, adv, rollouts)
    metrics.update(grpo_log.merge_window(steps))
    metrics.update({"time/rollout_s": rolled - started, "time/reference_s": referenced - rolled,
                    "time/update_s": done - referenced})
    s.window.append(metrics)
    bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', 0):.4f}",
                    len=f"{metrics['completions/mean_length']:.0f}", rollout=f"{rolled - started:.0f}s")
    if g.log_completions:
        texts = [s.tokenizer.decode(s.prompts.prompt_ids[i]) for i in indices]
        grpo_log.write_completions(s.log.run_dir / "completions.jsonl", s.step, texts, rollouts,
                                   [f.name for f in s.funcs], rewards, adv.advantages)
    total = (rewards * s.weights.unsqueeze(0)).nansum(dim=1)
    warning = s.watch.update(s.step, metrics["frac_reward_zero_std"], float(total.mean()), float(total.min()),
                             float(total.max()))
    if warning:
        bar.write(warning)
    after_round(s, bar)


def after_round(s: GrpoSession, bar) -> None:
    """Log when a --logging_steps boundary passed, evaluate on the held-out prompts, save at --save_steps."""
    t = s.args.train
    last = s.step >= s.plan.total_steps
    crossed = lambda every: last or (s.step // every) > ((s.step - s.plan.steps_per_round) // every)  # noqa: E731
    if crossed(t.logging_steps):
        record = grpo_log.merge_window(s.window)
        record.update(step=s.step, epoch=round(s.plan.epoch_of(s.step), 4),
                      memory_gb=round(memory_gb(s.device), 3), elapsed_s=round(time.perf_counter() - s.started, 2))
        s.log.record(record)
        s.window = []
    if s.val is not None and crossed(t.eval_steps or t.save_steps):
        held_out_reward(s, bar)
    if crossed(t.save_steps):
        save(s)


# ---------------------------------------------------------------- held-out reward


EVAL_SAMPLES = 4  # completions per held-out prompt
EVAL_ROUND = -1  # the held-out completions' seeds: the same at every evaluation, apart from every training round's


def held_out_reward(s: GrpoSession, bar=None) -> float:
    """Mean reward on the held-out prompts: EVAL_SAMPLES completions each, sampled as the rollouts are, with the
    same seeds at every evaluation (the expected reward GRPO raises, as TRL's eval measures it); the greedy
    completion's reward beside it. Logged as eval_reward, eval_reward_greedy and per function."""
    val, g = s.val, s.args.grpo
    rollouts = generate_rollouts(s.engine, val.prompt_ids, num_generations=min(EVAL_SAMPLES, g.num_generations),
                                 sampling=sampling(s.args), seed=s.plan.seed, round_index=EVAL_ROUND,
                                 end_of_turn=s.end_of_turn)
    greedy = SamplingSettings(g.max_completion_length, 0.0, 1.0, 0, g.repetition_penalty)
    firsts = generate_rollouts(s.engine, val.prompt_ids, num_generations=1, sampling=greedy, seed=s.plan.seed,
                               round_index=EVAL_ROUND, end_of_turn=s.end_of_turn)
    record: dict[str, Any] = {"step": s.step, "epoch": round(s.plan.epoch_of(s.step), 4)}
    for key, group in (("eval_reward", rollouts), ("eval_reward_greedy", firsts)):
        rewards = compute_rewards(s.funcs, reward_inputs(s, val, list(range(len(val.prompt_ids))), group))
        record[key] = float((rewards * s.weights.unsqueeze(0)).nansum(dim=1).mean())
        if key == "eval_reward":
            for j, f in enumerate(s.funcs):
                if not torch.isnan(rewards[:, j]).all():
                    record[f"eval_rewards/{f.name}/mean"] = float(torch.nanmean(rewards[:, j]))
    s.log.record(record)
    line = (f"step {s.step}: held-out reward {record['eval_reward']:.3f} ({len(val.prompt_ids)} prompts x "
            f"{len(rollouts) // len(val.prompt_ids)} samples), greedy {record['eval_reward_greedy']:.3f}")
    (bar.write if bar is not None else lambda m: print(m, file=sys.stderr))(line)
    return record["eval_reward"]


def train_grpo(args: RlhfArgs) -> TrainResult | None:
    """Run GRPO as `args` says; returns where the checkpoints are and the trained model (None after --dry_run)."""
    started = time.perf_counter()
    device = pick_device(args.model.device)
    dtype = pick_dtype(args.model.torch_dtype, device)
    start = starting_policy(args)
    tokenizer = load_policy_tokenizer(start, args)
    if args.data.system is None and start.adapter_args.system:
        args.data.system = start.adapter_args.system  # the SFT run's system prompt carries over
    system = resolve_system(args.data.system)
    prompts, val = load_prompts(args, tokenizer, system)  # before any weights load
    if args.train.dry_run:
        print("--dry_run: prompts checked, stopping before loading weights.", file=sys.stderr)
        return None
    sft.seed_everything(args.data.seed)
    model = load_model(start.model_path, torch_dtype=str(dtype).removeprefix("torch."), device=device,
                       attn_impl=args.model.attn_impl, quant=args.quant)
    model = prepare_policy(model, start, args, device)
    s = new_session(args, model, tokenizer, prompts, val, model_path=start.model_path, device=device, dtype=dtype,
                    system=system)
    if args.train.resume_from_checkpoint:
        resume(s, args.train.resume_from_checkpoint, args.train.resume_only_model)
    s.log.open_writers(args.train.report_to)
    try:
        with tqdm(total=s.plan.total_steps, initial=s.step, desc="grpo", unit="step", dynamic_ncols=True) as bar:
            if s.val is not None and s.step == 0:
                held_out_reward(s, bar)
            round_index = s.step // s.plan.steps_per_round
            while s.step < s.plan.total_steps:
                run_round(s, round_index, bar)
                round_index += 1
    except torch.OutOfMemoryError as exc:
        raise UserError(oom_message(device, args) + f" For GRPO also: --max_completion_length (now "
                        f"{args.grpo.max_completion_length}) or --num_generations.") from exc
    finally:
        s.log.close()
        grpo_log.plot_rewards(s.log.history, s.log.run_dir / "images" / "reward.png")
    print_reward_summary(s.log.history)
    return TrainResult(run_dir=s.log.run_dir, last_checkpoint=s.last_checkpoint, best_checkpoint=None,
                            train_loss=s.log.last("loss"), eval_loss=None, steps=s.step, tokens=s.tokens,
                            seconds=time.perf_counter() - started, log_history=s.log.history, model=s.model.eval(),
                            tokenizer=tokenizer)


def print_reward_summary(history: list[dict[str, Any]]) -> None:
    """Mean reward of the first and last logged rounds, and the held-out reward before and after."""
    rewards = [r["reward"] for r in history if "reward" in r]
    held = [r["eval_reward"] for r in history if "eval_reward" in r]
    if rewards:
        print(f"GRPO: train reward {rewards[0]:.3f} (first logged round) -> {rewards[-1]:.3f} (last)")
    if len(held) > 1:
        print(f"GRPO: held-out reward {held[0]:.3f} before -> {held[-1]:.3f} after (sampled as the rollouts)")
