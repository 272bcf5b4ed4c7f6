"""A GRPO run's state and how it is built: the policy (fresh LoRA or the --adapters SFT adapter), prompts,
reward functions, the reference, the engine that samples rollouts, the optimizer and the run folder."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit import distributed, loop
from lorakit import train as sft
from lorakit.data.loading import AUTO_SPLIT_MIN_ROWS, split_val
from lorakit.errors import UserError
from lorakit.infer.engine import Engine
from lorakit.rlhf import grpo_log
from lorakit.rlhf.grpo_data import PromptSet, build_prompt_set, load_prompt_rows
from lorakit.rlhf.grpo_plan import GrpoPlan, plan_grpo
from lorakit.rlhf.grpo_rollout import end_of_turn_id
from lorakit.rlhf.reference import ReferencePolicy
from lorakit.rlhf.rewards import RewardFunction, RewardSettings, resolve_reward_funcs
from lorakit.run_log import RunLog
from lorakit.schedule import warmup_steps_for

# torch.compile's default mode for the rollout decoder, not the engine's max-autotune: its autotuned GEMV templates
# won at one row (bench/decode.py) while a round decodes 16-256 rows, where cuBLAS's GEMMs are expected to do as
# well; and tuning costs ~25 s for the six base GEMM shapes (Engine's note), the live adapter adds eight more.
ROLLOUT_COMPILE = True
DEFAULT_LR = 1e-3  # LoRA: single-digit sums, SmolLM2-135M, held-out reward 0.17 -> 0.83 in 6 steps (experiments/grpo)


@dataclass
class GrpoSession:
    """Everything the loop reads and updates (field names shared with lorakit.train's save/resume/log)."""

    args: Any  # RlhfArgs
    log: RunLog  # run folder, args.json, logging.jsonl, TensorBoard
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    plan: GrpoPlan
    prompts: PromptSet
    val: PromptSet | None
    device: torch.device
    learning_rate: float
    warmup: int
    engine: Engine
    funcs: list[RewardFunction]
    weights: torch.Tensor
    reference: ReferencePolicy | None  # the starting policy's LoRA tensors, swapped in (None with beta 0)
    end_of_turn: int | None
    step: int = 0
    tokens: int = 0  # prompt + completion tokens of the rollouts trained on (the run summary's count)
    eval_loss: float | None = None
    last_checkpoint: Path | None = None
    watch: grpo_log.ZeroSignalWatch = field(default_factory=grpo_log.ZeroSignalWatch)
    window: list[dict[str, float]] = field(default_factory=list)
    par: distributed.Parallel = field(default_factory=distributed.Parallel)  # one process (run_checkpoint.save reads it)
    started: float = field(default_factory=time.perf_counter)


def reward_functions(args, prompts: PromptSet) -> tuple[list[RewardFunction], torch.Tensor]:
    """--reward_funcs resolved (default: accuracy when rows carry a solution/answer) and their weights."""
    g = args.grpo
    names = list(g.reward_funcs)
    if not names:
        if not {"solution", "answer"} & set(prompts.columns):
            raise UserError("--reward_funcs is required: the data has no solution/answer column for the built-in "
                            "accuracy reward. Built-in: accuracy, format, repetition, soft_overlong, cosine; your "
                            "own: --external_plugins my_rewards.py --reward_funcs my_fn.")
        names = ["accuracy"]
        print("--reward_funcs: accuracy (the rows carry a solution/answer to check against)", file=sys.stderr)
    settings = RewardSettings(g.max_completion_length, g.repetition_n_grams, g.repetition_max_penalty,
                              g.soft_max_length, g.soft_cache_length, g.cosine_max_len, g.cosine_min_len_value_wrong,
                              g.cosine_max_len_value_wrong, g.cosine_min_len_value_correct,
                              g.cosine_max_len_value_correct)
    funcs = resolve_reward_funcs(names, g.external_plugins, settings)
    if g.reward_weights and len(g.reward_weights) != len(funcs):
        raise UserError(f"--reward_weights has {len(g.reward_weights)} values for {len(funcs)} reward functions.")
    weights = torch.tensor(g.reward_weights or [1.0] * len(funcs), dtype=torch.float64)
    return funcs, weights


def load_prompts(args, tokenizer, system: str | None) -> tuple[PromptSet, PromptSet | None]:
    """Training prompts and held-out prompts (--val_dataset, or --split_dataset_ratio of --dataset)."""
    d = args.data
    rows = load_prompt_rows(d.dataset, seed=d.seed, use_hf=args.model.use_hf)
    val_rows = load_prompt_rows(d.val_dataset, seed=d.seed, use_hf=args.model.use_hf) if d.val_dataset else []
    ratio = d.split_dataset_ratio
    if ratio is None:
        ratio = 0.0 if d.val_dataset or len(rows) < AUTO_SPLIT_MIN_ROWS else 0.01
    if ratio > 0:
        rows, held = split_val(rows, ratio, d.seed)
        val_rows += held
    budget = d.max_length
    train = build_prompt_set(rows, tokenizer, system=system, max_length=budget)
    val = build_prompt_set(val_rows, tokenizer, system=system, max_length=budget) if val_rows else None
    dropped = f"; {train.dropped_too_long} longer than --max_length {budget} dropped" if train.dropped_too_long else ""
    print(f"{len(train.rows)} training prompts, {len(val.rows) if val else 0} held-out prompts{dropped}; "
          f"columns for the reward functions: {', '.join(train.columns) or '(none)'}", file=sys.stderr)
    return train, val


def new_session(args, model, tokenizer, prompts: PromptSet, val, *, model_path, device, dtype, system) -> GrpoSession:
    """Plan, run folder with args.json, optimizer, engine, rewards and the reference."""
    t, g = args.train, args.grpo
    learning_rate = t.learning_rate if t.learning_rate is not None else (
        DEFAULT_LR if args.lora.train_type == "lora" else 1e-6)
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    plan = plan_grpo(len(prompts.rows), batch_size=t.per_device_train_batch_size, grad_accum=t.gradient_accumulation_steps,
                     steps_per_generation=g.steps_per_generation, num_generations=g.num_generations,
                     num_iterations=g.num_iterations, epochs=t.num_train_epochs, max_steps=t.max_steps,
                     seed=args.data.seed, log=say)
    saved = sft.resolved_args(args, model_path=model_path, tokenizer=tokenizer, system=system, device=device,
                              dtype=dtype, learning_rate=learning_rate)
    run_log = RunLog.create(t.output_dir, t.add_version, saved)
    funcs, weights = reward_functions(args, prompts)
    capacity = min(256, plan.batch_size * plan.steps_per_generation)
    try:
        engine = Engine(model, tokenizer, live_adapter=True, max_batch_size=capacity, compile=ROLLOUT_COMPILE)
    except Exception as exc:  # the GPU fast decoder could not be built over this model: the reference decoder serves
        say(f"note: the fast decoder could not take the live adapter ({type(exc).__name__}: {exc}); rollouts use "
            f"the reference decoder.")
        engine = Engine(model, tokenizer, fast=False, max_batch_size=capacity)
    model.train()
    graphs = ", CUDA graphs" if engine.device.type == "cuda" else ""
    say("rollouts: lorakit's engine, " + (f"fast decoder (static KV cache{graphs}) reading the live adapter"
                                           if engine.uses_fast_path else
                                           f"reference decoder (in-place KV cache; fast decoder off: "
                                           f"{engine.fast_note or 'not on a GPU'})"))
    say(f"run folder: {run_log.run_dir}\n{plan.total_steps} optimizer steps in {plan.total_rounds} rounds of "
        f"{plan.prompts_per_round} prompt(s) x {g.num_generations} completions; lr {learning_rate:g}, beta "
        f"{args.rlhf.beta:g}, loss_type {args.rlhf.loss_type}; rewards: "
        + ", ".join(f"{f.name} ({f.origin}) x {w:g}" for f, w in zip(funcs, weights.tolist())))
    return GrpoSession(args=args, log=run_log, model=model, tokenizer=tokenizer,
                   optimizer=loop.build_optimizer(model, args, learning_rate), plan=plan, prompts=prompts, val=val,
                   device=device, learning_rate=learning_rate,
                   warmup=warmup_steps_for(plan.total_steps, warmup_steps=t.warmup_steps, warmup_ratio=t.warmup_ratio),
                   engine=engine, funcs=funcs, weights=weights,
                   reference=ReferencePolicy(model) if args.rlhf.beta != 0 else None, end_of_turn=end_of_turn_id(tokenizer))
