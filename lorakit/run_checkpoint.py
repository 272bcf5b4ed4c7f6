"""A run's checkpoints: save the current step, resume from a saved one (exactly, or its weights only).

The data order is a pure function of (seed, epoch) and the learning rate of the step, so a
checkpoint's step, optimizer state and RNG states are all that exact resumption needs. Both take a
TrainingRun (sft, the preference losses) or anything with its fields (GRPO's GrpoSession).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lorakit import distributed
from lorakit.checkpoint import (
    TrainState,
    capture_rng,
    find_checkpoint,
    load_train_state,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from lorakit.errors import UserError
from lorakit.run_state import TrainingRun


def save(s: TrainingRun) -> Path:
    """Checkpoint the current step (atomic; rank 0 writes what every rank gathered), then prune to --save_total_limit."""
    only_model = s.args.train.save_only_model
    weights = distributed.gather_model_state(s.par, s.model)  # FSDP2: every rank takes part
    optimizer = None if only_model else distributed.gather_optimizer_state(s.par, s.model, s.optimizer)
    s.last_checkpoint = s.log.run_dir / f"checkpoint-{s.step}"
    if s.par.env.is_main:
        state = TrainState(
            step=s.step, epoch=s.plan.epoch_of(s.step), total_steps=s.plan.total_steps,
            train_loss=s.log.last("loss"),
            eval_loss=s.eval_loss, data_order=s.plan.data_order(), log_history=s.log.history,
            optimizer=optimizer, rng=None if only_model else capture_rng(),
        )
        save_checkpoint(s.last_checkpoint, model=s.model, tokenizer=s.tokenizer, args=s.log.saved_args,
                        train_state=state, state_dict=weights)
        if s.args.train.save_total_limit:
            prune_checkpoints(s.log.run_dir, s.args.train.save_total_limit)
    distributed.barrier(s.par.env)  # the checkpoint exists for every rank once save() returns
    return s.last_checkpoint


def resume(s: TrainingRun, checkpoint: str, only_model: bool) -> None:
    """Load a checkpoint's weights; unless only_model, also its optimizer, step, history and RNG."""
    ckpt = find_checkpoint(checkpoint)
    if only_model:
        s.par.load_weights(s.model, ckpt)
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
    s.par.load_weights(s.model, ckpt)
    distributed.load_optimizer_state(s.par, s.model, s.optimizer, state.optimizer)
    s.step, s.eval_loss = state.step, state.eval_loss
    for record in state.log_history:  # the new run's logging.jsonl reads like one uninterrupted run
        s.log.record(record)
    if state.rng is not None:
        restore_rng(state.rng)
    print(f"resuming from {ckpt} at step {state.step} of {s.plan.total_steps}", file=sys.stderr)
