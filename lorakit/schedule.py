"""Schedules as pure functions of the optimizer step: which samples it sees, and its learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def warmup_steps_for(total_steps: int, *, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warm-up length in optimizer steps: --warmup_steps wins over --warmup_ratio."""
    if warmup_steps > 0:
        return min(warmup_steps, total_steps)
    return min(math.ceil(warmup_ratio * total_steps), total_steps)


def lr_factor(step: int, *, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warm-up rises linearly from 1/(warmup+1) to 1 so the first step already moves; after it,
    cosine falls to 0 at `total_steps`, linear falls to 0, constant stays at 1.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")


@dataclass
class StepPlan:
    """Which samples each optimizer step sees: a pure function of (seed, step)."""

    n_samples: int
    micro_batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    seed: int
    lengths: tuple[int, ...] | None = None
    "Sample lengths, to group micro-batches by length (--group_by_length); None: plain shuffle."

    def data_order(self) -> dict:
        """What fixes the order (saved in checkpoints; a resume compares it): the fields, with the
        sample lengths reduced to whether they group the batches."""
        fields = {k: v for k, v in vars(self).items() if k != "lengths"}
        return fields | {"group_by_length": self.lengths is not None}

    def epoch_of(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps."""
        return step / self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[int]]:
        """Sample indices of each micro-batch of optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n_samples, generator=generator).tolist()
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.micro_batch_size, generator)
        span = self.micro_batch_size * self.grad_accum
        chunk = order[within * span : (within + 1) * span]
        return [chunk[i : i + self.micro_batch_size] for i in range(0, len(chunk), self.micro_batch_size)]


MEGABATCH = 16  # micro-batches whose samples are sorted by length together


def group_by_length(order: list[int], lengths, batch_size: int, generator: torch.Generator) -> list[int]:
    """`order` rearranged so each run of `batch_size` holds samples of similar length (little padding).

    Every MEGABATCH micro-batches' worth of the shuffled order is sorted by length and cut into
    micro-batches, whose order within the mega-batch is then shuffled again, so neither long nor
    short samples cluster at one end of the epoch (or of the learning-rate schedule).
    """
    out: list[int] = []
    span = MEGABATCH * batch_size
    for start in range(0, len(order), span):
        mega = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches = [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        for k in torch.randperm(len(full), generator=generator).tolist():
            out += full[k]
        out += [i for b in batches if len(b) < batch_size for i in b]  # a short batch only ends the epoch
    return out


def plan_steps(n_samples: int, *, batch_size: int, grad_accum: int, epochs: float, max_steps: int, seed: int,
               lengths: list[int] | None = None) -> StepPlan:
    """Steps per epoch and in total (--max_steps wins over --num_train_epochs); `lengths`: group by length."""
    steps_per_epoch = math.ceil(math.ceil(n_samples / batch_size) / grad_accum)
    total = max_steps if max_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))
    return StepPlan(n_samples, batch_size, grad_accum, steps_per_epoch, total, seed,
                    tuple(lengths) if lengths is not None else None)
